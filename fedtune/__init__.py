"""fedtune: federated, differentially private LoRA fine-tuning of pre-trained transformers."""

__version__ = "0.1.0"

"""Load a trained adapter folder for evaluation and prediction, the plain PEFT way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.common.errors import ConfigError
from fedtune.common.model import METADATA_FILE, load_classifier


@dataclass(frozen=True)
class LoadedAdapter:
    model: torch.nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int


def load_adapter(folder: Path, *, base_model: str | None = None) -> LoadedAdapter:
    """Base model + ``PeftModel.from_pretrained(folder)``; labels come from the folder's metadata."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {folder} has no adapter_config.json; give a run's adapter/ or checkpoints/round-N/ folder.")
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ConfigError(f"--adapter {folder} has no {METADATA_FILE} (labels); was it written by fedtune?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base = Path(base_model or meta["base_model"])
    if not (base / "config.json").is_file():
        raise ConfigError(f"base model folder {base} not found; pass --base-model DIR.")
    labels = list(meta["labels"])
    # Adapters written before the pooling setting existed used the model's own [CLS] head.
    pooling = meta.get("pooling", "cls")
    model = load_classifier(
        base, len(labels), pooling=pooling, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}
    )
    model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    return LoadedAdapter(
        model=model, tokenizer=AutoTokenizer.from_pretrained(str(base)), labels=labels, max_length=int(meta["max_length"])
    )

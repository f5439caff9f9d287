"""Load a trained adapter folder for evaluation, prediction and generation, the plain PEFT way."""

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


def _metadata(folder: Path, base_model: str | None) -> tuple[dict[str, Any], Path]:
    """The adapter folder's ``fedtune.json`` and the base model folder to load it on."""
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {folder} has no adapter_config.json; give a run's adapter/ or checkpoints/round-N/ folder.")
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ConfigError(f"--adapter {folder} has no {METADATA_FILE} (labels); was it written by fedtune?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base = Path(base_model or meta["base_model"])
    if not (base / "config.json").is_file():
        raise ConfigError(f"base model folder {base} not found; pass --base-model DIR.")
    return meta, base


def adapter_task(folder: Path) -> str:
    """The task an adapter folder was trained for ('classification' when its metadata predates tasks)."""
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        return "classification"  # load_adapter names what is missing
    return str(json.loads(meta_path.read_text(encoding="utf-8")).get("task", "classification"))


def load_adapter(folder: Path, *, base_model: str | None = None) -> LoadedAdapter:
    """Base model + ``PeftModel.from_pretrained(folder)``; labels come from the folder's metadata."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    meta, base = _metadata(folder, base_model)
    if meta.get("task") == "causal-lm":
        raise ConfigError(f"--adapter {folder} is a causal-lm adapter (no labels to predict); use `fedtune generate --adapter {folder} PROMPT`.")
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


@dataclass(frozen=True)
class LoadedLM:
    """A causal-LM adapter on its base model, and how its prompts were rendered in training."""

    model: torch.nn.Module
    tokenizer: Any
    template: str
    max_length: int


def load_lm_adapter(folder: Path, *, base_model: str | None = None) -> LoadedLM:
    """``AutoModelForCausalLM`` + ``PeftModel.from_pretrained(folder)`` for a causal-lm adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.common.causal_lm import load_lm_tokenizer

    meta, base = _metadata(folder, base_model)
    if meta.get("task") != "causal-lm":
        raise ConfigError(f"--adapter {folder} is a classification adapter, not a causal-lm one; use `fedtune predict --adapter {folder} TEXT`.")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(folder))
    model.eval()
    return LoadedLM(model=model, tokenizer=load_lm_tokenizer(base), template=str(meta.get("template", "auto")),
                    max_length=int(meta["max_length"]))

"""Load a trained adapter folder for evaluation, prediction and generation, the plain PEFT way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.common.errors import ConfigError
from fedtune.common.config import check_model_folder
from fedtune.common.model import METADATA_FILE, load_classifier, model_fingerprint


@dataclass(frozen=True)
class LoadedAdapter:
    model: torch.nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    base: Path  # the base model folder loaded (checked against the adapter's base_model_id)


def _metadata(folder: Path, base_model: str | None) -> tuple[dict[str, Any], Path]:
    """The adapter folder's ``fedtune.json`` and the base model folder to load it on.

    Raises:
        ConfigError: no adapter there, metadata unreadable or lacking a key, a base model folder that
            is not a model, or one other than the adapter was trained on (``base_model_id``).
    """
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {folder} has no adapter_config.json; give a run's adapter/ or checkpoints/round-N/ folder.")
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise ConfigError(f"--adapter {folder} has no {METADATA_FILE} (labels); was it written by fedtune?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"--adapter {folder}: {meta_path} is not valid JSON ({err}).") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"--adapter {folder}: {meta_path} holds a JSON {type(meta).__name__}, not an object; "
                          "it was written by another program or edited by hand.")
    needed = ["base_model", "max_length"] + (["labels"] if meta.get("task", "classification") != "causal-lm" else [])
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ConfigError(f"--adapter {folder}: {meta_path} lacks {missing}; it was written by another fedtune version "
                          "or edited by hand.")
    recorded = str(meta["base_model"])
    if not base_model and not Path(recorded).is_dir():
        raise ConfigError(f"--adapter {folder} was trained on base model {recorded}, which is not on this machine; "
                          "pass --base-model DIR (a copy of that model).")
    base = check_model_folder(Path(base_model or recorded), where="--base-model" if base_model else f"the adapter's base model ({meta_path})")
    expected = meta.get("base_model_id")
    if expected is None and (Path(recorded) / "config.json").is_file():  # an adapter written before base_model_id
        expected = model_fingerprint(Path(recorded))
    if expected is not None and model_fingerprint(base) != expected:
        raise ConfigError(f"--adapter {folder} was trained on base model {recorded} (config id {expected}); {base} is another "
                          f"model (config id {model_fingerprint(base)}). Pass --base-model with a copy of {recorded}.")
    return meta, base


def _load_peft(model: torch.nn.Module, folder: Path, meta: dict[str, Any], base: Path) -> torch.nn.Module:
    """``PeftModel.from_pretrained`` that names the adapter's base model when the tensors do not fit.

    An adapter without ``base_model_id`` (written before it existed) is checked here only: by
    tensor shapes (a size mismatch) and names (every tensor the adapter file holds must be one the
    rebuilt model has: another depth or ``top_layers`` changes the names, not the shapes).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    def mismatch(detail: str) -> ConfigError:
        return ConfigError(f"--adapter {folder} does not fit base model {base} (it was trained on {meta['base_model']}): "
                           f"{detail.rstrip('.')}. Pass --base-model with the model the adapter was trained on.")

    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except RuntimeError as err:  # torch's load_state_dict: "size mismatch for ...: copying a param with shape ..."
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise mismatch(lines[0] if lines else str(err).splitlines()[0]) from None
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        have = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys())
        unused = sorted(saved - have)
        if unused:
            raise mismatch(f"{len(unused)} of its {len(saved)} tensors have no place in it, e.g. {unused[0]}")
    return peft_model


def adapter_task(folder: Path) -> str:
    """The task an adapter folder was trained for ('classification' when its metadata predates tasks)."""
    try:
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or not JSON: load_adapter names what is wrong, in one line
        return "classification"
    return str(meta.get("task", "classification")) if isinstance(meta, dict) else "classification"


def load_adapter(folder: Path, *, base_model: str | None = None) -> LoadedAdapter:
    """Base model + ``PeftModel.from_pretrained(folder)``; labels come from the folder's metadata."""
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
    model = _load_peft(model, folder, meta, base)
    model.eval()
    return LoadedAdapter(
        model=model, tokenizer=AutoTokenizer.from_pretrained(str(base)), labels=labels, max_length=int(meta["max_length"]),
        base=base,
    )


@dataclass(frozen=True)
class LoadedLM:
    """A causal-LM adapter on its base model, and how its prompts were rendered in training."""

    model: torch.nn.Module
    tokenizer: Any
    template: str
    max_length: int
    base: Path  # the base model folder loaded (checked against the adapter's base_model_id)


def load_lm_adapter(folder: Path, *, base_model: str | None = None) -> LoadedLM:
    """``AutoModelForCausalLM`` + ``PeftModel.from_pretrained(folder)`` for a causal-lm adapter."""
    from transformers import AutoModelForCausalLM

    from fedtune.common.causal_lm import load_lm_tokenizer

    meta, base = _metadata(folder, base_model)
    if meta.get("task") != "causal-lm":
        raise ConfigError(f"--adapter {folder} is a classification adapter, not a causal-lm one; use `fedtune predict --adapter {folder} TEXT`.")
    model = _load_peft(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), folder, meta, base)
    model.eval()
    return LoadedLM(model=model, tokenizer=load_lm_tokenizer(base), template=str(meta.get("template", "auto")),
                    max_length=int(meta["max_length"]), base=base)

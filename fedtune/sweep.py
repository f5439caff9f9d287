"""`fedtune sweep`: a grid of simulations, one CSV row per run, means and 95% t-intervals over seeds.

A sweep file is a run config (the keys of `fedtune simulate --config`) plus a ``[grid]`` table of
lists over any config setting, written ``SECTION.KEY`` or ``seed``; ``[[grid]]`` (several tables)
sweeps the union of their cross products, e.g. a federated grid and a one-site "centralized" one.
In ``privacy.target_epsilon``, ``"none"`` (or ``false``) means a run without DP (``--no-dp``).
Every key and value, and every cell of the product, is checked against the config schema (and the
simulation's preflight: data, split, model folder) before anything runs.

Each cell is one ``fedtune simulate`` in its own subprocess: a run that crashes (or hangs past
``--run-timeout``) takes nothing else down, Ray and PyTorch memory go back after each run, and the
sweep records the failure and goes on. Layout under the sweep's folder::

    sweep.csv                 one row per run (grid values, test metrics, max epsilon, bytes, seconds, status)
    summary.md                the table over seeds (mean, std, 95% t-interval per setting) in Markdown
    runs/NAME/                the run directory (``fedtune simulate --out``)
    runs/NAME.toml            the config the run was started with
    logs/NAME.log             its console output
    *.png                     the plots (``fedtune/sweep_plots.py``)

NAME is the cell's grid values and a hash of its settings that differ from the defaults, so a
changed base config or grid value names another folder (and a setting fedtune adds later does not). A second invocation skips every run whose ``summary.json`` exists and
whose config matches; a half-finished run (a crash, a timeout, an interrupted sweep) is deleted and
redone from round 1, not resumed: every row is then one uninterrupted run from its seed, comparable
with the others (``fedtune simulate --resume`` continues a run correctly, but its sampling after the
restart is not the one an uninterrupted run would have drawn).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedtune.common.config import RunConfig, from_dict, from_flat, unknown_key
from fedtune.common.errors import ConfigError

EPSILON_KEY = "privacy.target_epsilon"
NO_DP = "none"  # a grid's privacy.target_epsilon value for a run without DP
CONFIDENCE = 0.95
# Settings the sweep owns: where each run writes, and that it is a simulation.
RESERVED = {"out": "the sweep names each run's directory (under --out DIR/runs/)",
            "simulation": "a sweep runs simulations only"}
# Config paths a run reads; made absolute so that a run finds them whatever the sweep's working directory.
PATH_KEYS = (("model", "base_model"), ("model", "init_adapter"), ("data", "path"), ("data", "canaries"))
CSV_METRICS = ("test_accuracy", "test_macro_f1", "test_perplexity", "max_epsilon", "bytes_up", "bytes_down", "seconds", "rounds")


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One run of the sweep: its grid values (as written in the sweep file) and its whole config."""

    name: str
    values: tuple[tuple[str, Any], ...]
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def config_file(self) -> Path:
        return self.run_dir.with_name(self.name + ".toml")


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    """A validated sweep: the grid keys (the union over its grids, in order) and every cell."""

    out: Path
    keys: tuple[str, ...]
    cells: tuple[Cell, ...]

    @property
    def csv_path(self) -> Path:
        return self.out / "sweep.csv"


@dataclass(frozen=True, kw_only=True)
class RoundPoint:
    """One round of a finished run, from its metrics.jsonl."""

    round: int
    metric: float | None  # test accuracy (classification) or test perplexity (causal-lm)
    max_epsilon: float | None


@dataclass(frozen=True, kw_only=True)
class RunRow:
    """One CSV row: the cell's setting of every grid key, its status and, when done, its summary's figures."""

    name: str
    setting: tuple[tuple[str, str], ...]  # grid key -> value as written in the CSV ("none": no DP)
    status: str  # done | failed | timeout | pending
    run_dir: str
    metrics: tuple[tuple[str, float | None], ...] = ()
    error: str = ""
    rounds: tuple[RoundPoint, ...] = ()

    def metric(self, key: str) -> float | None:
        return dict(self.metrics).get(key)


@dataclass(frozen=True, kw_only=True)
class Spread:
    """Mean, sample standard deviation and a two-sided t-interval for the mean over n values.

    The interval is mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard deviation
    (ddof 1): exact for normally distributed values, and what "mean +- 95% CI over seeds" reports.
    ``std`` and the interval are None for n < 2 (one seed gives no spread).
    """

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def t_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Spread:
    """The mean of ``values`` with its Student-t confidence interval (see :class:`Spread`)."""
    from scipy.stats import t

    if not values:
        raise ValueError("t_interval needs at least one value, got none.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Spread(n=n, mean=mean, std=None, low=None, high=None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Spread(n=n, mean=mean, std=std, low=mean - half, high=mean + half)


# ---- the sweep file -------------------------------------------------------------------------------

def setting_names() -> dict[str, tuple[str, ...]]:
    """Every config setting a grid may name, by section ("" for top-level keys such as seed)."""
    base = RunConfig()
    names = {"": tuple(k for k in ("seed", "task") if k not in RESERVED)}
    for section, value in base.sections().items():
        names[section] = tuple(f"{section}.{f.name}" for f in fields(value))
    return names


def _unknown(key: str) -> str:
    """The did-you-mean for an unknown grid key: a close dotted name, or one whose last part is the key."""
    names = setting_names()
    every = [k for keys in names.values() for k in keys]
    close = difflib.get_close_matches(key, every, n=1) or [k for k in every if k.rsplit(".", 1)[-1] in (key, f"target_{key}")][:1]
    section = close[0].partition(".")[0] if close and "." in close[0] else ""
    allowed = names.get(section, ()) if close else [*names[""], *(f"{s}.KEY" for s in names if s)]
    problem = unknown_key(f"grid key {key!r}", key, allowed)
    if close and "did you mean" not in problem:
        problem = problem.replace("; allowed", f" (did you mean {close[0]!r}?); allowed", 1)
    return problem


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``[grid] privacy.target_epsilon = [...]`` is a nested table in TOML; a quoted dotted key is not. Both mean the same."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _override(key: str, value: Any) -> dict[str, Any]:
    """The config override a grid value stands for, in flat form (``common.config.from_flat``);
    epsilon "none"/false turns DP off."""
    if key == EPSILON_KEY:
        if value is False or (isinstance(value, str) and value.lower() == NO_DP):
            return {"privacy.enabled": False}
        return {"privacy.enabled": True, EPSILON_KEY: value}
    return {key: value}


def _absolute_paths(run: RunConfig) -> RunConfig:
    changes: dict[str, dict[str, str]] = {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(run, section), key)
        if value and not value.startswith("demo:") and not Path(value).is_absolute():
            changes.setdefault(section, {})[key] = str(Path(value).resolve())
    return from_dict(changes, base=run) if changes else run


def _key_problems(key: str, values: Any, base: RunConfig) -> list[str]:
    """Whether ``key`` is a setting and each of its values one the setting takes (others held at the base)."""
    section = key.partition(".")[0]
    if key in RESERVED or section in RESERVED:
        return [f"grid key {key!r} cannot be swept: {RESERVED[section if section in RESERVED else key]}."]
    if key not in {k for keys in setting_names().values() for k in keys}:
        return [_unknown(key)]
    if not isinstance(values, list) or not values:
        return [f"grid key {key!r} must be a non-empty list of values, got {values!r}."]
    problems = []
    seen: list[Any] = []
    for value in values:
        if value in seen:
            problems.append(f"grid key {key!r} lists the value {value!r} twice.")
        seen.append(value)
        try:
            from_flat(_override(key, value), base=base)
        except ConfigError as err:
            # A value can also clash with a base setting that another grid key changes; the cells report those.
            problems.extend(f"grid key {key!r}, value {value!r}: {p}" for p in err.problems if p.startswith(key))
    return problems


def _csv_value(key: str, run: RunConfig) -> str:
    if key == EPSILON_KEY and not run.privacy.enabled:
        return NO_DP
    section, dot, sub = key.partition(".")
    value = getattr(getattr(run, section), sub) if dot else getattr(run, key)
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def explicit_settings(run: RunConfig) -> dict[str, Any]:
    """The settings of ``run`` that differ from the defaults (``out`` aside), nested as in TOML.

    What a cell's name hashes: a setting added to the config later, with a default, leaves the
    names (and so the finished runs) of an existing sweep as they were.
    """
    defaults, explicit = RunConfig().to_dict(), {}
    for key, value in run.to_dict().items():
        if key == "out":
            continue
        if isinstance(value, dict):
            changed = {k: v for k, v in value.items() if v != defaults[key].get(k)}
            if changed:
                explicit[key] = changed
        elif value != defaults[key]:
            explicit[key] = value
    return explicit


def _cell_name(values: Sequence[tuple[str, Any]], run: RunConfig) -> str:
    """Readable grid values and a hash of the config's explicit settings: another config, another folder."""
    digest = hashlib.sha256(json.dumps(explicit_settings(run), sort_keys=True).encode()).hexdigest()[:8]
    parts = [f"{key.rsplit('.', 1)[-1]}-{_csv_value(key, run)}" for key, _ in values]
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", "_".join(parts))[:96].strip("-_")
    return f"{slug}_{digest}" if slug else digest


def plan_sweep(data: Mapping[str, Any], *, out: Path, preflight: bool = True) -> SweepPlan:
    """Check a parsed sweep file and expand its grid(s) into cells.

    Raises:
        ConfigError: every problem at once: base config, grid keys (with a did-you-mean), grid values,
            and cells whose combination of values the config (or, with ``preflight``, the data and
            model folder) refuses, each naming the cell.
    """
    body = dict(data)
    grids = body.pop("grid", None)
    problems: list[str] = [f"key {k!r} cannot be set in a sweep file: {why}; remove it." for k, why in RESERVED.items() if k in body]
    for key in RESERVED:
        body.pop(key, None)
    if grids is None:
        problems.append("a sweep file needs a [grid] table of lists, e.g. [grid] seed = [0, 1, 2].")
        grids = []
    tables = [grids] if isinstance(grids, Mapping) else grids
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        problems.append(f"grid must be a table ([grid]) or tables ([[grid]]) of lists, got {grids!r}.")
        tables = []
    try:
        base = from_dict(body)
    except ConfigError as err:
        raise ConfigError([*problems, *err.problems]) from None
    flat_grids = [_flatten(t) for t in tables]
    for number, grid in enumerate(flat_grids, 1):
        if not grid:
            problems.append(f"grid table {number} is empty; give it at least one key with a list of values.")
        for key, values in grid.items():
            problems.extend(_key_problems(key, values, base))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    keys = tuple(dict.fromkeys(k for grid in flat_grids for k in grid))
    cells: list[Cell] = []
    out = out.resolve()
    for grid in flat_grids:
        for combo in itertools.product(*grid.values()):
            values = tuple(zip(grid, combo))
            where = ", ".join(f"{k}={v!r}" for k, v in values)
            override: dict[str, Any] = {}
            for key, value in values:
                override.update(_override(key, value))
            try:
                run = _absolute_paths(from_flat(override, base=base))
                problems.extend(f"grid cell {where}: {p}" for p in _cell_problems(run, preflight=preflight))
            except ConfigError as err:
                problems.extend(f"grid cell {where}: {p}" for p in err.problems)
                continue
            name = _cell_name(values, run)
            cells.append(Cell(name=name, values=values, config=from_dict({"out": str(out / "runs" / name)}, base=run)))
    names = [c.name for c in cells]
    problems.extend(f"the grid gives the run {n} more than once (the same config twice); drop the repeated value."
                    for n in sorted({n for n in names if names.count(n) > 1}))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return SweepPlan(out=out, keys=keys, cells=tuple(cells))


def _cell_problems(run: RunConfig, *, preflight: bool) -> list[str]:
    from fedtune.server.robust import aggregation_problems

    problems = aggregation_problems(run)
    if preflight and not problems:
        from fedtune.simulations.simulate import preflight as check_run

        try:
            check_run(run)
        except ConfigError as err:
            problems.extend(err.problems)
        except Exception as err:  # noqa: BLE001  (a data error names the file; it must stop the sweep before it starts)
            problems.append(f"{type(err).__name__}: {err}")
    return problems


def load_sweep(path: Path, *, out: Path, preflight: bool = True) -> SweepPlan:
    """Read and plan a sweep file; every problem is named with the file."""
    from fedtune.common.io import read_toml

    data = read_toml(Path(path), what="sweep file")
    try:
        return plan_sweep(data, out=out, preflight=preflight)
    except ConfigError as err:
        raise ConfigError([f"{path}: {p}" for p in err.problems]) from None


# ---- running -------------------------------------------------------------------------------------

def is_done(cell: Cell) -> bool:
    """A finished run of this very config: its summary exists and the config it started with trains as
    the cell's does (defaults resolved, so a default's new spelling does not redo finished runs).

    Where the run wrote (``out``) is not compared: the run is found by its name under the sweep's folder,
    so a sweep folder moved elsewhere (kept in a repository, copied off a cluster) resumes.
    """
    from fedtune.common.config import load_toml

    if not (cell.run_dir / "summary.json").is_file() or not cell.config_file.is_file():
        return False
    try:
        recorded = replace(load_toml(cell.config_file), out=cell.config.out)
    except ConfigError:
        return False
    return recorded.effective() == cell.config.effective()


# The runs in progress: Ctrl-C reaches only the sweep's main thread, which ends them (they run in their own sessions).
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def simulate_subprocess(cell: Cell, log: Path, timeout: float | None) -> tuple[str, str]:
    """Run ``fedtune simulate --config`` for one cell; returns (status, error line)."""
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--config", str(cell.config_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        # Its own session, so a timeout can end the run and every process it started (Ray's workers too).
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", f"still running after --run-timeout {timeout:g} s; stopped"
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    if rc == 0 and (cell.run_dir / "summary.json").is_file():
        return "done", ""
    return "failed", f"exit code {rc}: {_last_line(log)}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str:
    """The error a failed run ended with: its last 'fedtune: error' line, else its last exception line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("fedtune: error") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln[:300]
    return (lines[-1][:300] if lines else "no output") + f" (see {log})"


Runner = Callable[[Cell, Path, "float | None"], tuple[str, str]]


def run_sweep(plan: SweepPlan, *, jobs: int = 1, run_timeout: float | None = None, retries: int = 0,
              start_within: float | None = None, runner: Runner = simulate_subprocess,
              echo: Callable[[str], None] = print) -> list[RunRow]:
    """Run every cell that is not done (``jobs`` at a time); the CSV is rewritten after each run.

    ``retries``: start a failed run again (from round 1) up to this many times before recording it as
    failed; a transient failure (Ray's node timing out at start-up on a loaded machine) is the reason.
    ``start_within``: start no run (nor retry) later than this many seconds after the sweep began; the
    runs in progress finish, the rest stay pending for the next invocation (a time-boxed allocation, a
    machine needed for something else at a known hour).
    ``runner`` starts one run (default: a ``fedtune simulate`` subprocess) and returns its status and error.
    """
    from fedtune.common.config import dump_toml

    (plan.out / "runs").mkdir(parents=True, exist_ok=True)
    (plan.out / "logs").mkdir(exist_ok=True)
    done = {c.name for c in plan.cells if is_done(c)}
    # Seed by seed: an interrupted sweep has then every setting at its first seeds, not all seeds of the first settings.
    todo = sorted((c for c in plan.cells if c.name not in done), key=lambda c: c.config.seed)
    echo(f"sweep: {len(plan.cells)} runs, {len(done)} already done, {len(todo)} to run ({jobs} at a time); {plan.csv_path}")
    outcome: dict[str, tuple[str, str]] = {}
    lock = threading.Lock()
    write_csv(plan, outcome)

    deadline = None if start_within is None else time.monotonic() + start_within

    def one(cell: Cell) -> tuple[Cell, str, str, float]:
        started = time.perf_counter()
        status, error = "pending", "not started: past the sweep's start window"
        for attempt in range(retries + 1):
            if deadline is not None and time.monotonic() > deadline:
                break
            if cell.run_dir.exists():  # half-finished: redo it from round 1 (see the module docstring)
                shutil.rmtree(cell.run_dir)
            dump_toml(cell.config, cell.config_file)
            status, error = runner(cell, plan.out / "logs" / f"{cell.name}.log", run_timeout)
            if status == "done":
                break
            if attempt < retries:
                echo(f"retrying {cell.name} ({error})")
        return cell, status, error, time.perf_counter() - started

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = [pool.submit(one, c) for c in todo]
    try:
        for count, future in enumerate(as_completed(futures), 1):
            try:
                cell, status, error, seconds = future.result()
            except Exception as err:  # noqa: BLE001  (the sweep records a run it could not even start, and goes on)
                cell = todo[futures.index(future)]
                status, error, seconds = "failed", f"{type(err).__name__}: {err}", 0.0
            with lock:
                outcome[cell.name] = (status, error)
                write_csv(plan, outcome)
            if status != "pending":
                echo(f"[{count}/{len(todo)}] {status:<7} {seconds:6.0f} s  {cell.name}" + (f"  ({error})" if error else ""))
    except BaseException:  # Ctrl-C: start nothing more, end the runs in progress (their folders are redone next time)
        pool.shutdown(wait=False, cancel_futures=True)
        with _LIVE_LOCK:
            live = list(_LIVE)
        for proc in live:
            _kill_group(proc)
        raise
    pool.shutdown()
    if waiting := sum(status == "pending" for status, _ in outcome.values()):
        echo(f"{waiting} runs not started: past --start-within {start_within:g} s; run the same command again to go on")
    return collect_rows(plan, outcome)


def collect_rows(plan: SweepPlan, outcome: Mapping[str, tuple[str, str]] | None = None) -> list[RunRow]:
    """A row per cell from what is on disk: done runs read their summary and metrics; others are pending or failed."""
    rows = []
    for cell in plan.cells:
        # The value each run trains with ("0: the default" resolved), so the CSV says lr 0.05, not 0.0.
        setting = tuple((key, _csv_value(key, cell.config.effective())) for key in plan.keys)
        if is_done(cell):
            rows.append(_done_row(cell, setting))
            continue
        status, error = (outcome or {}).get(cell.name, ("pending", ""))
        rows.append(RunRow(name=cell.name, setting=setting, status="failed" if status == "done" else status,
                           run_dir=str(cell.run_dir), error=error or ("no summary.json" if status == "done" else "")))
    return rows


def _done_row(cell: Cell, setting: tuple[tuple[str, str], ...]) -> RunRow:
    summary = json.loads((cell.run_dir / "summary.json").read_text(encoding="utf-8"))
    test = summary.get("test") or {}
    figures: dict[str, float | None] = {
        "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"), "test_perplexity": test.get("perplexity"),
        "max_epsilon": summary.get("max_epsilon") if summary.get("dp") else None,
        "bytes_up": summary.get("bytes_up"), "bytes_down": summary.get("bytes_down"),
        "seconds": summary.get("seconds"), "rounds": summary.get("rounds"),
    }
    from fedtune.server.records import read_metrics  # the one reader of metrics.jsonl (a torn last line, damage)

    rounds = []
    for r in read_metrics(cell.run_dir):
        metric = r.get("test_accuracy") if r.get("test_accuracy") is not None else r.get("test_perplexity")
        rounds.append(RoundPoint(round=int(r["round"]), metric=metric, max_epsilon=r.get("max_epsilon")))
    return RunRow(name=cell.name, setting=setting, status="done", run_dir=str(cell.run_dir),
                  metrics=tuple((k, figures[k]) for k in CSV_METRICS), rounds=tuple(rounds))


def write_csv(plan: SweepPlan, outcome: Mapping[str, tuple[str, str]] | None = None) -> list[RunRow]:
    """Rewrite ``sweep.csv`` from the run directories (atomically: a crash leaves the last whole file); returns its rows."""
    from fedtune.common.io import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", *plan.keys, "status", *CSV_METRICS, "run_dir", "error"])
    rows = collect_rows(plan, outcome)
    for row in rows:
        figures = ["" if row.metric(k) is None else f"{row.metric(k):.6g}" for k in CSV_METRICS]
        writer.writerow([row.name, *(v for _, v in row.setting), row.status, *figures, row.run_dir, row.error])
    atomic_write_bytes(plan.csv_path, buffer.getvalue().encode("utf-8"))
    return rows


# ---- figures over seeds --------------------------------------------------------------------------

def primary_metric(rows: Iterable[RunRow]) -> str:
    """test_accuracy for classification sweeps; test_perplexity when only a causal LM's perplexity is there."""
    rows = list(rows)
    if any(r.metric("test_accuracy") is not None for r in rows) or not any(r.metric("test_perplexity") is not None for r in rows):
        return "test_accuracy"
    return "test_perplexity"


@dataclass(frozen=True, kw_only=True)
class SettingSummary:
    """The done runs of one setting (every grid key but seed), summarized over their seeds."""

    setting: tuple[tuple[str, str], ...]
    runs: int
    failed: int
    metric: Spread | None
    macro_f1: Spread | None
    max_epsilon: Spread | None
    seconds: Spread | None


def summarize(rows: Sequence[RunRow], *, over: str = "seed") -> list[SettingSummary]:
    """One summary per setting, in the grid's order, over the values of ``over`` (the seeds)."""
    metric = primary_metric(rows)
    groups: dict[tuple[tuple[str, str], ...], list[RunRow]] = {}
    for row in rows:
        groups.setdefault(tuple((k, v) for k, v in row.setting if k != over), []).append(row)

    def spread(done: list[RunRow], key: str) -> Spread | None:
        values = [v for v in (r.metric(key) for r in done) if v is not None]
        return t_interval(values) if values else None

    out = []
    for setting, group in groups.items():
        done = [r for r in group if r.status == "done"]
        out.append(SettingSummary(setting=setting, runs=len(group), failed=sum(r.status in ("failed", "timeout") for r in group),
                                  metric=spread(done, metric), macro_f1=spread(done, "test_macro_f1"),
                                  max_epsilon=spread(done, "max_epsilon"), seconds=spread(done, "seconds")))
    return out


def summary_table(rows: Sequence[RunRow]) -> tuple[str, list[str], int, list[list[str]]]:
    """The table over seeds as text cells (for the terminal and for ``summary.md``): its title, its
    columns, how many of them name the setting (the grid keys but seed), and a row per setting."""
    metric = primary_metric(rows)
    summaries = summarize(rows)
    title = f"{metric.replace('_', ' ')} per setting over seeds: mean +- std (sample), 95% t-interval of the mean"
    columns = [key.rsplit(".", 1)[-1] for key, _ in (summaries[0].setting if summaries else ())]  # the CSV has the full names
    keys = len(columns)
    failed = any(s.failed for s in summaries)
    columns += ["done/runs", *(["failed"] if failed else []), metric.replace("test_", ""), "95% CI", "macro-F1", "max epsilon", "s/run"]

    def fmt(s: Spread | None, digits: int = 3) -> str:
        if s is None:
            return "-"
        return f"{s.mean:.{digits}f}" + (f" +- {s.std:.{digits}f}" if s.std is not None else "")

    cells = []
    for s in summaries:
        ci = "-" if s.metric is None or s.metric.low is None else f"[{s.metric.low:.3f}, {s.metric.high:.3f}]"
        done = s.metric.n if s.metric else 0
        cells.append([*(v for _, v in s.setting), f"{done}/{s.runs}", *([str(s.failed)] if failed else []),
                      fmt(s.metric), ci, fmt(s.macro_f1), fmt(s.max_epsilon), fmt(s.seconds, 0)])
    return title, columns, keys, cells


def print_table(rows: Sequence[RunRow]) -> None:
    """Mean +- std and the 95% t-interval of the test metric per setting, over seeds."""
    from rich.console import Console
    from rich.table import Table

    title, columns, keys, cells = summary_table(rows)
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < keys else "right")
    for row in cells:
        table.add_row(*row)
    # Not a terminal (a log file, a pipe): wide enough that a row stays on one line.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_markdown(rows: Sequence[RunRow], out_dir: Path) -> Path:
    """``summary.md``: the table over seeds in Markdown, to paste into a paper or a README."""
    from fedtune.common.io import atomic_write_bytes

    title, columns, keys, cells = summary_table(rows)
    lines = [f"{title}.", "", "| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < keys else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
    path = Path(out_dir) / "summary.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path

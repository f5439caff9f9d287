"""What the dashboard reads: a run directory's files and a site's ledger, as typed views.

It reads only the files named here, under the run directories the dashboard was given, and the
ledger through `PrivacyLedger.summary` (never the site's data file). A live run's last line may be
half-written: it is skipped, never an error. Anything else in a run's files that is not what the
coordinator writes there (a torn line in the middle, a field of another type) is left out and named
in `RunView.problems`: a damaged or hostile run directory gives a page that says so, never a server error.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from fedtune.client.ledger import LedgerSummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Refused:
    """A sampled site without a usable update in a round, and why (a refusal code when it refused)."""

    site: str
    reason: str
    code: str | None = None

    def text(self) -> str:
        return f"{self.site}: {self.reason}" + (f" {self.code}" if self.code else "")


@dataclass(frozen=True, kw_only=True)
class RoundView:
    """One line of metrics.jsonl, as the dashboard shows it."""

    round: int
    sampled: int
    replied: int
    refused: tuple[Refused, ...]
    validated_round: int | None
    accuracy: float | None  # federated validation of the adapter after ``validated_round``
    test_accuracy: float | None
    test_perplexity: float | None
    epsilon_by_site: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float | None


@dataclass(frozen=True, kw_only=True)
class RunView:
    """What one run directory holds, read at one moment (a live run is read again on each request)."""

    path: Path
    run_id: str | None
    planned_rounds: int | None
    dp: bool
    rounds: tuple[RoundView, ...]
    sites: tuple[str, ...]
    budgets: dict[str, float]  # each site's own budget as it reported it; empty when unknown
    target_epsilon: float | None  # the run's target (config.toml), shown when a site's budget is unknown
    finished: bool  # summary.json exists
    task: str | None  # summary.json's task
    final_validation: tuple[int, float] | None  # summary.json's validation: (after round, accuracy)
    base_perplexity: float | None  # summary.json's base model perplexity (causal LM)
    card: str | None  # adapter/README.md
    problems: tuple[str, ...] = ()  # what could not be read, and was left out of the page

    @property
    def causal_lm(self) -> bool:
        return any(r.test_perplexity is not None for r in self.rounds) or self.task == "causal-lm"


class _Unreadable(ValueError):
    """A value of a run's file that is not what the coordinator writes there (the message names it)."""


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # atomic writes make a half-written file rare; an edited one is not
        problems.append(f"{path.name} cannot be read ({err}); what it holds is not shown.")
        return None


def number(value: Any) -> float | None:
    """A finite JSON number as a float; None for anything else (a bool, a string, NaN or Infinity)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _whole(line: dict[str, Any], key: str) -> int | None:
    value = line.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Unreadable(f"{key} is {_short(value)}, not a whole number")


def _real(line: dict[str, Any], key: str) -> float | None:
    value = line.get(key)
    if value is None:
        return None
    found = number(value)
    if found is None:
        raise _Unreadable(f"{key} is {_short(value)}, not a number")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _round_view(line: dict[str, Any]) -> RoundView:
    """A round line as the dashboard shows it (``line["round"]`` is an int: `read_metrics_file` checked it).

    Raises:
        _Unreadable: a field of another type than the coordinator writes.
    """
    # sites_missing names every sampled site without a usable update (older runs: sites_rejected only).
    entries = line.get("sites_missing")
    entries = line.get("sites_rejected") if entries is None else entries
    if entries is not None and not isinstance(entries, list):
        raise _Unreadable(f"the sites without an update are {_short(entries)}, not a list")
    refused = tuple(Refused(site=str(e.get("site", "?")), reason=str(e.get("reason", "?")),
                            code=str(e["code"]) if e.get("code") else None) for e in entries or [] if isinstance(e, dict))
    eps = line.get("epsilon_by_site")
    if eps is not None and not isinstance(eps, dict):
        raise _Unreadable(f"epsilon_by_site is {_short(eps)}, not an object")
    epsilon_by_site = {}
    for site, value in (eps or {}).items():
        found = number(value)
        if found is None:
            raise _Unreadable(f"epsilon_by_site[{_short(site)}] is {_short(value)}, not a number")
        epsilon_by_site[str(site)] = found
    return RoundView(
        round=line["round"], sampled=_whole(line, "sites_sampled") or 0, replied=_whole(line, "sites_replied") or 0,
        refused=refused, validated_round=_whole(line, "validated_round"), accuracy=_real(line, "accuracy"),
        test_accuracy=_real(line, "test_accuracy"), test_perplexity=_real(line, "test_perplexity"),
        epsilon_by_site=epsilon_by_site, bytes_up=_whole(line, "bytes_up") or 0, bytes_down=_whole(line, "bytes_down") or 0,
        seconds=_real(line, "seconds"))


def read_rounds(run_dir: Path, problems: list[str] | None = None) -> list[RoundView]:
    """metrics.jsonl's round lines (`fedtune.server.records.read_metrics_file`, the one reader of the file).

    A last line still being written by a live run is skipped, not an error; any other line that is
    not a round line, or a round line with a field of the wrong type, is left out and named in ``problems``.
    """
    from fedtune.server.records import read_metrics_file

    problems = [] if problems is None else problems
    try:
        metrics = read_metrics_file(run_dir)
    except OSError as err:
        problems.append(f"metrics.jsonl cannot be read ({err.strerror or err}); no round is shown.")
        return []
    damage = metrics.damage()
    if damage:
        problems.append(f"{damage.replace(str(metrics.path), 'metrics.jsonl')}: left out.")
    out = []
    for line in metrics.lines:
        try:
            out.append(_round_view(line))
        except _Unreadable as err:
            problems.append(f"metrics.jsonl, round {line['round']}: {err}; that round is left out.")
    return out


def _latest_site_states(run_dir: Path) -> dict[str, Any]:
    """Each site's record in the latest checkpoint (what a live run knows of the sites' budgets)."""
    folders = []
    for p in (run_dir / "checkpoints").glob("round-*"):
        if re.fullmatch(r"round-\d+", p.name):
            folders.append((int(p.name.removeprefix("round-")), p))
    for _, folder in sorted(folders, reverse=True):
        state = _read_json(folder / "resume-state.json", [])
        if isinstance(state, dict) and isinstance(state.get("sites"), dict):
            return state["sites"]
    return {}


def _summary_parts(summary: Any, problems: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """summary.json as an object and its site records, each field of the wrong type named in ``problems`` and dropped."""
    if summary is None:
        return {}, []
    if not isinstance(summary, dict):
        problems.append(f"summary.json holds {type(summary).__name__} {_short(summary)}, not an object; its figures are not shown.")
        return {}, []
    fields = dict(summary)
    for key, kind in (("sites", list), ("validation", dict), ("base", dict)):
        if fields.get(key) is not None and not isinstance(fields[key], kind):
            problems.append(f"summary.json's {key} is {_short(fields[key])}, not {'a list' if kind is list else 'an object'}; not shown.")
            fields.pop(key)
    sites = [s for s in fields.get("sites") or [] if isinstance(s, dict)]
    return fields, sites


def read_run(run_dir: Path) -> RunView:
    """Everything the run pages show, from the files of ``run_dir`` only.

    Never raises for what a file holds: a file or field that is not what the coordinator writes
    is left out and named in ``RunView.problems``, so that a damaged or hostile run directory gives
    a page that says so, not a server error.
    """
    problems: list[str] = []
    rounds = read_rounds(run_dir, problems)
    finished = (run_dir / "summary.json").exists()
    summary, summary_sites = _summary_parts(_read_json(run_dir / "summary.json", problems), problems)
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        config = {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        problems.append(f"config.toml cannot be read ({err}); the planned rounds and the target epsilon are not shown.")
        config = {}
    identity = _read_json(run_dir / "run.json", problems)
    site_records = {str(s.get("site")): s for s in summary_sites}
    if not site_records:
        site_records = {str(k): v for k, v in _latest_site_states(run_dir).items() if isinstance(v, dict)}
    budgets = {k: b for k, v in site_records.items() if (b := number(v.get("budget_epsilon"))) is not None and b > 0}
    names = set(site_records) | {s for r in rounds for s in r.epsilon_by_site} | {f.site for r in rounds for f in r.refused}
    privacy = config.get("privacy") if isinstance(config.get("privacy"), dict) else {}
    federation = config.get("federation") if isinstance(config.get("federation"), dict) else {}
    dp = bool(summary.get("dp")) if "dp" in summary else bool(privacy.get("enabled", True))
    try:
        card: str | None = (run_dir / "adapter" / "README.md").read_text(encoding="utf-8")
    except FileNotFoundError:
        card = None
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"adapter/README.md cannot be read ({err}); the model card is not shown.")
        card = None
    planned = federation.get("rounds")
    validation = summary.get("validation") or {}
    val_round, val_accuracy = validation.get("round"), number(validation.get("accuracy"))
    final = (val_round, val_accuracy) if isinstance(val_round, int) and not isinstance(val_round, bool) and val_accuracy is not None else None
    run_id = identity.get("run_id") if isinstance(identity, dict) else None
    return RunView(
        path=run_dir, run_id=str(run_id) if run_id else None,
        planned_rounds=planned if isinstance(planned, int) and not isinstance(planned, bool) else None, dp=dp, rounds=tuple(rounds),
        sites=tuple(sorted(names)), budgets=budgets, target_epsilon=number(privacy.get("target_epsilon")),
        finished=finished, task=summary.get("task") if isinstance(summary.get("task"), str) else None, final_validation=final,
        base_perplexity=number((summary.get("base") or {}).get("perplexity")), card=card, problems=tuple(problems))


@dataclass(frozen=True, kw_only=True)
class LedgerView:
    """A site's ledger for its operator: `PrivacyLedger.summary` over every record, and refusals seen in the given runs."""

    site: str
    budget_epsilon: float
    summary: LedgerSummary  # each row with its epsilon_after
    refusals: tuple[tuple[str, int, Refused], ...]  # (run folder name, round, what the coordinator recorded)

    @property
    def left(self) -> float:
        return self.summary.left(self.budget_epsilon)


def read_ledger(site_config: Path, runs: Sequence[RunView] = ()) -> LedgerView:
    """The ledger named by ``site_config``'s state_dir, accounted at the site's own delta.

    The data file is not read: the spend shown is over every record any charge named (what
    ``fedtune site ledger`` falls back to), so the dashboard never touches private data.
    """
    from fedtune.client.daemon import load_site_config
    from fedtune.client.ledger import PrivacyLedger

    config = load_site_config(site_config)
    summary = PrivacyLedger(config.state_dir).summary(None, delta=config.delta, epsilon_after=True)
    refusals = tuple((run.path.name, r.round, f) for run in runs for r in run.rounds for f in r.refused if f.site == config.name)
    return LedgerView(site=config.name, budget_epsilon=config.budget_epsilon, summary=summary, refusals=refusals)

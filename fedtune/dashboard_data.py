"""What the dashboard reads: a run directory's files and a site's ledger, as typed views.

It reads only the files named here, under the run directories the dashboard was given, and the
ledger through `PrivacyLedger.summary` (never the site's data file). A live run's last line may be
half-written: it is skipped, never an error.
"""

from __future__ import annotations

import json
import logging
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
    summary: dict[str, Any] | None
    card: str | None  # adapter/README.md

    @property
    def causal_lm(self) -> bool:
        return any(r.test_perplexity is not None for r in self.rounds) or bool(self.summary and self.summary.get("task") == "causal-lm")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # a file being replaced: atomic writes make this rare, not impossible
        logger.warning("dashboard: cannot read %s: %s", path, err)
        return None


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _round_view(line: dict[str, Any]) -> RoundView:
    # sites_missing names every sampled site without a usable update (older runs: sites_rejected only).
    missing = line.get("sites_missing")
    entries = missing if isinstance(missing, list) else line.get("sites_rejected") or []
    refused = tuple(Refused(site=str(e.get("site", "?")), reason=str(e.get("reason", "?")),
                            code=str(e["code"]) if e.get("code") else None) for e in entries if isinstance(e, dict))
    eps = line.get("epsilon_by_site") or {}
    return RoundView(
        round=int(line["round"]), sampled=int(line.get("sites_sampled") or 0), replied=int(line.get("sites_replied") or 0),
        refused=refused, validated_round=line.get("validated_round"), accuracy=number(line.get("accuracy")),
        test_accuracy=number(line.get("test_accuracy")), test_perplexity=number(line.get("test_perplexity")),
        epsilon_by_site={str(k): float(v) for k, v in eps.items() if number(v) is not None},
        bytes_up=int(line.get("bytes_up") or 0), bytes_down=int(line.get("bytes_down") or 0), seconds=number(line.get("seconds")))


def read_rounds(run_dir: Path) -> list[RoundView]:
    """metrics.jsonl's lines; a last line still being written by a live run is skipped, not an error."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            out.append(_round_view(json.loads(text)))
        except (ValueError, KeyError, TypeError) as err:
            if i != len(lines) - 1:
                logger.warning("dashboard: %s line %d is not a round line (%s); skipped", path, i + 1, err)
    return out


def _latest_site_states(run_dir: Path) -> dict[str, Any]:
    """Each site's record in the latest checkpoint (what a live run knows of the sites' budgets)."""
    folders = []
    for p in (run_dir / "checkpoints").glob("round-*"):
        if re.fullmatch(r"round-\d+", p.name):
            folders.append((int(p.name.removeprefix("round-")), p))
    for _, folder in sorted(folders, reverse=True):
        state = _read_json(folder / "resume-state.json")
        if isinstance(state, dict) and isinstance(state.get("sites"), dict):
            return state["sites"]
    return {}


def read_run(run_dir: Path) -> RunView:
    """Everything the run pages show, from the files of ``run_dir`` only."""
    rounds = read_rounds(run_dir)
    summary = _read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    identity = _read_json(run_dir / "run.json")
    site_records = {str(s.get("site")): s for s in (summary or {}).get("sites", []) if isinstance(s, dict)}
    if not site_records:
        site_records = {str(k): v for k, v in _latest_site_states(run_dir).items() if isinstance(v, dict)}
    budgets = {k: float(v["budget_epsilon"]) for k, v in site_records.items() if (number(v.get("budget_epsilon")) or 0) > 0}
    names = set(site_records) | {s for r in rounds for s in r.epsilon_by_site} | {f.site for r in rounds for f in r.refused}
    privacy = config.get("privacy", {}) if isinstance(config.get("privacy"), dict) else {}
    dp = bool(summary.get("dp")) if summary and "dp" in summary else bool(privacy.get("enabled", True))
    try:
        card: str | None = (run_dir / "adapter" / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        card = None
    planned = (config.get("federation") or {}).get("rounds") if isinstance(config.get("federation"), dict) else None
    return RunView(
        path=run_dir, run_id=str(identity["run_id"]) if isinstance(identity, dict) and identity.get("run_id") else None,
        planned_rounds=int(planned) if isinstance(planned, int) else None, dp=dp, rounds=tuple(rounds),
        sites=tuple(sorted(names)), budgets=budgets, target_epsilon=number(privacy.get("target_epsilon")),
        finished=summary is not None, summary=summary, card=card)


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

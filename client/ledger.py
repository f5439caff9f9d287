"""The site's persistent privacy ledger: what each local dataset has spent, across rounds and runs.

One JSON file in the site's own state folder. Spending is keyed by a fingerprint of the data, so
the same records keep their history whatever run, path or restart they come through. A charge is
written (atomically) *before* training starts: privacy counts as spent once noise may be drawn,
even if the update never arrives. A charge that would push epsilon past the site's budget is
refused before anything is written or trained.

The budget is never stored from the wire: it is passed in from the site's own settings each time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from fedtune.common.accounting import Segment, calibrate_noise_multiplier, epsilon
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.io import atomic_write_json

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
_VERSION = 1
# Slack for float round-off between calibration and the re-computed total; calibration itself
# never overshoots, so this never admits a real overspend of any consequence.
_EPS_SLACK = 1e-9


@dataclass(frozen=True, kw_only=True)
class Charge:
    """One round of DP-SGD at this site, with every knob needed to re-derive its cost."""

    run: str
    round: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    time: float

    @property
    def segment(self) -> Segment:
        return Segment(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=self.steps)


@dataclass(frozen=True, kw_only=True)
class NoisePlan:
    """The noise calibrated once for a run: reaching ``target_epsilon`` after ``rounds`` x ``steps``."""

    run: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str


class PrivacyLedger:
    """Reads and appends to ``<state_dir>/privacy-ledger.json``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE

    # -- reading -------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": _VERSION, "datasets": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            # Never silently reset a ledger: that would forget spent privacy.
            raise ConfigError(f"privacy ledger {self.path} is unreadable ({err}); restore it from a backup.") from None
        if data.get("version") != _VERSION:
            raise ConfigError(f"privacy ledger {self.path} has version {data.get('version')!r}, expected {_VERSION}.")
        return data

    def charges(self, dataset: str) -> list[Charge]:
        entry = self._read()["datasets"].get(dataset, {})
        return [Charge(**c) for c in entry.get("charges", [])]

    def spent_epsilon(self, dataset: str, *, delta: float, accountant: str = "rdp") -> float:
        return epsilon([c.segment for c in self.charges(dataset)], delta=delta, accountant=accountant)

    def plan(self, dataset: str, run: str) -> NoisePlan | None:
        raw = self._read()["datasets"].get(dataset, {}).get("plans", {}).get(run)
        return NoisePlan(**raw) if raw else None

    def summary(self) -> dict[str, Any]:
        """Every dataset's charges and plans, as stored."""
        return self._read()["datasets"]

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold an exclusive lock while reading, changing and atomically rewriting the ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            atomic_write_json(self.path, data)

    def plan_noise(
        self,
        dataset: str,
        *,
        run: str,
        sample_rate: float,
        steps_per_round: int,
        rounds: int,
        target_epsilon: float,
        budget_epsilon: float,
        delta: float,
        accountant: str = "rdp",
    ) -> NoisePlan:
        """Calibrate z once per run so that epsilon reaches min(target, budget) after the planned rounds.

        Already-spent privacy of this dataset (earlier runs) is part of the composition, so the
        site's lifetime epsilon lands on the target, never above it. Returns the stored plan on
        later rounds of the same run.

        Raises:
            PrivacyBudgetError: the dataset has already spent its budget (or the run's target).
        """
        existing = self.plan(dataset, run)
        if existing is not None:
            return existing
        goal = min(target_epsilon, budget_epsilon)
        spent = [c.segment for c in self.charges(dataset)]
        spent_eps = epsilon(spent, delta=delta, accountant=accountant)
        if spent_eps >= goal:
            raise PrivacyBudgetError(
                f"dataset {dataset[:12]} has spent epsilon {spent_eps:.3f} of its budget {budget_epsilon:g} "
                f"(run target {target_epsilon:g}); no privacy is left for run {run}.",
                budget=budget_epsilon,
                spent=spent_eps,
                requested=goal - spent_eps,
            )
        z = calibrate_noise_multiplier(
            target_epsilon=goal,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            spent=spent,
            accountant=accountant,
        )
        plan = NoisePlan(
            run=run,
            noise_multiplier=z,
            sample_rate=sample_rate,
            steps_per_round=steps_per_round,
            rounds=rounds,
            target_epsilon=goal,
            delta=delta,
            accountant=accountant,
        )
        with self._locked() as data:
            entry = data["datasets"].setdefault(dataset, {"charges": [], "plans": {}})
            entry.setdefault("plans", {})[run] = asdict(plan)
        logger.info("calibrated z=%.4f for %d rounds x %d steps at q=%.4f to reach epsilon %.3f", z, rounds, steps_per_round, sample_rate, goal)
        return plan

    def charge(
        self,
        dataset: str,
        *,
        run: str,
        round: int,
        segment: Segment,
        clip_norm: float,
        delta: float,
        budget_epsilon: float,
        accountant: str = "rdp",
    ) -> float:
        """Record a round's steps before training; returns the dataset's epsilon including them.

        Raises:
            PrivacyBudgetError: if the round would take epsilon past ``budget_epsilon``; nothing is
                written and no training may happen.
        """
        with self._locked() as data:
            entry = data["datasets"].setdefault(dataset, {"charges": [], "plans": {}})
            before = [Charge(**c).segment for c in entry["charges"]]
            spent = epsilon(before, delta=delta, accountant=accountant)
            after = epsilon([*before, segment], delta=delta, accountant=accountant)
            if after > budget_epsilon + _EPS_SLACK:
                raise PrivacyBudgetError(
                    f"round {round} of run {run} would raise epsilon from {spent:.3f} to {after:.3f}, "
                    f"past this site's budget {budget_epsilon:g} (delta={delta:g}); refused before training.",
                    budget=budget_epsilon,
                    spent=spent,
                    requested=after - spent,
                )
            charge = Charge(
                run=run,
                round=round,
                sample_rate=segment.sample_rate,
                noise_multiplier=segment.noise_multiplier,
                steps=segment.steps,
                clip_norm=clip_norm,
                delta=delta,
                accountant=accountant,
                time=time.time(),
            )
            entry["charges"].append(asdict(charge))
        return after

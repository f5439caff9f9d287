"""The site's persistent privacy ledger: what each *record* has spent, across rounds, runs and data edits.

Accounting is per record, never per file snapshot. A record is one (text, label) row, keyed by
`fedtune.common.data.record_digests`. Each charge names the *cohort* of records a round (or a
release of statistics) used; a record's spend is the composition of every charge whose cohort
contains it, and what a run may still spend is decided by its worst record. Editing a row by hand
makes a new record that starts at zero while the other rows keep their history; a row that
``fedtune site prepare`` changes (normalised, redacted, or kept in place of its duplicates) is
*linked* to the rows it came from (`link`), and shares their history; adding rows gives only the
new rows a fresh start; re-saving, reordering or moving the file changes nothing. Identical rows are
one record (see `record_digests`: group privacy for a person with several distinct rows is out of
scope). This is individual privacy accounting (Feldman, Zrnic, "Individual Privacy Accounting via a
Renyi Filter", NeurIPS 2021): whether a record is in a cohort depends on the operator's file and
the site's split, never on other records' values, and a charge that would take any record past the
budget is refused as a whole.

The ledger is one JSON file in the site's own state folder (`privacy-ledger.json`); its format,
the cohorts and record histories in memory and the migration from version 1 are in
`fedtune.client.ledger_state`.

A charge is written atomically and durably *before* training: privacy counts as spent once noise
may be drawn, even if the update never arrives. The budget is never stored from the wire: it comes
from the site's own settings at each call.
"""

from __future__ import annotations

import fcntl
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Iterator, Mapping, Sequence

from fedtune.common.accounting import ACCOUNTANTS, Segment, calibrate_noise_multiplier, epsilon
from fedtune.common.errors import ConfigError, PrivacyBudgetError
from fedtune.common.io import atomic_write_bytes, make_dirs

from .ledger_state import ALL_RECORDS, LEDGER_FILE, V1_BACKUP_FILE, Charge, LedgerState, NoisePlan, cohort_id, read_state

# Charge and NoisePlan are defined beside the state that stores them; they are part of this API.
__all__ = ["Charge", "ChargeRow", "LedgerSummary", "NoisePlan", "PrivacyLedger"]

logger = logging.getLogger(__name__)

# Slack for float round-off between calibration and the re-computed total; calibration itself
# never overshoots, so this never admits a real overspend of any consequence.
_EPS_SLACK = 1e-9


@dataclass(frozen=True, kw_only=True)
class ChargeRow:
    """A charge as it touches a set of records: ``records`` of them, or None for every record.

    ``epsilon_after`` (filled by ``summary(..., epsilon_after=True)``): the worst of those records
    right after this charge, each over its own charges up to this one; None when not asked for.
    """

    charge: Charge
    records: int | None
    epsilon_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class LedgerSummary:
    """What a set of records (a site's current data file) has spent, for ``site ledger``/``site check``."""

    path: Path
    delta: float
    records: int  # distinct records
    max_epsilon: float
    at_max: int  # records whose spend equals max_epsilon
    never_spent: int  # records no charge touched
    charges: tuple[ChargeRow, ...]  # the charges that touch them, oldest first
    other_charges: int  # charges that touch none of them (rows since edited or removed)

    def left(self, budget_epsilon: float) -> float:
        """What the worst record may still spend under ``budget_epsilon``."""
        return max(0.0, budget_epsilon - self.max_epsilon)

    def table(self) -> list[str]:
        """The charges as text lines: a header, then one row per charge."""
        rows = [("run", "round", "kind", "records", "z", "q", "steps", "accountant")]
        for row in self.charges:
            c = row.charge
            rows.append((c.run, str(c.round), c.kind, "all" if row.records is None else str(row.records),
                         f"{c.noise_multiplier:.4f}", f"{c.sample_rate:.4f}", str(c.steps), c.accountant))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join(v.ljust(w) if i in (0, 2, 7) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                for r in rows]


def _record_set(records: Collection[str], *, what: str, allow_empty: bool = False) -> frozenset[str]:
    if isinstance(records, str):  # a lone digest would be read as its characters
        raise ConfigError(f"`records` of {what} must be a sequence of record digests, got the string {records[:40]!r}.")
    unique = frozenset(records)
    if not unique and not allow_empty:
        raise ConfigError(f"`records` of {what} is empty; pass the digests of the records it uses (common.data.record_digests).")
    return unique


def _one_digest(record: object, *, what: str) -> str:
    if not isinstance(record, str) or not record:
        raise ConfigError(f"{what} must be a record digest (common.data.record_digests), got {record!r}.")
    return record


def _check_accountant(accountant: str | None) -> None:
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ConfigError(f"`accountant` must be one of {list(ACCOUNTANTS)} or None, got {accountant!r}.")


def _spent(state: LedgerState, records: frozenset[str], *, delta: float, accountant: str | None) -> float:
    """The largest epsilon (at ``delta``) any of ``records`` has spent in ``state``; 0.0 for none."""
    histories = state.maximal(state.histories(records))
    return max((state.epsilon(h, delta=delta, accountant=accountant) for h in histories), default=0.0)


class PrivacyLedger:
    """Reads and appends to ``<state_dir>/privacy-ledger.json``; every method takes record digests."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE

    # -- reading -------------------------------------------------------------------------------
    def _load(self) -> LedgerState:
        if not self.path.exists():
            return LedgerState()
        return read_state(self.path.read_bytes(), self.path)

    def charges(self, records: Sequence[str] | None = None) -> list[Charge]:
        """The charges that touch any of ``records`` (None: all charges), oldest first."""
        state = self._load()
        if records is None:
            return list(state.charges)
        wanted = state.expand(_record_set(records, what="charges", allow_empty=True))  # linked records' charges too
        touched = {cid for cid, rec in state.cohorts.items() if wanted and (rec is None or not rec.isdisjoint(wanted))}
        return [c for c in state.charges if c.cohort in touched]

    def spent_epsilon(self, records: Sequence[str], *, delta: float, accountant: str | None = None) -> float:
        """The largest epsilon (at ``delta``) any of ``records`` has spent; 0.0 for none.

        With ``accountant`` None each history is accounted with the accountants its charges were
        approved under (the smallest of their bounds, each over all its charges); PRV-approved
        charges are thus reported with PRV, not re-computed with the looser RDP.
        """
        _check_accountant(accountant)
        return _spent(self._load(), _record_set(records, what="spent_epsilon", allow_empty=True), delta=delta, accountant=accountant)

    def plan(self, run: str) -> NoisePlan | None:
        return self._load().plans.get(run)

    def summary(self, records: Sequence[str] | None = None, *, delta: float, accountant: str | None = None,
                epsilon_after: bool = False) -> LedgerSummary:
        """The spend of ``records`` (None: every record any charge named) and the charges touching them.

        Records at the max are those whose history is a maximal one (see `LedgerState.maximal`) with the
        largest bound; a record whose charges are a strict subset of another's has spent less. With
        ``epsilon_after`` each row also says how the worst record it touched stood right after it
        (one accountant call per charge and history: the dashboard's chart of the spend over time).
        """
        _check_accountant(accountant)
        state = self._load()
        if records is None:
            wanted = frozenset().union(*(rec for rec in state.cohorts.values() if rec is not None))
        else:
            wanted = _record_set(records, what="summary", allow_empty=True)
        groups = state.histories(wanted)
        spends = {h: state.epsilon(h, delta=delta, accountant=accountant) for h in state.maximal(groups)}
        top = max(spends.values(), default=0.0)
        unseen = frozenset(i for i, c in enumerate(state.charges) if c.cohort == ALL_RECORDS)
        if records is None:  # also any record the ledger never saw: the all-records charges apply to it
            top = max(top, state.epsilon(unseen, delta=delta, accountant=accountant))
        # A prefix of a maximal history spends at least what the same prefix of one inside it does.
        histories = state.maximal([*spends, unseen] if records is None else spends)

        def after(i: int) -> float:
            return max((state.epsilon(frozenset(j for j in h if j <= i), delta=delta, accountant=accountant)
                        for h in histories if i in h), default=0.0)

        # A linked record is touched by a charge to any record of its lineage.
        lineage = state.lineage() if state.derived else {}
        linked = Counter(lineage[r] for r in wanted if r in lineage)  # {lineage: its records among wanted}: each tested once
        plain = wanted.difference(lineage) if linked else wanted
        touched_by = {cid: None if rec is None
                      else len(rec.intersection(plain)) + sum(n for m, n in linked.items() if not rec.isdisjoint(m))
                      for cid, rec in state.cohorts.items()}
        rows = []
        for i, c in enumerate(state.charges):
            touched = touched_by[c.cohort]
            if touched is None or touched > 0:
                rows.append(ChargeRow(charge=c, records=touched, epsilon_after=after(i) if epsilon_after else None))
        return LedgerSummary(
            path=self.path,
            delta=delta,
            records=len(wanted),
            max_epsilon=top,
            at_max=sum(groups[h] for h, eps in spends.items() if math.isclose(eps, top, rel_tol=1e-9, abs_tol=1e-12)),
            never_spent=sum(n for h, n in groups.items() if not h),
            charges=tuple(rows),
            other_charges=len(state.charges) - len(rows),
        )

    def sources(self, records: Sequence[str]) -> frozenset[str]:
        """Every record linked with any of ``records`` (their lineages, see `link`), ``records`` excluded."""
        unique = _record_set(records, what="sources", allow_empty=True)
        return frozenset(self._load().expand(unique) - unique)

    # -- writing -------------------------------------------------------------------------------
    def link(self, sources_of: Mapping[str, Collection[str]], *, what: str) -> int:
        """Record that each record of ``sources_of`` was made from its source records; returns the links added.

        Linked records form a *lineage* (links count in both directions): each is charged, from now
        on, the composition of every charge, past or future, to any record of it. Composing the union
        of their charges is neither the max of their epsilons (that would lose the spend of a charge
        only a dropped duplicate took part in) nor the sum (that would count twice a charge they
        took part in together: the ledger charges identical rows as one record). Both directions,
        because going back from a cleaned file to the raw one must not reset a record either.

        Written under the lock, atomically, before the derived records exist anywhere (``site
        prepare`` links, then writes the cleaned file): a crash in between leaves links to records
        that nothing holds, which cost nothing. Links are never removed.

        Args:
            sources_of: {record digest: digests of the records it was made from}.
            what: What made them, for the ledger's audit trail (no text of a record).
        """
        return self._link(sources_of, what=what)[0]

    def link_and_spent(self, sources_of: Mapping[str, Collection[str]], records: Sequence[str], *, what: str, delta: float,
                       accountant: str | None = None) -> tuple[int, float]:
        """`link`, then `spent_epsilon` of ``records`` on the ledger as the link left it: (links added, epsilon).

        ``site prepare``'s pair, from one read of the ledger: the epsilon is taken from the state the
        link read (and, when it added links, wrote under the lock), not from a second read of the file.
        """
        _check_accountant(accountant)
        unique = _record_set(records, what="spent_epsilon", allow_empty=True)
        added, state = self._link(sources_of, what=what)
        return added, _spent(self._load() if state is None else state, unique, delta=delta, accountant=accountant)

    def _link(self, sources_of: Mapping[str, Collection[str]], *, what: str) -> tuple[int, LedgerState | None]:
        """`link`'s work; also the ledger's state as it read it (None: nothing to link, nothing read)."""
        clean = {_one_digest(r, what="a linked record"): _record_set(s, what=f"the sources of {r}")
                 for r, s in sources_of.items()}
        if not any(s - {r} for r, s in clean.items()):
            return 0, None
        if self.path.exists():  # links only accumulate: when all are there already, a rerun need not rewrite the file
            read = self._load()
            if all(s - {r} <= read.derived.get(r, frozenset()) for r, s in clean.items()):
                return 0, read
        with self._locked() as state:
            added = state.add_links(clean, what=what, time=time.time())
        if added:
            logger.info("privacy ledger %s: %d records linked to the %d records they were made from (%s)",
                        self.path, len(clean), len(frozenset().union(*clean.values())), what)
        return added, state  # as written, under the lock

    @contextmanager
    def _locked(self) -> Iterator[LedgerState]:
        """Hold an exclusive lock while reading, changing and atomically rewriting the ledger.

        An exception inside the block leaves the file as it was.
        """
        make_dirs(self.path.parent)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._load()
            yield state
            if state.v1_bytes is not None:
                backup = self._keep_v1(state.v1_bytes)
                state.migrations[-1] = replace(state.migrations[-1], backup=backup.name)
                logger.warning("Migrated privacy ledger %s from version 1: its %d charges now count for every "
                               "record (conservative); the version-1 file is kept as %s.",
                               self.path, state.migrations[-1].charges, backup)
            atomic_write_bytes(self.path, state.to_bytes())

    def _keep_v1(self, raw: bytes) -> Path:
        backup = self.path.with_name(V1_BACKUP_FILE)
        if backup.exists() and backup.read_bytes() != raw:  # never overwrite an older backup
            backup = self.path.with_name(f"privacy-ledger.v1-backup-{time.time_ns()}.json")
        if not backup.exists():
            atomic_write_bytes(backup, raw)
        return backup

    def plan_noise(
        self,
        records: Sequence[str],
        *,
        run: str,
        sample_rate: float,
        steps_per_round: int,
        rounds: int,
        target_epsilon: float,
        budget_epsilon: float,
        delta: float,
        accountant: str = "rdp",
        server_round: int | None = None,
    ) -> NoisePlan:
        """Calibrate z so that the worst of ``records`` reaches min(target, budget) when the run's rounds end.

        What each record has already spent (earlier runs, a record's rounds before an edit of other
        rows, and this run's own charges) is part of its composition, and z is the largest that any
        distinct history among ``records`` needs, so every record lands on the goal or below it,
        never above. The plan is stored under ``run`` and returned on later calls.

        With ``server_round`` (r of ``rounds`` = R, the run's planned rounds), the stored plan is
        returned only while it still covers the run: c dp-sgd charges of this run so far plus the
        R - r + 1 rounds left must not exceed the charges it was made for. A round charged and then
        redone (the coordinator crashed after the site trained, and resumed from an earlier
        checkpoint), more rounds, or another q, steps, goal, delta or accountant re-plans z for the
        R - r + 1 rounds left on top of everything spent, so the run still ends within the goal.
        Without ``server_round`` the stored plan is returned as is.

        Raises:
            PrivacyBudgetError: a record has already spent the goal, or what is left cannot cover the
                rounds left at any noise the accountant can certify; no privacy is left for the run.
        """
        goal = min(target_epsilon, budget_epsilon)
        existing = self.plan(run)
        if existing is not None and server_round is None:
            return existing
        unique = _record_set(records, what=f"the noise plan of run {run}")
        state = self._load()
        if server_round is not None and not 1 <= server_round <= rounds:
            raise ConfigError(f"`server_round` must be in 1..rounds ({rounds}), got {server_round!r}.")
        left = rounds if server_round is None else rounds - server_round + 1
        charged = self._run_charges(state, unique, run)
        if existing is not None and self._covers(existing, charged=charged, left=left, sample_rate=sample_rate,
                                                 steps_per_round=steps_per_round, goal=goal, delta=delta, accountant=accountant):
            return existing
        plan = self._calibrate(state, unique, run=run, sample_rate=sample_rate, steps_per_round=steps_per_round, rounds=left,
                               goal=goal, budget_epsilon=budget_epsilon, target_epsilon=target_epsilon, delta=delta,
                               accountant=accountant, charged=charged)
        with self._locked() as locked:
            stored = locked.plans.get(run)
            if stored is not None and stored != existing and self._covers(
                    stored, charged=charged, left=left, sample_rate=sample_rate, steps_per_round=steps_per_round, goal=goal,
                    delta=delta, accountant=accountant):
                plan = stored  # a concurrent planner of the same run got there first, and its plan covers this call
            else:
                locked.plans[run] = plan
        if existing is not None and plan != existing:
            logger.warning("run %s: re-planned noise at round %s: %d dp-sgd rounds already charged and %d left (the plan "
                           "covered %d); z %.4f -> %.4f so the worst record still ends at epsilon %.3f",
                           run, server_round, charged, left, existing.charged_before + existing.rounds,
                           existing.noise_multiplier, plan.noise_multiplier, goal)
        logger.info("run %s: calibrated z=%.4f for %d rounds x %d steps at q=%.4f so the worst of %d records "
                    "reaches epsilon %.3f", run, plan.noise_multiplier, left, steps_per_round, sample_rate, len(unique), goal)
        return plan

    @staticmethod
    def _run_charges(state: LedgerState, records: frozenset[str], run: str) -> int:
        """The most dp-sgd charges of ``run`` in any one history among ``records``."""
        return max((sum(1 for i in h if state.charges[i].run == run and state.charges[i].kind == "dp-sgd")
                    for h in state.histories(records)), default=0)

    @staticmethod
    def _covers(plan: NoisePlan, *, charged: int, left: int, sample_rate: float, steps_per_round: int, goal: float,
                delta: float, accountant: str) -> bool:
        same = (plan.sample_rate, plan.steps_per_round, plan.target_epsilon, plan.delta, plan.accountant) == (
            sample_rate, steps_per_round, goal, delta, accountant)
        return same and charged + left <= plan.charged_before + plan.rounds

    def _calibrate(self, state: LedgerState, unique: frozenset[str], *, run: str, sample_rate: float, steps_per_round: int,
                   rounds: int, goal: float, budget_epsilon: float, target_epsilon: float, delta: float, accountant: str,
                   charged: int) -> NoisePlan:
        histories = state.maximal(state.histories(unique))
        spent = {h: state.epsilon(h, delta=delta, accountant=accountant) for h in histories}
        worst = max(spent.values())
        if worst >= goal:
            raise PrivacyBudgetError(
                f"{sum(1 for h in histories if spent[h] >= goal)} record histories have spent epsilon up to {worst:.3f} "
                f"of this site's budget {budget_epsilon:g} (run target {target_epsilon:g}); no privacy is left for run {run}.",
                budget=budget_epsilon, spent=worst, requested=goal - worst,
            )

        steps = steps_per_round * rounds

        def calibrate(h: frozenset[int]) -> float:
            try:
                return calibrate_noise_multiplier(target_epsilon=goal, delta=delta, sample_rate=sample_rate, steps=steps,
                                                  spent=state.segments(h), accountant=accountant)
            except ConfigError as err:  # so little is left that no certifiable z covers the rounds left
                raise PrivacyBudgetError(
                    f"run {run}: the worst record has spent epsilon {spent[h]:.3f} of {goal:g}; what is left cannot cover "
                    f"{rounds} more rounds of {steps_per_round} steps at q={sample_rate:.4f} ({err}).",
                    budget=budget_epsilon, spent=spent[h], requested=goal - spent[h],
                ) from None

        # Calibrate for the history that has spent most, then check the other maximal ones at that z:
        # with different q and z in their pasts, another may need more noise. Epsilon falls as z
        # grows, so raising z for one never breaks those already checked.
        by_spend = sorted(histories, key=lambda h: spent[h], reverse=True)
        z = calibrate(by_spend[0])
        for h in by_spend[1:]:
            planned = Segment(sample_rate=sample_rate, noise_multiplier=z, steps=steps)
            if epsilon([*state.segments(h), planned], delta=delta, accountant=accountant) > goal:
                z = max(z, calibrate(h))
        return NoisePlan(run=run, noise_multiplier=z, sample_rate=sample_rate, steps_per_round=steps_per_round,
                         rounds=rounds, target_epsilon=goal, delta=delta, accountant=accountant, charged_before=charged)

    def charge(
        self,
        records: Sequence[str],
        *,
        run: str,
        round: int,
        segment: Segment,
        clip_norm: float,
        delta: float,
        budget_epsilon: float,
        accountant: str = "rdp",
        kind: str = "dp-sgd",
    ) -> float:
        """Record a charge to ``records`` before training; returns the largest epsilon among them after it.

        Under the file lock: the spend of every distinct history among ``records`` is composed with
        ``segment``; if any would pass ``budget_epsilon`` nothing is written. Each history is
        accounted as in `spent_epsilon` with ``accountant`` None, this charge's accountant included.

        Raises:
            PrivacyBudgetError: a record would pass ``budget_epsilon``; nothing is written and no
                training may happen.
        """
        unique = _record_set(records, what=f"round {round} of run {run}")
        if not (budget_epsilon > 0 and math.isfinite(budget_epsilon)):
            raise ConfigError(f"`budget_epsilon` must be a finite number > 0, got {budget_epsilon!r}.")
        cohort = cohort_id(unique)
        new = Charge(cohort=cohort, run=run, round=round, kind=kind, sample_rate=segment.sample_rate,
                     noise_multiplier=segment.noise_multiplier, steps=segment.steps, clip_norm=clip_norm,
                     delta=delta, accountant=accountant, time=time.time())
        with self._locked() as state:
            after, worst = 0.0, frozenset[int]()
            for h in state.maximal(state.histories(unique)):
                h_after = state.epsilon(h, delta=delta, accountant=None, extra=new)
                if h_after >= after:
                    after, worst = h_after, h
            if after > budget_epsilon + _EPS_SLACK:
                before = state.epsilon(worst, delta=delta, accountant=None)
                raise PrivacyBudgetError(
                    f"{kind} round {round} of run {run} would raise the worst record's epsilon from {before:.3f} to "
                    f"{after:.3f}, past this site's budget {budget_epsilon:g} (delta={delta:g}); refused before training.",
                    budget=budget_epsilon, spent=before, requested=max(0.0, after - before),
                )
            state.add_cohort(cohort, unique)
            state.charges.append(new)
        return after

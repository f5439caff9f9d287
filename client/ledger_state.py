"""The privacy ledger's file and its state in memory: the format, the cohorts and histories, version 1.

`fedtune.client.ledger.PrivacyLedger` locks, reads and rewrites the file; this module says what the
file holds (`Charge`, `NoisePlan`, the cohorts), reads it (`read_state`), migrates a version-1 file,
and answers for a set of records which charges apply to each (its *history*) and what a history
has spent (`LedgerState`).

One JSON file in the site's own state folder (format version 2):
    cohorts    {id: {records: sorted record digests, all_records: false}}, each set stored once;
               id = digest of the sorted set. The cohort ``all-records`` ({all_records: true})
               applies to every record, seen or not (migrated charges).
    charges    [{cohort, run, round, kind, sample_rate, noise_multiplier, steps, clip_norm, delta,
               accountant, time}], kind "dp-sgd" or "statistics" (Gaussian noise on released counts
               or sums: q = 1, z = sigma / sensitivity, one step per release, clip_norm 0).
    plans      {run: NoisePlan}, the noise calibrated once per run.
    migrations [what was converted from an older format, when, and where its backup is].
    derived    {record: sorted source records} (version 3, only once there is one): the record was made
               from those (``site prepare`` normalised, redacted or merged them). Links join records
               into *lineages* (connected components, in both directions); every record of a lineage
               is charged the composition of every charge that touched any record of it, so editing a
               row, or going back to the unedited file, never resets its spend.
    derivations [when links were added, by what, and how many]: the audit trail of ``derived``.

A ledger with no link is written as version 2, as before, so an older fedtune still reads it; one
with links is version 3, which an older fedtune refuses rather than reading it without its links.

Version 1 keyed everything by one fingerprint of the whole file. It is migrated conservatively: all
its charges, of every fingerprint, go to ``all-records``, so no record ever spent less than it did
before; the version-1 file is kept beside the ledger as ``privacy-ledger.v1-backup.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from fedtune.common.accounting import ACCOUNTANTS, Segment, epsilon
from fedtune.common.errors import ConfigError

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
V1_BACKUP_FILE = "privacy-ledger.v1-backup.json"
ALL_RECORDS = "all-records"
"""The cohort id of charges that apply to every record (those migrated from a version-1 ledger)."""
KINDS = ("dp-sgd", "statistics")
_VERSION = 2
_VERSION_LINKED = 3  # a ledger with lineage links (``derived``): older readers must refuse it, not drop the links


@dataclass(frozen=True, kw_only=True)
class Charge:
    """One charge to a cohort of records, with every knob needed to re-derive its cost."""

    cohort: str
    run: str
    round: int
    kind: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    time: float

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"charge `kind` must be one of {list(KINDS)}, got {self.kind!r}.")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"charge `accountant` must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}.")
        if self.kind == "dp-sgd" and not self.clip_norm > 0:
            problems.append(f"a dp-sgd charge needs `clip_norm` > 0, got {self.clip_norm!r}.")
        if problems:
            raise ConfigError(problems)
        Segment(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=self.steps)  # validates q, z, T

    @property
    def segment(self) -> Segment:
        return Segment(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=self.steps)


@dataclass(frozen=True, kw_only=True)
class NoisePlan:
    """The noise calibrated for a run: reaching ``target_epsilon`` after ``rounds`` x ``steps`` more.

    ``charged_before`` is how many dp-sgd rounds this run had already charged when the plan was
    made (0 for a plan made before round 1; more when a resumed run redid a round and the site
    re-planned the rounds left): the plan covers ``charged_before + rounds`` charges of the run.
    """

    run: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    charged_before: int = 0


@dataclass(frozen=True, kw_only=True)
class _Migration:
    from_version: int
    time: float
    backup: str
    datasets: int
    charges: int


@dataclass(frozen=True, kw_only=True)
class Derivation:
    """One batch of lineage links: when, by what (e.g. "site prepare notes.csv -> notes.clean.csv"), how many."""

    time: float
    what: str
    links: int


@dataclass(kw_only=True)
class LedgerState:
    """The ledger in memory. ``cohorts[ALL_RECORDS]`` is None: it holds every record."""

    cohorts: dict[str, frozenset[str] | None] = field(default_factory=dict)
    charges: list[Charge] = field(default_factory=list)
    plans: dict[str, NoisePlan] = field(default_factory=dict)
    migrations: list[_Migration] = field(default_factory=list)
    v1_bytes: bytes | None = None  # set when read from a version-1 file, to back it up on first write
    sorted_records: dict[str, list[str]] = field(default_factory=dict)  # each cohort as stored: sorting is costly
    derived: dict[str, frozenset[str]] = field(default_factory=dict)  # record -> the records it was made from
    derivations: list[Derivation] = field(default_factory=list)
    _lineage: dict[str, frozenset[str]] | None = field(default=None, repr=False)  # record -> its lineage; built when asked

    def add_links(self, sources_of: dict[str, frozenset[str]], *, what: str, time: float) -> int:
        """Link each record to the records it was made from (its own digest among them is ignored).

        Links only accumulate: a record linked again keeps its earlier sources too. Returns how many
        (record, source) links are new.
        """
        new = 0
        for record, sources in sources_of.items():
            before = self.derived.get(record, frozenset())
            after = before.union(sources) - {record}
            if after != before:
                new += len(after) - len(before)
                self.derived[record] = after
        if new:
            self.derivations.append(Derivation(time=time, what=what, links=new))
            self._lineage = None
        return new

    def lineage(self) -> dict[str, frozenset[str]]:
        """Every linked record -> all records of its lineage (itself included); unlinked records are absent."""
        if self._lineage is None:
            parent: dict[str, str] = {}

            def root(x: str) -> str:
                while parent.setdefault(x, x) != x:
                    parent[x] = parent[parent[x]]  # path halving keeps long chains cheap
                    x = parent[x]
                return x

            for record, sources in self.derived.items():
                for source in sources:
                    a, b = root(record), root(source)
                    if a != b:
                        parent[a] = b
            roots = {x: root(x) for x in list(parent)}  # once per record: root() is the costly step
            members: dict[str, set[str]] = {}
            for x, r in roots.items():
                members.setdefault(r, set()).add(x)
            frozen = {r: frozenset(m) for r, m in members.items()}  # one object per lineage, shared by its records
            self._lineage = {x: frozen[r] for x, r in roots.items()}
        return self._lineage

    def expand(self, records: Iterable[str]) -> set[str]:
        """``records`` and every record of their lineages."""
        lineage = self.lineage()
        out = set(records)
        for r in [r for r in out if r in lineage]:
            out |= lineage[r]
        return out

    def add_cohort(self, cid: str, records: frozenset[str]) -> None:
        if cid not in self.cohorts:
            self.cohorts[cid] = records
            self.sorted_records[cid] = sorted(records)

    def to_bytes(self) -> bytes:
        # One line per cohort, charge, plan and migration: readable and diffable, and every line is
        # encoded by json's C encoder (with ``indent`` it falls back to pure Python: 10x slower).
        def block(items: Iterable[tuple[str | None, Any]], brackets: str) -> str:
            lines = [(f"{json.dumps(k)}: " if k is not None else "") + json.dumps(v, sort_keys=True) for k, v in items]
            return brackets[0] + ("\n  " + ",\n  ".join(lines) + "\n " if lines else "") + brackets[1]

        cohorts = block(((cid, {"all_records": rec is None, "records": self.sorted_records.get(cid, [])})
                         for cid, rec in sorted(self.cohorts.items())), "{}")
        charges = block(((None, asdict(c)) for c in self.charges), "[]")
        plans = block(((run, asdict(p)) for run, p in sorted(self.plans.items())), "{}")
        migrations = block(((None, asdict(m)) for m in self.migrations), "[]")
        linked = ""
        if self.derived:
            derived = block(((r, sorted(s)) for r, s in sorted(self.derived.items())), "{}")
            derivations = block(((None, asdict(d)) for d in self.derivations), "[]")
            linked = f' "derivations": {derivations},\n "derived": {derived},\n'
        version = _VERSION_LINKED if self.derived else _VERSION
        text = (f'{{"version": {version},\n "charges": {charges},\n "plans": {plans},\n "migrations": {migrations},\n'
                f'{linked} "cohorts": {cohorts}}}\n')
        return text.encode("utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerState:
        named = {c["cohort"] for c in data["charges"]}
        if not named <= data["cohorts"].keys():
            raise KeyError(f"charges name cohorts that are not stored: {sorted(named - data['cohorts'].keys())[:3]}")
        return cls(
            cohorts={cid: None if c["all_records"] else frozenset(c["records"]) for cid, c in data["cohorts"].items()},
            sorted_records={cid: sorted(c["records"]) for cid, c in data["cohorts"].items() if not c["all_records"]},
            charges=[Charge(**c) for c in data["charges"]],
            plans={run: NoisePlan(**p) for run, p in data["plans"].items()},
            migrations=[_Migration(**m) for m in data.get("migrations", [])],
            derived={r: frozenset(s) for r, s in data.get("derived", {}).items()},
            derivations=[Derivation(**d) for d in data.get("derivations", [])],
        )

    def histories(self, records: Iterable[str]) -> Counter[frozenset[int]]:
        """Distinct records grouped by their history (the indexes of the charges that apply): {history: count}.

        Records that share their cohorts share their history, so a dataset of any size has only as
        many histories as there are distinct patterns of cohort membership. A linked record's history
        is the union of the histories of every record of its lineage (see the module docstring).
        """
        records = set(records)
        lineage = self.lineage() if self.derived else {}
        linked = records.intersection(lineage)
        history = self._charges_by_cohort()
        out: Counter[frozenset[int]] = Counter()
        for pattern, members in self._groups(records - linked).items():
            out[history(pattern)] += len(members)
        if linked:
            # Once per lineage, not per record of it: records of one lineage share its history, and a
            # lineage of many merged duplicates would otherwise be walked once for each of them.
            per_lineage = Counter(lineage[r] for r in linked)  # the lineage's own frozenset: hashed once
            of: dict[str, frozenset[int]] = {}
            for pattern, members in self._groups(set().union(*per_lineage)).items():
                h = history(pattern)
                of.update(dict.fromkeys(members, h))
            for lin, n in per_lineage.items():
                out[frozenset().union(*(of[m] for m in lin))] += n
        return out

    def _groups(self, records: set[str]) -> dict[tuple[str, ...], set[str]]:
        """``records`` grouped by the cohorts they belong to: {cohort ids: members}."""
        # Refine one group cohort by cohort: set operations in C, never a Python loop over records.
        groups: dict[tuple[str, ...], set[str]] = {(): records}
        for cid, rec in self.cohorts.items():
            if rec is None:
                continue
            refined: dict[tuple[str, ...], set[str]] = {}
            for pattern, members in groups.items():
                inside = members.intersection(rec)
                if inside:
                    refined[(*pattern, cid)] = inside
                if len(inside) < len(members):
                    refined[pattern] = members.difference(inside)
            groups = refined
        return {pattern: members for pattern, members in groups.items() if members}

    def _charges_by_cohort(self) -> Callable[[tuple[str, ...]], frozenset[int]]:
        """A function from a pattern of cohorts to its history: their charges and those of ``all-records``."""
        by_cohort: dict[str, list[int]] = {}
        for i, c in enumerate(self.charges):
            by_cohort.setdefault(c.cohort, []).append(i)
        always = frozenset(by_cohort.get(ALL_RECORDS, []))
        return lambda pattern: always.union(*(by_cohort.get(cid, ()) for cid in pattern))

    @staticmethod
    def maximal(histories: Iterable[frozenset[int]]) -> list[frozenset[int]]:
        """The histories that are no subset of another.

        Only these need accounting for a maximum: a record whose charges are a subset of another's
        has lost at most as much privacy (composition only adds loss), so the other's bound holds
        for it too. This keeps the work small when runs used different splits of the same rows.
        """
        kept: list[frozenset[int]] = []
        for h in sorted(histories, key=len, reverse=True):
            if not any(h <= k for k in kept):
                kept.append(h)
        return kept

    def segments(self, history: frozenset[int]) -> list[Segment]:
        return [self.charges[i].segment for i in sorted(history)]

    def epsilon(self, history: frozenset[int], *, delta: float, accountant: str | None, extra: Charge | None = None) -> float:
        """Epsilon of a history (plus ``extra``): with ``accountant`` None, the smallest of the bounds of
        the accountants its charges were approved under, each over the whole history (each is a valid
        upper bound, so the smallest is one too)."""
        charges = [self.charges[i] for i in sorted(history)] + ([extra] if extra else [])
        if not charges:
            return 0.0
        names = [accountant] if accountant else sorted({c.accountant for c in charges})
        segments = [c.segment for c in charges]
        return min(epsilon(segments, delta=delta, accountant=name) for name in names)


def cohort_id(records: frozenset[str]) -> str:
    """The id of the cohort of ``records``: a digest of the sorted set, the same for the same records."""
    digest = hashlib.sha256(b"fedtune.cohort.v1\0")
    for r in sorted(records):
        data = r.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:32]


def _migrate_v1(data: dict[str, Any], raw: bytes, path: Path) -> LedgerState:
    """Every version-1 charge, whatever fingerprint it was keyed by, applies to every record."""
    state = LedgerState(v1_bytes=raw)
    datasets: dict[str, Any] = data.get("datasets", {})
    old = [c for entry in datasets.values() for c in entry.get("charges", [])]
    state.charges = sorted((Charge(cohort=ALL_RECORDS, kind="dp-sgd", **c) for c in old), key=lambda c: c.time)
    if state.charges:
        state.cohorts[ALL_RECORDS] = None
    for entry in datasets.values():
        for run, raw_plan in entry.get("plans", {}).items():
            plan = NoisePlan(**raw_plan)
            kept = state.plans.get(run)
            # Two fingerprints planned the same run: keep the more noise (the plan is only advice;
            # every charge is still checked against the budget).
            if kept is None or plan.noise_multiplier > kept.noise_multiplier:
                state.plans[run] = plan
    state.migrations.append(_Migration(from_version=1, time=time.time(), backup=V1_BACKUP_FILE,
                                       datasets=len(datasets), charges=len(state.charges)))
    logger.info("%s is a version-1 ledger: its %d charges (%d datasets) count for every record; "
                "it is converted on the next write.", path, len(state.charges), len(datasets))
    return state


def read_state(raw: bytes, path: Path) -> LedgerState:
    """The state stored in ``raw``, the bytes of the ledger at ``path``; a version-1 ledger is migrated.

    Raises:
        ConfigError: the ledger is of another version or unreadable (it is never reset).
    """
    try:
        data = json.loads(raw)
        version = data.get("version") if isinstance(data, dict) else None
        if version == 1:
            return _migrate_v1(data, raw, path)
        if version not in (_VERSION, _VERSION_LINKED):
            raise ConfigError(f"privacy ledger {path} has version {version!r}, expected 1, {_VERSION} or {_VERSION_LINKED}; "
                              "it was written by another fedtune: upgrade this one.")
        if version == _VERSION_LINKED and not data.get("derived"):
            raise KeyError("a version-3 ledger without its `derived` links")  # never read one as if it had none
        return LedgerState.from_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        # Never silently reset a ledger: that would forget spent privacy.
        raise ConfigError(f"privacy ledger {path} is unreadable ({type(err).__name__}: {err}); "
                          "restore it from a backup.") from None

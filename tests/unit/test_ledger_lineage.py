"""The privacy ledger's lineage links (`PrivacyLedger.link`): stored, read back, composed, never a reset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client.ledger import PrivacyLedger
from fedtune.client.ledger_state import LEDGER_FILE
from fedtune.common.accounting import Segment
from fedtune.common.data import record_digests
from fedtune.common.errors import ConfigError

SEG = Segment(sample_rate=0.01, noise_multiplier=1.0, steps=100)
DELTA = 1e-5
A, B, C, D = record_digests(["a", "b", "c", "d"], ["x"] * 4)


def _charge(ledger: PrivacyLedger, records: list[str], r: int = 1) -> float:
    return ledger.charge(records, run="run-1", round=r, segment=SEG, clip_norm=1.0, delta=DELTA, budget_epsilon=100.0)


def test_a_ledger_without_links_is_still_written_as_version_2_and_keeps_every_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    spent = _charge(ledger, [A, B])
    before = (tmp_path / LEDGER_FILE).read_bytes()

    assert ledger.link({A: [A]}, what="nothing changed") == 0  # a record made from itself only is no link

    assert (tmp_path / LEDGER_FILE).read_bytes() == before and json.loads(before)["version"] == 2
    assert ledger.spent_epsilon([A], delta=DELTA) == ledger.spent_epsilon([B], delta=DELTA) == spent


def test_links_are_stored_as_version_3_read_back_and_counted_both_ways(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    spent = _charge(ledger, [A])

    assert ledger.link({C: [A, B]}, what="site prepare notes.csv -> notes.clean.csv") == 2

    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert data["version"] == 3 and data["derived"] == {C: sorted([A, B])}
    assert data["derivations"][0]["what"] == "site prepare notes.csv -> notes.clean.csv"
    reread = PrivacyLedger(tmp_path)
    assert reread.spent_epsilon([C], delta=DELTA) == spent  # from its source
    assert reread.spent_epsilon([B], delta=DELTA) == spent  # B and A are one lineage through C
    assert reread.spent_epsilon([D], delta=DELTA) == 0.0  # unlinked: a hand-edited row still starts at zero
    assert [c.cohort for c in reread.charges([C])] == [c.cohort for c in reread.charges([A])]
    assert reread.sources([C]) == {A, B}
    later = _charge(reread, [C], r=2)  # a charge to the derived record counts for its sources too
    assert reread.spent_epsilon([A], delta=DELTA) == later > spent


def test_a_version_3_ledger_without_its_links_is_refused_not_read_as_unlinked(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, [A])
    ledger.link({C: [A]}, what="t")
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    del data["derived"]
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))

    with pytest.raises(ConfigError, match="unreadable.*derived"):
        ledger.spent_epsilon([C], delta=DELTA)


def test_the_summary_counts_a_linked_record_under_the_charges_of_its_sources(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, [A, B])
    ledger.link({C: [A], D: [B]}, what="t")

    summary = ledger.summary([C, D], delta=DELTA)

    assert summary.records == 2 and summary.never_spent == 0 and summary.at_max == 2
    assert [row.records for row in summary.charges] == [2] and summary.other_charges == 0


def test_linking_again_what_is_linked_leaves_the_file_untouched(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, [A])
    assert ledger.link({C: [A, B]}, what="first prepare") == 2
    path = tmp_path / LEDGER_FILE
    before, stat = path.read_bytes(), path.stat()

    assert ledger.link({C: [A]}, what="a rerun of prepare") == 0  # a subset of what is there already

    assert path.read_bytes() == before and path.stat().st_ino == stat.st_ino  # an atomic rewrite would be a new inode
    assert ledger.link({C: [D]}, what="a new source") == 1
    assert path.stat().st_ino != stat.st_ino


def test_records_of_one_lineage_each_count_once_beside_two_other_lineages_and_a_plain_record(tmp_path: Path) -> None:
    """Histories and the summary take each lineage once (not once per record of it) and still count its every record."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from fedtune.common.accounting import RDP_ORDERS

    E, F, G, H = record_digests(["e", "f", "g", "h"], ["x"] * 4)
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, [A, B, C, E])  # run 1: the raw rows
    ledger.link({D: [A, B, C], F: [E]}, what="three duplicates kept as D; E cleaned into F")  # lineages {A,B,C,D}, {E,F}
    _charge(ledger, [D, F, G], r=2)  # run 2: the cleaned file (G is a new row, in no lineage)

    wanted = [A, B, C, D, E, G, H]  # 4 of one lineage, 1 of another, 1 plain record, 1 never charged
    summary = ledger.summary(wanted, delta=DELTA)

    acc = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))  # both charges, composed by an independent accountant
    acc.compose(dp_accounting.PoissonSampledDpEvent(SEG.sample_rate, dp_accounting.GaussianDpEvent(SEG.noise_multiplier)), 2 * SEG.steps)
    assert ledger.spent_epsilon(wanted, delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    assert summary.records == 7 and summary.at_max == 5 and summary.never_spent == 1  # A, B, C, D, E both; G one; H none
    # Run 1 touched A, B, C, E directly and D through its lineage; run 2 touched D, G and (through theirs) A, B, C, E.
    assert [row.records for row in summary.charges] == [5, 6] and summary.other_charges == 0

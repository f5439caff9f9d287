"""`site prepare` and the privacy ledger: a cleaned row keeps the spend of the rows it came from.

The expected epsilons come from Google's dp-accounting (no code shared with fedtune's accountant) or
from the figure the ledger reported when the charge was made, never recomputed by the code under test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedtune.client.check import site_record_digests
from fedtune.client.daemon import load_site_config
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.prepare import Columns, prepare_file, prepare_site_data
from fedtune.common.accounting import RDP_ORDERS, Segment
from fedtune.common.causal_lm import LMDataSettings, lm_record_digests, load_lm_table
from fedtune.common.data import load_table, record_digests
from fedtune.common.errors import PrivacyBudgetError

SEG_1 = Segment(sample_rate=0.01, noise_multiplier=1.0, steps=100)
SEG_2 = Segment(sample_rate=0.005, noise_multiplier=1.2, steps=200)

CHEST = ("Patient reports crushing chest pressure on exertion for three days, radiating to the left arm, "
         "relieved by rest; history of hypertension.")
STROKE = "Sudden weakness of the right arm and slurred speech since this morning, history of diabetes."
KNEE = "Knee swollen and painful after a fall while skiing yesterday, unable to bear weight, no numbness."


def _dp_accounting_epsilon(history: list[Segment], delta: float) -> float:
    """Epsilon of a composition from dp-accounting's RDP accountant on fedtune's orders (q <= 0.01, z >= 1:
    where it agrees with exact RDP to ~1e-7, see test_ledger.py)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    for s in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)), s.steps)
    return float(acc.get_epsilon(delta))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def _site(tmp_path: Path, data: Path, extra: str = "") -> Path:
    toml = tmp_path / "site.toml"
    toml.write_text(f'[site]\nname = "h1"\ncoordinator = "127.0.0.1:9092"\ninsecure = true\n\n[data]\npath = "{data}"\n{extra}',
                    encoding="utf-8")
    return toml


def _charge(ledger: PrivacyLedger, records: list[str], seg: Segment, *, run: str, delta: float) -> float:
    return ledger.charge(records, run=run, round=1, segment=seg, clip_norm=1.0, delta=delta, budget_epsilon=100.0)


def test_rows_that_prepare_normalises_or_redacts_keep_their_spend_in_the_budget_check(tmp_path: Path) -> None:
    # Prepare: every row trained on once; row 1 has stray whitespace, row 2 an e-mail address the site redacts.
    raw = _write_csv(tmp_path / "notes.csv", [("  " + CHEST.replace(" ", "  ") + " ", "cardiology"),
                                             (STROKE + " Contact ann.lee@example.org.", "neurology"), (KNEE, "orthopedics")])
    site = load_site_config(_site(tmp_path, raw, '\n[deid]\nenabled = true\n'))
    ledger = PrivacyLedger(site.state_dir)
    spent = _charge(ledger, site_record_digests(site), SEG_1, run="run-1", delta=site.delta)
    assert spent == pytest.approx(_dp_accounting_epsilon([SEG_1], site.delta), rel=1e-6)

    result = prepare_site_data(site, plot=False)

    cleaned = load_site_config(_site(tmp_path, result.out, '\n[deid]\nenabled = true\n'))
    records = site_record_digests(cleaned)  # the training path's keys of the cleaned file
    text = result.out.read_text(encoding="utf-8")
    assert "example.org" not in text and "  " not in text  # both rows did change: new digests
    assert not set(records) & set(site_record_digests(site)) - {record_digests([KNEE], ["orthopedics"])[0]}
    summary = ledger.summary(records, delta=site.delta)  # what `site check` and `site ledger` show
    assert summary.max_epsilon == pytest.approx(spent, rel=1e-12) and summary.never_spent == 0
    assert [row.records for row in summary.charges] == [3]
    # A budget that one more round fits from zero, but not on top of the inherited spend: refused before training.
    budget = (spent + _dp_accounting_epsilon([SEG_1, SEG_1], site.delta)) / 2
    with pytest.raises(PrivacyBudgetError):
        ledger.charge(records, run="run-2", round=1, segment=SEG_1, clip_norm=1.0, delta=site.delta, budget_epsilon=budget)
    assert any("keep their spend" in w for w in result.report.warnings)


def test_a_row_kept_in_place_of_duplicates_carries_the_composed_spend_of_all_of_them(tmp_path: Path) -> None:
    # Row 1 trained in run 1, its whitespace variant (row 2, an exact duplicate once normalised) in run 2,
    # row 3 (a near duplicate of row 1: one word) in run 2 as well, row 4 in both runs.
    rows = [(CHEST, "cardiology"), (CHEST.replace(" ", "   "), "cardiology"), (CHEST.replace("crushing", "squeezing"), "cardiology"),
            (KNEE, "orthopedics")]
    raw = _write_csv(tmp_path / "notes.csv", rows)
    site = load_site_config(_site(tmp_path, raw))
    digests = site_record_digests(site)
    ledger = PrivacyLedger(site.state_dir)
    _charge(ledger, [digests[0], digests[3]], SEG_1, run="run-1", delta=site.delta)
    _charge(ledger, [digests[1], digests[2], digests[3]], SEG_2, run="run-2", delta=site.delta)

    result = prepare_site_data(site, plot=False)

    assert result.report.dropped.exact_duplicate == (2,) and result.report.dropped.near_duplicate == (3,)
    kept = record_digests([CHEST], ["cardiology"])[0]  # row 1 is unchanged, but now stands for rows 2 and 3 too
    both = _dp_accounting_epsilon([SEG_1, SEG_2], site.delta)
    assert ledger.spent_epsilon([kept], delta=site.delta) == pytest.approx(both, rel=1e-6)
    # Not the sum: a charge that several sources took part in counts once (row 4 was in both runs, as one record).
    assert ledger.spent_epsilon(site_record_digests(load_site_config(_site(tmp_path, result.out))), delta=site.delta) == \
        pytest.approx(both, rel=1e-6)


def test_prepare_reads_the_ledger_once_for_its_links_and_the_spend_it_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    import fedtune.client.ledger as ledger_module

    raw = _write_csv(tmp_path / "notes.csv", [(CHEST + "  ", "cardiology"), (KNEE, "orthopedics")])
    site = load_site_config(_site(tmp_path, raw))
    _charge(PrivacyLedger(site.state_dir), site_record_digests(site), SEG_1, run="run-1", delta=site.delta)
    reads: list[Path] = []
    real = ledger_module.read_state

    def counted(raw_bytes, path):  # type: ignore[no-untyped-def]  # a spy: the real reader, counted
        reads.append(Path(path))
        return real(raw_bytes, path)

    monkeypatch.setattr(ledger_module, "read_state", counted)

    first = prepare_site_data(site, plot=False)
    links_added = len(reads)
    reads.clear()
    again = prepare_site_data(site, plot=False)  # the links are there already: nothing to write

    expected = _dp_accounting_epsilon([SEG_1], site.delta)
    for result in (first, again):
        [warning] = [w for w in result.report.warnings if "already spent epsilon" in w]
        assert float(re.search(r"spent epsilon ([0-9.]+)", warning).group(1)) == pytest.approx(expected, abs=1e-3)  # type: ignore[union-attr]
    assert links_added == 2, "one read to see the links are missing, one under the lock to add them; the spend reuses it"
    assert len(reads) == 1, "the links are all there: one read serves the check and the spend"


def test_going_back_to_the_raw_file_after_training_on_the_cleaned_one_resets_nothing(tmp_path: Path) -> None:
    raw = _write_csv(tmp_path / "notes.csv", [(CHEST + "  ", "cardiology"), (KNEE, "orthopedics")])
    site = load_site_config(_site(tmp_path, raw))
    result = prepare_site_data(site, plot=False)
    ledger = PrivacyLedger(site.state_dir)
    spent = _charge(ledger, site_record_digests(load_site_config(_site(tmp_path, result.out))), SEG_2, run="run-1",
                    delta=site.delta)

    changed = record_digests([CHEST + "  "], ["cardiology"])[0]  # the raw row that prepare normalised
    assert ledger.spent_epsilon([changed], delta=site.delta) == pytest.approx(spent, rel=1e-12)


def test_chats_that_prepare_normalises_keep_their_spend(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fedtune.common.model import default_base_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_base_model_dir()))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    chats = [
        [{"role": "user", "content": "Summarise:  chest pain\u200b for 3 days."}, {"role": "assistant", "content": "Chest pain,  3 days."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise: knee pain."},
         {"role": "assistant", "content": "Knee pain."}],
    ]
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"chat": c}) + "\n" for c in chats), encoding="utf-8")
    settings = LMDataSettings(messages_column="chat")
    ledger = PrivacyLedger(tmp_path / "state")
    delta = 1e-5
    spent = _charge(ledger, lm_record_digests(load_lm_table(source, settings)), SEG_1, run="run-1", delta=delta)

    result = prepare_file(source, tmp_path / "chats.clean.jsonl", Columns(task="causal-lm", messages="chat"),
                          tokenizer=tokenizer, tokenizer_name="minilm+template", ledger=ledger, delta=delta, plot=False)

    cleaned = lm_record_digests(load_lm_table(result.out, settings))
    assert not set(cleaned) & set(lm_record_digests(load_lm_table(source, settings))) - {cleaned[1]}  # chat 1 changed
    assert ledger.spent_epsilon(cleaned[:1], delta=delta) == pytest.approx(spent, rel=1e-12)
    assert spent == pytest.approx(_dp_accounting_epsilon([SEG_1], delta), rel=1e-6)
    assert any(f"already spent epsilon {spent:.3f}" in w for w in result.report.warnings)


def test_prompt_response_rows_that_prepare_normalises_keep_their_spend(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fedtune.common.model import default_base_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_base_model_dir()))
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "Summarise:\r\n chest pain ", "response": "Chest  pain."}) + "\n", encoding="utf-8")
    ledger = PrivacyLedger(tmp_path / "state")
    spent = _charge(ledger, lm_record_digests(load_lm_table(source)), SEG_2, run="run-1", delta=1e-5)

    result = prepare_file(source, tmp_path / "pairs.clean.jsonl", Columns(task="causal-lm"), tokenizer=tokenizer,
                          tokenizer_name="minilm", ledger=ledger, delta=1e-5, plot=False)

    cleaned = lm_record_digests(load_lm_table(result.out))
    assert cleaned != lm_record_digests(load_lm_table(source))
    assert ledger.spent_epsilon(cleaned, delta=1e-5) == pytest.approx(spent, rel=1e-12)


def test_a_file_prepared_before_any_training_links_nothing_that_costs(tmp_path: Path) -> None:
    """No ledger yet: prepare still links (a later run on the raw file must count for the cleaned rows)."""
    raw = _write_csv(tmp_path / "notes.csv", [(CHEST + " ", "cardiology"), (KNEE, "orthopedics")])
    site = load_site_config(_site(tmp_path, raw))

    result = prepare_site_data(site, plot=False)

    ledger = PrivacyLedger(site.state_dir)
    cleaned = site_record_digests(load_site_config(_site(tmp_path, result.out)))
    assert ledger.spent_epsilon(cleaned, delta=site.delta) == 0.0 and not result.report.warnings
    assert ledger.sources(cleaned) == {record_digests([CHEST + " "], ["cardiology"])[0]}
    table = load_table(raw)
    spent = _charge(ledger, record_digests(table.texts, table.labels), SEG_1, run="run-1", delta=site.delta)
    assert ledger.spent_epsilon(cleaned, delta=site.delta) == pytest.approx(spent, rel=1e-12)

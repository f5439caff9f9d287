"""`site prepare`: normalisation, empty / exact / near duplicates, label conflicts, lengths, the report, and
the input left untouched; `site check`'s warning when the data changed since."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedtune.client.check import check_prepared
from fedtune.client.daemon import load_site_config
from fedtune.client.prepare import Columns, PrepareSettings, default_out, prepare_file, prepare_site_data, report_path
from fedtune.common.data import load_table
from fedtune.common.errors import ConfigError, DataError

BASE = ("Patient reports crushing chest pressure on exertion for three days, radiating to the left arm, "
        "relieved by rest; history of hypertension.")
OTHER = "Sudden weakness of the right arm and slurred speech since this morning, history of diabetes and smoking."
THIRD = "Knee swollen and painful after a fall while skiing yesterday, unable to bear weight, no numbness."
FOURTH = "Burning upper abdominal pain after meals for two weeks, worse lying down, black stools since Sunday."

# (text, label); the comment says what prepare must do with the row (1-based data row numbers).
ROWS = [
    (BASE, "cardiology"),  # 1 kept
    ("  " + BASE.replace(" ", "  \t") + "\u200b ", "cardiology"),  # 2 same text after normalisation: exact duplicate
    (BASE.replace(",", "").replace(";", "."), "cardiology"),  # 3 punctuation only: near duplicate of 1
    (BASE.replace("crushing", "squeezing"), "cardiology"),  # 4 one word: near duplicate of 1
    (OTHER, "neurology"),  # 5 kept
    (THIRD, "orthopedics"),  # 6 same text as 7, other label: both dropped (conflict)
    (THIRD, "neurology"),  # 7
    ("   \u0007 ", "neurology"),  # 8 empty after normalisation
    (FOURTH, ""),  # 9 no label
    (OTHER.replace("right", "left"), "cardiology"),  # 10 near 5 with another label: kept, listed for review
    ("Chest\x00 pain.", "cardiology"),  # 11 kept, short (2 words), a control character removed
    (" ".join(["cough"] * 100), "pulmonology"),  # 12 kept; 102 tokens with [CLS]/[SEP] > max_length 64
]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "hospital"])
        w.writerows([(t, lab, f"h{i % 2}") for i, (t, lab) in enumerate(rows)])
    return path


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab, "hospital": f"h{i % 2}"}) + "\n"
                            for i, (t, lab) in enumerate(rows)), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[tuple[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows],
                             "hospital": [f"h{i % 2}" for i in range(len(rows))]}), path)
    return path


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from fedtune.common.model import default_base_model_dir

    return AutoTokenizer.from_pretrained(str(default_base_model_dir()))


def _prepare(source: Path, out: Path, tokenizer, **kwargs):  # type: ignore[no-untyped-def]
    return prepare_file(source, out, Columns(task="classification"), tokenizer=tokenizer, tokenizer_name="minilm", **kwargs)


def _site(tmp_path: Path, data: Path, extra: str = "") -> Path:
    toml = tmp_path / "site.toml"
    toml.write_text(f'[site]\nname = "h1"\ncoordinator = "127.0.0.1:9092"\ninsecure = true\n\n[data]\npath = "{data}"\n{extra}',
                    encoding="utf-8")
    return toml


def test_prepare_drops_empty_exact_near_and_conflicting_rows_and_names_them_by_row(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = _write_csv(tmp_path / "notes.csv", ROWS)

    result = _prepare(source, tmp_path / "notes.clean.csv", tokenizer)

    r = result.report
    assert r.dropped.empty == (8,) and r.dropped.missing_label == (9,)
    assert r.dropped.exact_duplicate == (2,)
    assert r.dropped.label_conflict == (6, 7) and r.label_conflicts == ((6, 7),)
    assert r.dropped.near_duplicate == (3, 4)
    assert {(p.row, p.kept) for p in r.duplicates_of} == {(2, 1), (3, 1), (4, 1)}
    assert [(p.row, p.kept) for p in r.near_pairs_with_other_labels] == [(10, 5)]
    assert r.short_rows == (11,)
    assert r.lengths.max_length == 64 and r.lengths.truncated_rows == (12,) and r.lengths.max == 102
    assert r.control_chars_removed == 3  # U+200B in row 2, BEL in row 8, NUL in row 11
    # before: the rows with a text and a label (not 8 or 9), duplicates still in
    assert r.labels_before == {"cardiology": 6, "neurology": 2, "orthopedics": 1, "pulmonology": 1}
    assert r.labels_after == {"cardiology": 3, "neurology": 1, "pulmonology": 1}
    assert set(r.rare_labels) == {"cardiology", "neurology", "pulmonology"}  # all under 10 rows
    assert (r.input.rows, r.output.rows) == (12, 5)

    cleaned = load_table(result.out, extra_columns=["hospital"])
    assert cleaned.texts == [BASE, OTHER, OTHER.replace("right", "left"), "Chest pain.", " ".join(["cough"] * 100)]
    assert cleaned.columns["hospital"] == ["h0", "h0", "h1", "h0", "h1"]  # other columns travel with their row
    assert result.plot_path is not None and result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_holds_counts_and_row_numbers_never_text(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = _write_csv(tmp_path / "notes.csv", ROWS)

    result = _prepare(source, tmp_path / "out.csv", tokenizer)

    text = result.report_path.read_text(encoding="utf-8")
    assert result.report_path == tmp_path / "out.csv.prepare.json"
    doc = json.loads(text)
    assert doc["dropped"]["near_duplicate"] == [3, 4] and doc["input"]["size"] == source.stat().st_size
    def strings(x):  # type: ignore[no-untyped-def]
        if isinstance(x, dict):
            return [s for k, v in x.items() for s in [k, *strings(v)]]
        return [s for v in x for s in strings(v)] if isinstance(x, list) else [x] if isinstance(x, str) else []

    values = " ".join(s for s in strings(doc) if s not in {"path", "tokenizer"} and not s.startswith(str(tmp_path)))
    words = {w for t, _ in ROWS for w in t.replace(",", " ").replace(".", " ").split() if len(w) > 4} - {"after"}
    assert words and not [w for w in words if w in values], "a word of the data is in the report"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_same_rows_in_another_format_give_the_same_duplicates_and_cleaned_rows(tmp_path: Path, tokenizer, fmt: str) -> None:  # type: ignore[no-untyped-def]
    as_csv = _prepare(_write_csv(tmp_path / "a.csv", ROWS), tmp_path / "a.clean.csv", tokenizer)
    writer = _write_jsonl if fmt == "jsonl" else _write_parquet
    other = _prepare(writer(tmp_path / f"b.{fmt}", ROWS), tmp_path / f"b.clean.{fmt}", tokenizer)
    # A CSV input written out as JSON Lines: --out picks the format.
    converted = _prepare(tmp_path / "a.csv", tmp_path / "a.clean.jsonl", tokenizer)

    assert other.report.dropped == as_csv.report.dropped == converted.report.dropped
    tables = [load_table(p, extra_columns=["hospital"]) for p in (as_csv.out, other.out, converted.out)]
    assert tables[0].texts == tables[1].texts == tables[2].texts
    assert tables[0].labels == tables[1].labels == tables[2].labels
    assert tables[0].columns == tables[1].columns == tables[2].columns


def test_prepare_never_modifies_its_input_and_refuses_to_overwrite_it(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = _write_csv(tmp_path / "notes.csv", ROWS)
    before = source.read_bytes()

    _prepare(source, default_out(source), tokenizer)
    _prepare(source, default_out(source), tokenizer)  # again: its own earlier output may be replaced

    assert source.read_bytes() == before
    with pytest.raises(ConfigError, match="would overwrite the input"):
        _prepare(source, source, tokenizer)
    link = tmp_path / "link.csv"
    link.symlink_to(source)
    with pytest.raises(ConfigError, match="would overwrite the input"):
        _prepare(source, link, tokenizer)  # another name for the same file
    assert source.read_bytes() == before


def test_an_existing_file_that_prepare_did_not_write_is_not_overwritten(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = _write_csv(tmp_path / "notes.csv", ROWS)
    precious = tmp_path / "labels.csv"
    precious.write_text("keep me\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not the output of an earlier `site prepare`"):
        _prepare(source, precious, tokenizer)
    assert precious.read_text(encoding="utf-8") == "keep me\n"
    _prepare(source, precious, tokenizer, overwrite=True)
    assert len(load_table(precious)) == 5


def test_a_bad_in_path_names_the_file(tmp_path: Path) -> None:
    site = load_site_config(_site(tmp_path, _write_csv(tmp_path / "notes.csv", ROWS)))
    missing = tmp_path / "exports" / "notes-2026.csv"

    with pytest.raises(DataError, match=f"--in {missing}: no such file"):
        prepare_site_data(site, data=missing)
    with pytest.raises(DataError, match=r"--in .*notes\.txt: unsupported file type '\.txt'"):
        bad = tmp_path / "notes.txt"
        bad.write_text("text,label\n", encoding="utf-8")
        prepare_site_data(site, data=bad)


def test_site_check_warns_when_the_data_changed_since_prepare(tmp_path: Path) -> None:
    raw = _write_csv(tmp_path / "notes.csv", ROWS)
    site = load_site_config(_site(tmp_path, raw))
    assert check_prepared(site) is None  # no report: site check prints no line for it

    result = prepare_site_data(site, plot=False)  # the site's own tokenizer (the packaged MiniLM)
    on_raw = check_prepared(site)
    cleaned_site = load_site_config(_site(tmp_path, result.out))
    unchanged = check_prepared(cleaned_site)
    assert on_raw is not None and unchanged is not None
    with result.out.open("a", encoding="utf-8") as f:
        f.write("A new note added by hand after prepare ran.,cardiology,h0\n")
    changed = check_prepared(cleaned_site)
    assert changed is not None

    assert result.out == tmp_path / "notes.clean.csv" and report_path(result.out).is_file()
    assert on_raw.warning and "is the raw file" in on_raw.detail and str(result.out) in on_raw.detail
    assert unchanged.ok and not unchanged.warning and "unchanged" in unchanged.detail
    assert changed.ok and changed.warning
    assert f"{result.out} (the cleaned file) changed since `site prepare`" in changed.detail
    raw.write_text(raw.read_text(encoding="utf-8") + "One more raw row.,neurology,h1\n", encoding="utf-8")
    raw_changed = check_prepared(site)
    assert raw_changed is not None and raw_changed.warning and "notes.csv (the raw file) changed" in raw_changed.detail


def test_causal_lm_rows_keep_the_line_breaks_of_prompts_and_responses(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = [
        ("Summarise this note.\r\nPt  reports   chest pain for 3 days.", "- chest pain\n\n\n\n- 3 days   \n- refer"),  # 1
        ("Summarise this note.\nPt reports chest pain for 3 days.", "- chest pain\n\n- 3 days\n- refer"),  # 2: 1 again
        ("Summarise this note.\nPt reports chest pain for 3 days.", "Chest pain, three days; refer to cardiology."),  # 3
        ("Summarise this note.\nSudden weakness of the right arm.", ""),  # 4 empty response
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows), encoding="utf-8")

    result = prepare_file(source, tmp_path / "pairs.clean.jsonl", Columns(task="causal-lm"), tokenizer=tokenizer,
                          tokenizer_name="minilm", settings=PrepareSettings(max_length=16))

    r = result.report
    assert r.dropped.exact_duplicate == (2,) and r.dropped.empty == (4,)
    assert r.prompts_with_several_responses == 1 and r.lengths.max_length == 16
    cleaned = [json.loads(line) for line in result.out.read_text(encoding="utf-8").splitlines()]
    assert cleaned[0] == {"prompt": "Summarise this note.\nPt reports chest pain for 3 days.",
                          "response": "- chest pain\n\n- 3 days\n- refer"}
    assert [c["response"] for c in cleaned] == ["- chest pain\n\n- 3 days\n- refer", rows[2][1]]


def test_the_deid_hook_runs_before_deduplication_and_counts_into_the_report(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import re

    def redact(texts):  # type: ignore[no-untyped-def]
        out, n = [], 0
        for t in texts:
            t, k = re.subn(r"\S+@\S+\.\w+", "<EMAIL>", t)
            out.append(t)
            n += k
        return out, {"EMAIL_ADDRESS": n}

    rows = [(OTHER + " Contact ann.lee@example.org.", "neurology"), (OTHER + " Contact bo.ng@example.net.", "neurology"),
            (THIRD, "orthopedics")]
    source = _write_csv(tmp_path / "notes.csv", rows)

    result = _prepare(source, tmp_path / "out.csv", tokenizer, deid=redact)

    assert result.report.deid.enabled and result.report.deid.counts == {"EMAIL_ADDRESS": 2}
    assert result.report.dropped.exact_duplicate == (2,)  # equal once redacted
    assert "example" not in result.out.read_text(encoding="utf-8")


def test_a_site_with_deid_enabled_prepares_redacted_rows(tmp_path: Path) -> None:
    rows = [(OTHER + " Contact ann.lee@example.org.", "neurology"), (OTHER + " Contact bo.ng@example.net.", "neurology"),
            (THIRD, "orthopedics")]
    site = load_site_config(_site(tmp_path, _write_csv(tmp_path / "notes.csv", rows), '\n[deid]\nenabled = true\n'))

    result = prepare_site_data(site, plot=False)  # client/deid.py, as the site's training path runs it

    assert result.report.deid.enabled and result.report.deid.counts.get("EMAIL") == 2
    assert result.report.dropped.exact_duplicate == (2,)
    assert "example" not in result.out.read_text(encoding="utf-8")


def test_prepare_warns_when_the_input_already_spent_budget(tmp_path: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.accounting import Segment
    from fedtune.common.data import record_digests

    raw = _write_csv(tmp_path / "notes.csv", ROWS)
    site = load_site_config(_site(tmp_path, raw))
    table = load_table(_write_csv(tmp_path / "usable.csv", [r for r in ROWS if r[0].strip("\u0007 ") and r[1]]))
    spent = PrivacyLedger(site.state_dir).charge(record_digests(table.texts, table.labels), run="run-1", round=1,
                                                 segment=Segment(sample_rate=0.01, noise_multiplier=1.0, steps=100),
                                                 clip_norm=1.0, delta=site.delta, budget_epsilon=100.0)
    assert spent > 0

    warnings = prepare_site_data(site, plot=False).report.warnings

    assert len(warnings) == 1 and f"already spent epsilon {spent:.3f}" in warnings[0] and "keep their spend" in warnings[0]


def test_the_cli_names_a_bad_in_file_in_one_line_and_leaves_the_data_alone(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    raw = _write_csv(tmp_path / "notes.csv", ROWS)
    before = raw.read_bytes()
    missing = tmp_path / "notes-2026.csv"

    result = CliRunner().invoke(main, ["site", "prepare", "--config", str(_site(tmp_path, raw)), "--in", str(missing)])

    assert result.exit_code == 2
    assert result.output.strip() == f"fedtune: error: --in {missing}: no such file."
    assert raw.read_bytes() == before and not default_out(missing).exists()


def test_causal_lm_chats_are_normalised_per_message_and_bad_chats_dropped(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fedtune.common.model import default_base_model_dir

    chat_tokenizer = AutoTokenizer.from_pretrained(str(default_base_model_dir()))
    chat_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    chats = [
        [{"role": "user", "content": "Summarise:  chest pain\u200b for 3 days."}, {"role": "assistant", "content": "Chest pain,\n3 days."}],
        [{"role": "user", "content": "Summarise: chest pain for 3 days."}, {"role": "assistant", "content": "Chest pain,\n3 days."}],
        [{"role": "assistant", "content": "An answer without a question."}],
        "not a chat",
    ]
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"chat": c}) + "\n" for c in chats), encoding="utf-8")

    result = prepare_file(source, tmp_path / "chats.clean.jsonl", Columns(task="causal-lm", messages="chat"),
                          tokenizer=chat_tokenizer, tokenizer_name="minilm+template")

    assert result.report.dropped.unusable == (3, 4) and result.report.dropped.exact_duplicate == (2,)
    cleaned = [json.loads(line)["chat"] for line in result.out.read_text(encoding="utf-8").splitlines()]
    assert cleaned == [[{"role": "user", "content": "Summarise: chest pain for 3 days."},
                        {"role": "assistant", "content": "Chest pain,\n3 days."}]]
    assert result.report.lengths.max > 0 and result.report.control_chars_removed == 1

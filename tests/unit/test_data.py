"""Loading a site's labeled texts: the three formats, every error message, labels and the fingerprint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.common.data import TextTable, check_labels, fingerprint, label_set, load_table
from fedtune.common.errors import ConfigError, DataError

ROWS = [
    {"text": "Chest pain, radiating to the left arm.", "label": "cardiology", "hospital": "h1"},
    {"text": 'Patient said "dizzy"\nsince Monday.', "label": "neurology", "hospital": "h2"},
    {"text": "Ünïcödé — 胸痛", "label": "cardio ", "hospital": "h1"},
]


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] for row in rows])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    columns = {name: [row.get(name) for row in rows] for name in rows[0]} if rows else {}
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}


def write(tmp_path: Path, fmt: str, rows: list[dict], name: str = "notes") -> Path:
    return WRITERS[fmt](tmp_path / f"{name}.{fmt}", rows)


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_table(path, **kwargs)
    return str(info.value)


# --- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_loads_the_same_rows_exactly(tmp_path, fmt):
    # Prepare
    path = write(tmp_path, fmt, ROWS)

    # Execute
    table = load_table(path, extra_columns=["hospital"])

    # Assert
    assert table.texts == [row["text"] for row in ROWS]
    assert table.labels == ["cardiology", "neurology", "cardio "]  # trailing space kept
    assert table.columns == {"hospital": ["h1", "h2", "h1"]}
    assert table.source == str(path)
    assert len(table) == 3


def test_all_three_formats_give_equal_tables_and_fingerprints(tmp_path):
    # Prepare
    paths = [write(tmp_path, fmt, ROWS) for fmt in WRITERS]

    # Execute
    tables = [load_table(path, extra_columns=["hospital"]) for path in paths]

    # Assert
    assert all(t.texts == tables[0].texts and t.labels == tables[0].labels for t in tables)
    assert all(t.columns == tables[0].columns for t in tables)
    assert len({fingerprint(t) for t in tables}) == 1


def test_json_suffix_is_read_as_json_lines(tmp_path):
    # Prepare
    path = write_jsonl(tmp_path / "notes.json", ROWS)

    # Execute
    table = load_table(path)

    # Assert
    assert table.labels == ["cardiology", "neurology", "cardio "]


def test_suffix_is_matched_case_insensitively(tmp_path):
    # Prepare
    path = write_csv(tmp_path / "NOTES.CSV", ROWS)

    # Execute
    table = load_table(path)

    # Assert
    assert len(table) == 3


def test_custom_text_and_label_column_names_are_used(tmp_path):
    # Prepare
    path = write_jsonl(tmp_path / "notes.jsonl", [{"note": "Fever.", "dept": "ward"}, {"note": "Cough.", "dept": "er"}])

    # Execute
    table = load_table(path, text_column="note", label_column="dept")

    # Assert
    assert table.texts == ["Fever.", "Cough."]
    assert table.labels == ["ward", "er"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_integer_labels_and_extra_values_become_strings(tmp_path, fmt):
    # Prepare
    path = write(tmp_path, fmt, [{"text": "a", "label": 0, "site": 7}, {"text": "b", "label": 12, "site": 3}])

    # Execute
    table = load_table(path, extra_columns=["site"])

    # Assert
    assert table.labels == ["0", "12"]
    assert table.columns == {"site": ["7", "3"]}


def test_csv_with_utf8_byte_order_mark_keeps_first_column_name(tmp_path):
    # Prepare: spreadsheet exports prepend a BOM, which must not become part of the name "text".
    path = tmp_path / "notes.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nFever.,ward\r\n")

    # Execute
    table = load_table(path)

    # Assert
    assert table.texts == ["Fever."]
    assert table.labels == ["ward"]


def test_blank_lines_are_skipped_and_do_not_count_as_rows(tmp_path):
    # Prepare
    csv_path = tmp_path / "notes.csv"
    csv_path.write_text("text,label\nA.,x\n\nB.,y\n\n", encoding="utf-8")
    jsonl_path = tmp_path / "notes.jsonl"
    jsonl_path.write_text('{"text": "A.", "label": "x"}\n\n   \n{"text": "B.", "label": "y"}\n\n', encoding="utf-8")

    # Execute
    tables = [load_table(csv_path), load_table(jsonl_path)]

    # Assert
    assert [t.labels for t in tables] == [["x", "y"], ["x", "y"]]


def test_jsonl_text_holding_a_unicode_line_separator_stays_one_row(tmp_path):
    # Prepare: json.dumps(ensure_ascii=False) writes U+2028 raw; str.splitlines would cut the line there.
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "first\u2028second", "label": "x"}])

    # Execute
    table = load_table(path)

    # Assert
    assert table.texts == ["first\u2028second"]


# --- load errors -----------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    # Prepare
    path = tmp_path / "absent.csv"

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and "no such file" in message


def test_directory_instead_of_file_is_reported(tmp_path):
    # Prepare
    path = tmp_path / "dir.csv"
    path.mkdir()

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and "not a file" in message


def test_unsupported_suffix_lists_the_allowed_ones(tmp_path):
    # Prepare
    path = tmp_path / "notes.xlsx"
    path.write_bytes(b"PK")

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and "'.xlsx'" in message
    for suffix in (".csv", ".json", ".jsonl", ".parquet"):
        assert suffix in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_missing_column_lists_the_columns_found(tmp_path, fmt):
    # Prepare
    path = write(tmp_path, fmt, [{"text": "Fever.", "diagnosis": "ward"}])

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message
    assert "missing column(s) ['label']" in message
    assert "columns found: ['text', 'diagnosis']" in message


def test_missing_extra_column_is_named(tmp_path):
    # Prepare
    path = write_csv(tmp_path / "notes.csv", [{"text": "Fever.", "label": "ward"}])

    # Execute
    message = load_error(path, extra_columns=["hospital"])

    # Assert
    assert "missing column(s) ['hospital']" in message


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_empty_file_is_reported(tmp_path, suffix, content):
    # Prepare
    path = tmp_path / f"notes{suffix}"
    path.write_bytes(content)

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and ("empty" in message or "no data rows" in message)


def test_csv_with_header_only_has_no_data_rows(tmp_path):
    # Prepare
    path = tmp_path / "notes.csv"
    path.write_text("text,label\n", encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and "no data rows" in message


def test_parquet_with_zero_rows_has_no_data_rows(tmp_path):
    # Prepare
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)

    # Execute
    message = load_error(path)

    # Assert
    assert str(path) in message and "no data rows" in message


@pytest.mark.parametrize("fmt, where", [("csv", "row 2 (line 3)"), ("jsonl", "row 2 (line 2)"), ("parquet", "row 2")])
@pytest.mark.parametrize("blank", ["", "  \t "])
def test_empty_or_whitespace_text_names_file_row_and_value(tmp_path, fmt, where, blank):
    # Prepare
    path = write(tmp_path, fmt, [{"text": "Fever.", "label": "x"}, {"text": blank, "label": "x"}])

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} {where}:" in message
    assert "empty or whitespace-only" in message and repr(blank) in message


@pytest.mark.parametrize(
    "fmt, label, where, found",
    [
        ("csv", "", "row 2 (line 3)", "''"),
        ("csv", "   ", "row 2 (line 3)", "'   '"),
        ("jsonl", None, "row 2 (line 2)", "None"),
        ("parquet", None, "row 2", "None"),
    ],
)
def test_missing_label_names_file_row_and_value(tmp_path, fmt, label, where, found):
    # Prepare
    path = write(tmp_path, fmt, [{"text": "Fever.", "label": "x"}, {"text": "Cough.", "label": label}])

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} {where}: missing value in column 'label' (found {found})" in message


def test_jsonl_object_without_the_label_field_is_a_missing_label(tmp_path):
    # Prepare
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "Fever.", "label": "x"}, {"text": "Cough."}])

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 2 (line 2): missing value in column 'label' (found no such field)" in message


def test_missing_extra_value_names_row_and_column(tmp_path):
    # Prepare
    path = write_csv(tmp_path / "notes.csv", [{"text": "A.", "label": "x", "hospital": ""}])

    # Execute
    message = load_error(path, extra_columns=["hospital"])

    # Assert
    assert f"{path} row 1 (line 2): missing value in column 'hospital'" in message


@pytest.mark.parametrize("label", [1.0, True])
def test_float_or_boolean_label_is_rejected_with_its_value(tmp_path, label):
    # Prepare
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "Fever.", "label": label}])

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 1 (line 1): column 'label' must hold strings or integers" in message
    assert repr(label) in message


def test_non_string_text_is_rejected(tmp_path):
    # Prepare
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": 42, "label": "x"}])

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 1 (line 1): text column 'text' must hold strings, got int" in message


def test_csv_row_with_a_stray_comma_names_row_and_field_counts(tmp_path):
    # Prepare
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nFever.,x\nPain, left arm,y\n", encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 2 (line 3): 3 fields but the header has 2" in message


def test_csv_row_after_a_multiline_field_names_row_and_starting_line(tmp_path):
    # Prepare: row 1's text spans lines 2-3, so row 2 starts on line 4.
    path = tmp_path / "notes.csv"
    path.write_text('text,label\n"two\nlines",x\n  ,y\n', encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 2 (line 4):" in message


def test_csv_row_after_a_blank_line_keeps_its_data_row_number(tmp_path):
    # Prepare: the blank line 3 is not a row, so the blank text on line 4 is data row 2.
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nA.,x\n\n ,y\n", encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 2 (line 4):" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_bytes_that_are_not_utf8_name_line_offset_and_byte(tmp_path, suffix):
    # Prepare: "é" in Latin-1 is the single byte 0xe9, invalid as UTF-8 here.
    path = tmp_path / f"notes{suffix}"
    first = b"text,label\n" if suffix == ".csv" else b'{"text": "ok", "label": "x"}\n'
    second = b"caf\xe9,x\n" if suffix == ".csv" else b'{"text": "caf\xe9", "label": "x"}\n'
    path.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} line 2, byte offset {offset}: byte 0xe9 is not valid UTF-8" in message


def test_malformed_json_line_names_row_and_line(tmp_path):
    # Prepare
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "A.", "label": "x"}\n\n{"text": "B.", "label": "y",}\n', encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 2 (line 3): malformed JSON" in message


def test_json_array_file_gets_a_json_lines_hint(tmp_path):
    # Prepare
    path = tmp_path / "notes.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 1 (line 1)" in message and "one JSON object per line" in message


def test_json_line_that_is_not_an_object_is_rejected(tmp_path):
    # Prepare
    path = tmp_path / "notes.jsonl"
    path.write_text('"just a string"\n', encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path} row 1 (line 1): expected a JSON object, got str" in message


def test_file_that_is_not_parquet_is_reported(tmp_path):
    # Prepare
    path = tmp_path / "notes.parquet"
    path.write_text("text,label\nA.,x\n", encoding="utf-8")

    # Execute
    message = load_error(path)

    # Assert
    assert f"{path}: not a readable Parquet file" in message


def test_table_with_misaligned_columns_is_rejected():
    # Execute / Assert
    with pytest.raises(DataError, match="2 texts but"):
        TextTable(texts=["a", "b"], labels=["x"], source="mem")


# --- labels ----------------------------------------------------------------------------------------------


def make_table(labels: list[str], texts: list[str] | None = None, source: str = "data/notes.csv") -> TextTable:
    return TextTable(texts=texts or [f"text {i}" for i in range(len(labels))], labels=labels, source=source)


def test_check_labels_accepts_a_table_whose_labels_are_all_allowed():
    # Prepare
    table = make_table(["cardiology", "neurology", "cardiology"])

    # Execute / Assert: returns without raising
    check_labels(table, ["cardiology", "neurology"])


def test_check_labels_names_first_bad_row_its_value_and_how_many_rows_are_affected():
    # Prepare
    table = make_table(["cardiology", "neurology", "cardio ", "cardiology", "Neurology", "cardio "])

    # Execute
    with pytest.raises(DataError) as info:
        check_labels(table, ["cardiology", "neurology"])

    # Assert
    message = str(info.value)
    assert message.startswith("data/notes.csv row 3: label 'cardio ' is not one of ['cardiology', 'neurology']")
    assert "3 of 6 rows" in message
    assert "['Neurology', 'cardio ']" in message


def test_check_labels_with_no_allowed_labels_is_a_config_error():
    # Execute / Assert
    with pytest.raises(ConfigError, match="must not be empty"):
        check_labels(make_table(["x"]), [])


def test_label_set_is_sorted_and_unique():
    # Execute
    labels = label_set(["neurology", "cardiology", "neurology", "cardio "])

    # Assert
    assert labels == ["cardio ", "cardiology", "neurology"]


# --- fingerprint -----------------------------------------------------------------------------------------

FINGERPRINT_TABLE = make_table(["cardiology", "neurology"], texts=["Chest pain.", "Ünïcödé 胸痛"])
# Pinned: a change here orphans every site's privacy ledger, so it must be deliberate (bump the v1 tag).
# Recomputed independently of fedtune from the documented recipe:
#   f = lambda s: len(s.encode()).to_bytes(8, "big") + s.encode()
#   rows = sorted(sha256(f(text) + f(label)).digest() for text, label in pairs)
#   sha256(b"fedtune.TextTable.v1\0" + len(rows).to_bytes(8, "big") + b"".join(rows)).hexdigest()
FINGERPRINT_PINNED = "7d3267580b162b669297ccb6587fbfe8d2f67a7e4ddce681d87c63c849732163"


def test_fingerprint_matches_the_pinned_digest():
    # Execute
    digest = fingerprint(FINGERPRINT_TABLE)

    # Assert
    assert digest == FINGERPRINT_PINNED


def test_fingerprint_is_the_same_in_fresh_processes_with_different_hash_seeds():
    # Prepare
    code = (
        "from fedtune.common.data import TextTable, fingerprint\n"
        "print(fingerprint(TextTable(texts=['Chest pain.', 'Ünïcödé 胸痛'], labels=['cardiology', 'neurology'],"
        " source='x')))"
    )

    # Execute
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }

    # Assert
    assert digests == {fingerprint(FINGERPRINT_TABLE)}


def test_fingerprint_ignores_row_order_source_and_extra_columns():
    # Prepare
    a = TextTable(texts=["t1", "t2"], labels=["x", "y"], source="a.csv", columns={"h": ["1", "2"]})
    b = TextTable(texts=["t2", "t1"], labels=["y", "x"], source="elsewhere/b.parquet")

    # Execute / Assert
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    "texts, labels",
    [
        (["t1", "t2"], ["x", "x"]),  # one label changed
        (["t1", "t2 "], ["x", "y"]),  # one text changed by a space
        (["t1", "t2", "t2"], ["x", "y", "y"]),  # a duplicate row added
        (["t1"], ["x"]),  # a row removed
        (["t2", "t1"], ["x", "y"]),  # texts and labels re-paired
    ],
)
def test_fingerprint_changes_when_any_row_content_changes(texts, labels):
    # Prepare
    base = make_table(["x", "y"], texts=["t1", "t2"])

    # Execute / Assert
    assert fingerprint(make_table(labels, texts=texts)) != fingerprint(base)


def test_fingerprint_keeps_text_and_label_boundary():
    # Execute / Assert
    assert fingerprint(make_table(["c"], texts=["ab"])) != fingerprint(make_table(["bc"], texts=["a"]))


# -- collecting mode (site check): every bad row, by number and reason, never its value -------------------------


def test_collecting_mode_names_every_row_training_refuses_without_quoting_any_value(tmp_path):
    # Prepare: a distinctive word in each bad value, so a quoted value would be found.
    from fedtune.common.data import RowProblem

    rows = [{"text": "Fever.", "label": "x"}, {"text": "  ", "label": "x"}, {"text": "Cough.", "label": 1.5},
            {"text": "Rash.", "label": 3}, {"text": ["zebrafinch"], "label": "y"}, {"text": "Itch."},
            {"text": "Pain.", "label": {"quokka": 1}}]
    path = write_jsonl(tmp_path / "notes.jsonl", rows)
    # Independent oracle: which rows the raising loader refuses, each in a file of its own.
    refused_alone = []
    for i, row in enumerate(rows, start=1):
        try:
            load_table(write_jsonl(tmp_path / f"row{i}.jsonl", [row]))
        except DataError:
            refused_alone.append(i)

    # Execute
    problems: list[RowProblem] = []
    table = load_table(path, problems=problems)

    # Assert
    assert [p.where for p in problems] == [f"{path} row {i} (line {i})" for i in refused_alone] == \
        [f"{path} row {i} (line {i})" for i in (2, 3, 5, 6, 7)]
    assert [(p.column, p.reason, p.blank) for p in problems] == [
        ("text", "is empty", True), ("label", "holds float, not text", False), ("text", "holds list, not text", False),
        ("label", "is empty", True), ("label", "holds dict, not text", False)]
    assert table.texts == ["Fever.", "Rash."] and table.labels == ["x", "3"]  # the good rows, as training reads them
    assert not any(word in repr(problems) for word in ("1.5", "zebrafinch", "quokka"))
    with pytest.raises(DataError, match=r"row 2 \(line 2\): text in column 'text' is empty or whitespace-only: '  '"):
        load_table(path)  # without a list: the first, quoted, as before


def test_collecting_mode_still_refuses_an_unreadable_file_and_an_empty_one(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        load_table(write_csv(tmp_path / "a.csv", [{"text": "A.", "tag": "x"}]), problems=[])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        load_table(empty, problems=[])

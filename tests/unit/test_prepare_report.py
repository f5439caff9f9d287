"""`site prepare`'s terminal report (client/prepare_report.py) and the row lists it shares with `site check`."""

from __future__ import annotations

import csv
from pathlib import Path

from fedtune.client.prepare_report import SHOWN_ROWS, row_list


def test_row_list_names_the_first_rows_and_counts_the_rest() -> None:
    assert SHOWN_ROWS == 10
    assert row_list([]) == ""
    assert row_list([7]) == "7"
    assert row_list(list(range(1, 11))) == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"
    assert row_list(tuple(range(1, 14))) == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 3 more"
    assert row_list(["row 2", "row 9"]) == "row 2, row 9"


def test_site_check_and_the_prepare_report_share_one_row_list() -> None:
    from fedtune.client import check, prepare_report

    assert check.row_list is prepare_report.row_list and check.SHOWN_ROWS is prepare_report.SHOWN_ROWS


def test_the_terminal_table_names_ten_dropped_rows_and_counts_the_rest(tmp_path: Path) -> None:
    from rich.console import Console
    from transformers import AutoTokenizer

    from fedtune.client.prepare import Columns, prepare_file
    from fedtune.client.prepare_report import render
    from fedtune.common.model import default_base_model_dir

    source = tmp_path / "notes.csv"
    first = "Patient reports crushing chest pressure on exertion for three days, relieved by rest."
    with source.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("text", "label"), (first, "cardiology"), *[(first, "cardiology")] * 12,
                                 ("Sudden weakness of the right arm and slurred speech since this morning.", "neurology")])
    tokenizer = AutoTokenizer.from_pretrained(str(default_base_model_dir()))
    result = prepare_file(source, tmp_path / "notes.clean.csv", Columns(task="classification"), tokenizer=tokenizer,
                          tokenizer_name="minilm", plot=False)
    console = Console(record=True, width=200)

    render(result.report, console)

    assert result.report.dropped.exact_duplicate == tuple(range(2, 14))
    assert "rows 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 2 more" in console.export_text()

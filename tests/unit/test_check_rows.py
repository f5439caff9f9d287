"""`fedtune site check` and `site ledger` on a classification site's bad rows: every one named by number and
reason, none quoted (the training path's own messages quote values; the site's terminal must not show them)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fedtune.client.daemon import load_site_config

# Distinctive words: a leak of any bad row's value into the output would be found.
LEAKS = ("zebrafinch", "quokka", "axolotl")


def _site(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "site.toml"
    path.write_text('[site]\nname = "clinic-a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "notes.jsonl"\n',
                    encoding="utf-8")
    return path


def test_site_check_and_ledger_name_every_bad_classification_row_without_its_value(tmp_path: Path) -> None:
    from fedtune.cli import main
    from fedtune.client.check import run_checks

    rows: list[dict[str, object]] = [{"text": f"note {k}", "label": "ab"[k % 2]} for k in range(12)]
    rows[2]["text"] = "   "
    rows[4]["label"] = ["zebrafinch"]
    rows[6].pop("label")
    rows[9]["text"] = {"quokka": "axolotl"}
    site = _site(tmp_path, rows)

    data = {r.name: r for r in run_checks(load_site_config(site))}["data"]
    ledger = CliRunner().invoke(main, ["site", "ledger", "--config", str(site)])

    assert not data.ok
    assert ("12 rows; 1 blank texts in column 'text' (row 3 (line 3)); 1 missing labels in column 'label' (row 7 (line 7)); "
            "2 unusable rows: row 5 (line 5): column 'label' holds list, not text; row 10 (line 10): column 'text' holds dict, "
            "not text. Training refuses the file until every row has a text and a label") in data.detail, data.detail
    assert ledger.exit_code == 0 and "2 unusable rows" in ledger.output, ledger.output
    assert not any(word in data.detail + ledger.output for word in LEAKS), data.detail + ledger.output

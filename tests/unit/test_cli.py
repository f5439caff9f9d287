"""The command line: help for every command, one clear line for bad input, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedtune.cli import main


@pytest.mark.parametrize("command", [[], ["simulate"], ["evaluate"], ["predict"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_simulate_help_lists_the_issue_flags() -> None:
    out = CliRunner().invoke(main, ["simulate", "--help"]).output
    for flag in ("--data", "--text-column", "--label-column", "--sites", "--partition", "--rounds", "--local-epochs",
                 "--epsilon", "--delta", "--no-dp", "--lora-rank", "--base-model", "--max-length", "--seed", "--out", "--config"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "federation.rounds must be >= 1, got 0"),
        (["--partition", "dirichlet:0"], "dirichlet:ALPHA"),
        (["--delta", "1.5"], "privacy.delta must be in (0, 1), got 1.5"),
        (["--sites", "2", "--min-sites", "3"], "federation.min_sites (3) must be <= federation.sites (2)"),
    ],
)
def test_bad_flags_give_one_line_naming_the_value(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["simulate", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "notes.csv"
    result = CliRunner().invoke(main, ["simulate", "--data", str(missing), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert str(missing) in result.output


def test_label_outside_the_run_label_set_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f"note {i},{'cardiology' if i % 2 else 'neurology'}\n" for i in range(40)))
    result = CliRunner().invoke(main, ["simulate", "--data", str(data), "--labels", "cardiology,oncology", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "'neurology' is not one of ['cardiology', 'oncology']" in result.output
    assert not (tmp_path / "run").exists()


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "scenario.toml"
    config.write_text("[privacy]\ntarget_epsilon = -1\n")
    result = CliRunner().invoke(main, ["simulate", "--config", str(config)])
    assert result.exit_code == 2
    assert "scenario.toml: privacy.target_epsilon must be > 0, got -1.0" in result.output

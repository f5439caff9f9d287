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


def test_help_loads_no_heavy_library() -> None:
    """`fedtune --help` and every group's help stay instant: no numpy, torch, transformers or Flower at start-up."""
    import subprocess
    import sys

    probe = ("import sys, runpy; sys.argv = ['fedtune', '--help']\n"
             "try:\n    runpy.run_module('fedtune.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'flwr', 'peft', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_cli_modules_import_the_root_not_each_other() -> None:
    """One module per command group; a command module may import root.py and options.py, never another group
    (the old cli.py / cli_deploy.py / cli_privacy.py imported each other)."""
    import ast

    folder = Path(__file__).resolve().parents[2] / "fedtune" / "cli"
    shared = {"fedtune.cli.root", "fedtune.cli.options", "fedtune.cli.coordinator"}  # coordinator: run's connection
    for path in folder.glob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module == "fedtune.cli" or (module or "").startswith("fedtune.cli."):
                assert module in shared, f"{path.name} imports {module}"

"""`fedtune sweep` end to end: real `fedtune simulate` subprocesses (Flower's simulation engine, Opacus, PEFT).

A tiny BERT, 2 sites, 1 round, 2 epsilons x 2 seeds: the CSV, the plots and the table, then a second
invocation that runs nothing. Marked slow: four simulations take several minutes on 2 cores. The
crash test is one failing `fedtune simulate` (a few seconds of imports), not slow.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common.config import from_dict
from fedtune.sweep import Cell, simulate_subprocess

ROOT = Path(__file__).resolve().parents[2]


def fedtune(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_tiny_sweep_writes_csv_plots_and_table_and_resumes_with_nothing_to_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(f"""
[model]
base_model = "{tiny_model_dir}"
max_length = 32
[federation]
sites = 2
rounds = 1
min_sites = 2
fraction_evaluate = 0.0  # the held-out test set is evaluated centrally each round; no site validation needed here
[grid]
privacy.target_epsilon = [2, 8]
seed = [0, 1]
""")
    out = tmp_path / "sweep"

    # --retries 3: on a loaded machine Ray can time out while starting (the run fails before training; seen twice in a row at load 35).
    first = fedtune("sweep", "--config", str(sweep_file), "--out", str(out), "--retries", "3", timeout=3000)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(out / "sweep.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert sorted((r["privacy.target_epsilon"], r["seed"]) for r in rows) == [("2.0", "0"), ("2.0", "1"), ("8.0", "0"), ("8.0", "1")]
    for r in rows:
        target = float(r["privacy.target_epsilon"])
        assert float(r["max_epsilon"]) == pytest.approx(target, rel=0.01), "each site calibrated to its cell's target"
        assert 0 <= float(r["test_accuracy"]) <= 1 and 0 <= float(r["test_macro_f1"]) <= 1
        assert int(r["bytes_up"]) > 0 and int(r["bytes_down"]) > 0 and float(r["seconds"]) > 0 and r["rounds"] == "1"
        assert (Path(r["run_dir"]) / "summary.json").is_file() and (Path(r["run_dir"]) / "adapter").is_dir()
    for png in ("metric_vs_epsilon.png", "metric_by_round.png", "epsilon_by_round.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert "95% t-interval" in first.stdout and "2/2" in first.stdout, first.stdout[-2000:]
    summaries = sorted(out.glob("runs/*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]

    second = fedtune("sweep", "--config", str(sweep_file), "--out", str(out), timeout=600)

    assert second.returncode == 0, second.stderr[-2000:]
    assert "4 already done, 0 to run" in second.stdout
    assert sorted(out.glob("runs/*/summary.json")) == summaries and [p.stat().st_mtime_ns for p in summaries] == stamps
    assert len(list(out.glob("runs/*/"))) == 4 and len(list((out / "logs").iterdir())) == 4, "no run was started again"


def test_a_run_that_fails_is_reported_with_its_error_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "broken"
    run_dir.parent.mkdir(parents=True)
    cell = Cell(name="broken", values=(("seed", 0),),
                config=from_dict({"model": {"base_model": str(tmp_path / "no-model")}, "out": str(run_dir)}))
    from fedtune.common.config import dump_toml

    dump_toml(cell.config, cell.config_file)
    log = tmp_path / "broken.log"

    status, error = simulate_subprocess(cell, log, timeout=600)

    assert status == "failed"
    assert error.startswith("exit code 2: fedtune: error:") and "no-model" in error, error
    assert "no-model" in log.read_text()

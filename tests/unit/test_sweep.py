"""`fedtune sweep` without Flower: grid checks and expansion, resumability, the t-interval, the CSV and plots.

Resumability is checked with a runner that writes a run directory the way `fedtune simulate` does
(summary.json, metrics.jsonl) and counts its calls; tests/integration/test_sweep.py runs the real one.
"""

from __future__ import annotations

import csv
import json
import math
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedtune.common.config import dump_toml
from fedtune.common.errors import ConfigError
from fedtune.common.io import atomic_write_json
from fedtune.sweep import (
    Cell,
    RoundPoint,
    RunRow,
    plan_sweep,
    run_sweep,
    summarize,
    t_interval,
)

ROOT = Path(__file__).resolve().parents[2]


def plan(grid: dict, tmp_path: Path, **base):  # type: ignore[no-untyped-def, type-arg]
    return plan_sweep({**base, "grid": grid}, out=tmp_path / "sweep", preflight=False)


def problems_of(grid: object, tmp_path: Path, **base) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        plan_sweep({**base, "grid": grid}, out=tmp_path / "sweep", preflight=False)
    return err.value.problems


# ---- grid expansion and validation ----------------------------------------------------------------

def test_grid_expands_to_the_cross_product_with_none_meaning_no_dp(tmp_path: Path) -> None:
    p = plan({"privacy": {"target_epsilon": [1, 8.0, "none"]}, "seed": [0, 1]}, tmp_path, federation={"rounds": 2})

    assert len(p.cells) == 6
    assert p.keys == ("privacy.target_epsilon", "seed")
    got = sorted((c.config.privacy.enabled, c.config.privacy.target_epsilon if c.config.privacy.enabled else None, c.config.seed)
                 for c in p.cells)
    assert got == sorted([(True, 1.0, 0), (True, 1.0, 1), (True, 8.0, 0), (True, 8.0, 1), (False, None, 0), (False, None, 1)])
    assert all(c.config.federation.rounds == 2 for c in p.cells), "the base config holds in every cell"
    assert len({c.name for c in p.cells}) == 6
    assert all(c.run_dir.parent == (tmp_path / "sweep" / "runs").resolve() for c in p.cells)


def test_epsilon_in_the_grid_turns_dp_back_on_over_a_no_dp_base(tmp_path: Path) -> None:
    p = plan({"privacy.target_epsilon": [3]}, tmp_path, privacy={"enabled": False})

    assert p.cells[0].config.privacy.enabled and p.cells[0].config.privacy.target_epsilon == 3.0


def test_quoted_and_nested_dotted_keys_are_the_same_grid(tmp_path: Path) -> None:
    nested = plan({"federation": {"sites": [2, 3]}, "lora": {"rank": [4]}}, tmp_path)
    quoted = plan({"federation.sites": [2, 3], "lora.rank": [4]}, tmp_path)

    assert [c.config for c in nested.cells] == [c.config for c in quoted.cells]
    assert [(c.config.federation.sites, c.config.lora.rank) for c in quoted.cells] == [(2, 4), (3, 4)]


def test_several_grid_tables_sweep_the_union_and_the_csv_shows_every_key(tmp_path: Path) -> None:
    p = plan([{"privacy.target_epsilon": [8, "none"], "data.partition": ["iid", "dirichlet:0.5"]},
              {"federation.sites": [1], "federation.min_sites": [1], "privacy.target_epsilon": ["none"]}], tmp_path)

    assert len(p.cells) == 5
    assert p.keys == ("privacy.target_epsilon", "data.partition", "federation.sites", "federation.min_sites")
    rows = run_sweep(p, runner=lambda cell, log, timeout: ("failed", "not run"), echo=lambda _: None)
    central = [r for r in rows if dict(r.setting)["federation.sites"] == "1"]
    assert len(central) == 1
    assert dict(central[0].setting) == {"privacy.target_epsilon": "none", "data.partition": "iid",
                                        "federation.sites": "1", "federation.min_sites": "1"}, "keys outside its table: the base value"


def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    problems = problems_of({"privacy.target_epsilonn": [1], "sites": [2], "epsilon": [3]}, tmp_path)

    assert any("'privacy.target_epsilonn'" in p and "did you mean 'privacy.target_epsilon'" in p for p in problems), problems
    assert any("'sites'" in p and "did you mean 'federation.sites'" in p for p in problems), problems
    assert any("'epsilon'" in p and "did you mean 'privacy.target_epsilon'" in p for p in problems), problems
    assert len(problems) == 3, "every problem at once"


def test_a_bad_value_is_named_with_its_key_and_what_is_allowed(tmp_path: Path) -> None:
    problems = problems_of({"federation.sites": [2, 0, "x"], "federation.aggregation": ["fedavg", "bogus"]}, tmp_path)

    assert "grid key 'federation.sites', value 0: federation.sites must be >= 1, got 0." in problems
    assert "grid key 'federation.sites', value 'x': federation.sites must be an integer, got 'x'." in problems
    assert any(p.startswith("grid key 'federation.aggregation', value 'bogus'") and "fedavg | ffa" in p for p in problems), problems
    assert len(problems) == 3


@pytest.mark.parametrize(("grid", "expected"), [
    ({"data.partition": "iid"}, "must be a non-empty list of values, got 'iid'"),
    ({"seed": []}, "must be a non-empty list of values, got []"),
    ({"seed": [0, 0]}, "lists the value 0 twice"),
    ({"out": ["a"]}, "cannot be swept"),
    ({}, "grid table 1 is empty"),
    (3, "grid must be a table"),
])
def test_malformed_grids_are_refused(tmp_path: Path, grid: object, expected: str) -> None:
    problems = problems_of(grid, tmp_path)

    assert any(expected in p for p in problems), problems


def test_a_clash_between_values_names_the_cell(tmp_path: Path) -> None:
    problems = problems_of({"federation.sites": [1, 3]}, tmp_path)

    assert problems == ["grid cell federation.sites=1: federation.min_sites (2) must be <= federation.sites (1)."]


def test_a_sweep_file_without_a_grid_or_with_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        plan_sweep({"out": "x", "federation": {"rounds": 1}}, out=tmp_path, preflight=False)

    assert any("'out' cannot be set in a sweep file" in p for p in err.value.problems)
    assert any("needs a [grid] table" in p for p in err.value.problems)


def test_preflight_names_a_missing_data_file_before_anything_runs(tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    with pytest.raises(ConfigError) as err:
        plan_sweep({"grid": {"data.path": [str(missing)]}}, out=tmp_path / "sweep")

    assert any(p.startswith(f"grid cell data.path={str(missing)!r}:") and "absent.csv" in p for p in err.value.problems), err.value.problems
    assert not (tmp_path / "sweep").exists(), "nothing is written before the checks pass"


def test_relative_paths_are_made_absolute_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = plan({"seed": [0]}, tmp_path, data={"path": "notes.csv"})

    assert p.cells[0].config.data.path == str(tmp_path / "notes.csv")


# ---- running and resuming -------------------------------------------------------------------------

class FakeSimulate:
    """Writes a run directory as `fedtune simulate` leaves it (summary.json, metrics.jsonl); counts its runs."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.ran: list[str] = []
        self.fail = fail or set()

    def __call__(self, cell: Cell, log: Path, timeout: float | None) -> tuple[str, str]:
        assert not cell.run_dir.exists(), "a half-finished run directory is cleared before its run"
        assert cell.config_file.is_file(), "the run is started from its config file"
        self.ran.append(cell.name)
        log.write_text("started\n")
        run = cell.config
        if run.seed in self.fail:
            cell.run_dir.mkdir(parents=True)
            (cell.run_dir / "metrics.jsonl").write_text("")
            return "failed", "exit code 1: RuntimeError: boom"
        accuracy = 0.5 + 0.01 * run.seed + (0.02 * run.privacy.target_epsilon if run.privacy.enabled else 0.3)
        cell.run_dir.mkdir(parents=True)
        rounds = run.federation.rounds
        (cell.run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "test_accuracy": accuracy * r / rounds, "max_epsilon": run.privacy.target_epsilon * r / rounds}) + "\n"
            for r in range(1, rounds + 1)))
        # Atomically, as `fedtune simulate` writes it: the sweep's main thread rewrites the CSV (reading every
        # summary) while its worker thread is already running the next cell.
        atomic_write_json(cell.run_dir / "summary.json", {
            "dp": run.privacy.enabled, "max_epsilon": run.privacy.target_epsilon if run.privacy.enabled else None,
            "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.05}, "bytes_up": 1000, "bytes_down": 2000,
            "seconds": 3.5, "rounds": rounds})
        return "done", ""


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_second_invocation_runs_nothing_new(tmp_path: Path) -> None:
    grid = {"privacy.target_epsilon": [2, 8], "seed": [0, 1]}
    first, second = FakeSimulate(), FakeSimulate()

    run_sweep(plan(grid, tmp_path), runner=first, echo=lambda _: None)
    rows = run_sweep(plan(grid, tmp_path), runner=second, echo=lambda _: None)

    assert len(first.ran) == 4 and second.ran == []
    table = read_csv(tmp_path / "sweep" / "sweep.csv")
    assert [r["status"] for r in table] == ["done"] * 4 and [r.status for r in rows] == ["done"] * 4
    assert {(r["privacy.target_epsilon"], r["seed"]) for r in table} == {("2.0", "0"), ("2.0", "1"), ("8.0", "0"), ("8.0", "1")}
    assert len(list((tmp_path / "sweep" / "runs").glob("*/summary.json"))) == 4


def test_a_half_finished_run_is_redone_and_only_it(tmp_path: Path) -> None:
    grid = {"seed": [0, 1, 2]}
    p = plan(grid, tmp_path)
    run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)
    (p.cells[1].run_dir / "summary.json").unlink()  # a crash before the summary
    (p.cells[1].run_dir / "checkpoints").mkdir()
    again = FakeSimulate()

    run_sweep(plan(grid, tmp_path), runner=again, echo=lambda _: None)

    assert again.ran == [p.cells[1].name]
    assert not (p.cells[1].run_dir / "checkpoints").exists(), "redone from round 1, in a cleared directory"


def test_a_changed_config_is_another_run_and_a_tampered_one_is_redone(tmp_path: Path) -> None:
    grid = {"seed": [0, 1]}
    p = plan(grid, tmp_path, federation={"rounds": 2})
    run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)
    changed = FakeSimulate()

    run_sweep(plan(grid, tmp_path, federation={"rounds": 3}), runner=changed, echo=lambda _: None)
    text = p.cells[0].config_file.read_text().replace("rounds = 2", "rounds = 4")
    p.cells[0].config_file.write_text(text)
    tampered = FakeSimulate()
    run_sweep(p, runner=tampered, echo=lambda _: None)

    assert len(changed.ran) == 2 and not set(changed.ran) & {c.name for c in p.cells}
    assert tampered.ran == [p.cells[0].name], "a run whose recorded config differs from the cell's is not reused"


def test_a_run_recorded_with_a_default_s_old_spelling_is_kept_and_a_changed_effective_value_is_redone(tmp_path: Path) -> None:
    # privacy.clip_norm was written 1.0 before 0 came to mean "the task's C" (1 for classification):
    # the run trained alike, so it is reused; a recorded C of 0.5 trained otherwise and is redone.
    grid = {"seed": [0, 1]}
    p = plan(grid, tmp_path)
    run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)
    for cell, clip in zip(p.cells, ("1.0", "0.5")):
        text = cell.config_file.read_text()
        assert "clip_norm = 0.0" in text
        cell.config_file.write_text(text.replace("clip_norm = 0.0", f"clip_norm = {clip}", 1))
    again = FakeSimulate()

    run_sweep(plan(grid, tmp_path), runner=again, echo=lambda _: None)

    assert again.ran == [p.cells[1].name]


def test_a_moved_sweep_folder_resumes_without_redoing_its_runs(tmp_path: Path) -> None:
    # A sweep kept in a repository or copied off a cluster: its recorded configs name the old folder.
    grid = {"seed": [0, 1]}
    run_sweep(plan(grid, tmp_path), runner=FakeSimulate(), echo=lambda _: None)
    (tmp_path / "sweep").rename(tmp_path / "moved")
    moved = plan_sweep({"grid": grid}, out=tmp_path / "moved", preflight=False)
    assert all(str(tmp_path / "sweep") in c.config_file.read_text() for c in moved.cells)
    again = FakeSimulate()

    rows = run_sweep(moved, runner=again, echo=lambda _: None)

    assert again.ran == [] and [r.status for r in rows] == ["done", "done"]


class SlowSimulate(FakeSimulate):
    def __call__(self, cell: Cell, log: Path, timeout: float | None) -> tuple[str, str]:
        time.sleep(0.3)
        return super().__call__(cell, log, timeout)


def test_no_run_starts_past_the_start_window_and_the_next_invocation_goes_on(tmp_path: Path) -> None:
    grid = {"seed": [0, 1, 2]}
    first, lines = SlowSimulate(), []

    rows = run_sweep(plan(grid, tmp_path), start_within=0.1, runner=first, echo=lines.append)

    assert len(first.ran) == 1 and [r.status for r in rows] == ["done", "pending", "pending"]
    assert [r["status"] for r in read_csv(tmp_path / "sweep" / "sweep.csv")] == ["done", "pending", "pending"]
    assert lines[-1].startswith("2 runs not started: past --start-within 0.1 s")
    rest = FakeSimulate()
    run_sweep(plan(grid, tmp_path), runner=rest, echo=lambda _: None)
    assert sorted(first.ran + rest.ran) == sorted(c.name for c in plan(grid, tmp_path).cells)


def test_the_csv_shows_the_value_a_run_trains_with_not_the_default_s_sentinel(tmp_path: Path) -> None:
    # One grid pins the learning rate, the other leaves it at 0 ("the default": 0.05, as the README says).
    p = plan_sweep({"grid": [{"train.learning_rate": [0.01]}, {"privacy.target_epsilon": [8]}]}, out=tmp_path / "sweep", preflight=False)

    run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)

    assert [r["train.learning_rate"] for r in read_csv(tmp_path / "sweep" / "sweep.csv")] == ["0.01", "0.05"]


def test_a_run_s_name_depends_on_its_explicit_settings_only(tmp_path: Path) -> None:
    from fedtune.sweep import explicit_settings

    same = plan({"seed": [0]}, tmp_path, federation={"rounds": 5})  # 5 is the default: not an explicit setting
    other = plan({"seed": [0]}, tmp_path, federation={"rounds": 4})

    assert same.cells[0].name == plan({"seed": [0]}, tmp_path).cells[0].name
    assert other.cells[0].name != same.cells[0].name
    assert explicit_settings(other.cells[0].config) == {"federation": {"rounds": 4}}


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    p = plan({"seed": [0, 1, 2]}, tmp_path)
    runner = FakeSimulate(fail={1})

    rows = run_sweep(p, runner=runner, echo=lambda _: None)

    assert len(runner.ran) == 3
    assert [r.status for r in rows] == ["done", "failed", "done"]
    table = read_csv(p.csv_path)
    assert table[1]["status"] == "failed" and table[1]["error"] == "exit code 1: RuntimeError: boom"
    assert table[1]["test_accuracy"] == "" and float(table[0]["test_accuracy"]) == pytest.approx(0.5 + 0.02 * 8)
    retry = FakeSimulate()
    run_sweep(plan({"seed": [0, 1, 2]}, tmp_path), runner=retry, echo=lambda _: None)
    assert retry.ran == [p.cells[1].name], "the next invocation retries the failed run only"


def test_retries_start_a_failed_run_again_and_stop_at_the_first_success(tmp_path: Path) -> None:
    attempts: list[str] = []
    succeed = FakeSimulate()

    def flaky(cell: Cell, log: Path, timeout: float | None) -> tuple[str, str]:
        attempts.append(cell.name)
        if cell.config.seed == 0 or attempts.count(cell.name) == 1:  # seed 0 always fails; the first attempt of seed 1 fails
            cell.run_dir.mkdir(parents=True)
            return "failed", "exit code 1: Exception: The current node timed out during startup."
        return succeed(cell, log, timeout)

    rows = run_sweep(plan({"seed": [1, 0]}, tmp_path), retries=2, runner=flaky, echo=lambda _: None)

    assert [r.status for r in rows] == ["done", "failed"]
    assert len(attempts) == 2 + 3, "seed 1: a failure then a success; seed 0: 1 + 2 retries"
    assert attempts[0] == attempts[1] == attempts[2] != attempts[3], "seed 0's runs first (seed by seed), then seed 1's"


def test_a_runner_that_raises_is_a_failed_row_too(tmp_path: Path) -> None:
    def broken(cell: Cell, log: Path, timeout: float | None) -> tuple[str, str]:
        raise OSError("no space left")

    rows = run_sweep(plan({"seed": [0]}, tmp_path), runner=broken, echo=lambda _: None)

    assert rows[0].status == "failed" and rows[0].error == "OSError: no space left"


def test_the_csv_row_carries_the_summary_figures(tmp_path: Path) -> None:
    p = plan({"privacy.target_epsilon": [4, "none"]}, tmp_path)

    run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)

    dp, plain = read_csv(p.csv_path)
    assert list(dp)[:4] == ["name", "privacy.target_epsilon", "status", "test_accuracy"]
    assert dp["privacy.target_epsilon"] == "4.0" and plain["privacy.target_epsilon"] == "none"
    assert float(dp["max_epsilon"]) == 4.0 and plain["max_epsilon"] == "", "no epsilon for a run without DP, never a 0"
    assert (dp["bytes_up"], dp["bytes_down"], dp["seconds"], dp["rounds"]) == ("1000", "2000", "3.5", "5")
    assert float(dp["test_macro_f1"]) == pytest.approx(0.5 + 0.08 - 0.05)
    assert dp["run_dir"] == str(p.cells[0].run_dir) and dp["test_perplexity"] == ""


# ---- the t-interval and the summary over seeds ----------------------------------------------------

@pytest.mark.parametrize("values", [[0.71, 0.69], [0.70, 0.66, 0.74], [0.5, 0.52, 0.49, 0.61, 0.55], list(np.linspace(0, 1, 12))])
def test_t_interval_matches_scipy(values: list[float]) -> None:
    n = len(values)
    low, high = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))

    got = t_interval(values)

    assert got.n == n and got.mean == pytest.approx(np.mean(values), abs=1e-12)
    assert got.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_t_interval_matches_a_printed_t_table() -> None:
    # t_{0.975, 1} = 12.706 and t_{0.975, 2} = 4.303 (any Student-t table). [1, 3]: mean 2, s = sqrt(2), s/sqrt(n) = 1.
    two = t_interval([1.0, 3.0])
    three = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, s/sqrt(3)

    assert (two.low, two.high) == (pytest.approx(2 - 12.706, abs=1e-3), pytest.approx(2 + 12.706, abs=1e-3))
    assert three.high - three.mean == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert t_interval([0.9, 0.9, 0.9]).low == pytest.approx(0.9)


def test_one_value_has_a_mean_and_no_spread() -> None:
    one = t_interval([0.7])

    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.7, None, None, None)
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_summary_groups_each_setting_over_its_seeds(tmp_path: Path) -> None:
    p = plan({"privacy.target_epsilon": [2, 8], "seed": [0, 1, 2]}, tmp_path)
    rows = run_sweep(p, runner=FakeSimulate(fail={2}), echo=lambda _: None)

    summaries = summarize(rows)

    assert [s.setting for s in summaries] == [(("privacy.target_epsilon", "2.0"),), (("privacy.target_epsilon", "8.0"),)]
    eight = summaries[1]
    expected = [0.5 + 0.16, 0.51 + 0.16]  # seeds 0 and 1; seed 2 failed
    assert (eight.runs, eight.failed, eight.metric.n) == (3, 1, 2)
    assert eight.metric.mean == pytest.approx(np.mean(expected))
    assert eight.metric.high == pytest.approx(stats.t.interval(0.95, 1, loc=np.mean(expected), scale=stats.sem(expected))[1])


def test_the_table_prints_mean_std_and_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.sweep import print_table

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal's width

    rows = run_sweep(plan({"seed": [0, 1]}, tmp_path), runner=FakeSimulate(), echo=lambda _: None)
    capsys.readouterr()

    print_table(rows)

    out = capsys.readouterr().out
    s = t_interval([0.66, 0.67])
    assert f"0.665 +- {s.std:.3f}" in out and f"[{s.low:.3f}, {s.high:.3f}]" in out and "2/2" in out


def test_the_markdown_table_has_a_row_per_setting_over_its_seeds(tmp_path: Path) -> None:
    from fedtune.sweep import write_markdown

    grid = {"privacy.target_epsilon": [8, "none"], "data.partition": ["iid", "dirichlet:0.5"], "seed": [0, 1, 2]}
    rows = run_sweep(plan(grid, tmp_path), runner=FakeSimulate(), echo=lambda _: None)

    lines = write_markdown(rows, tmp_path).read_text().splitlines()

    header, rule, *body = lines[2:]
    assert header.split(" | ")[:3] == ["| target_epsilon", "partition", "done/runs"]
    assert rule.startswith("|---|---|---:|")
    assert len(body) == 4 and all(line.count("|") == header.count("|") for line in body)
    # FakeSimulate: 0.5 + 0.01 seed + 0.16 with DP at epsilon 8; mean and sample std over seeds 0-2 by hand
    dp_iid = next(line for line in body if line.startswith("| 8.0 | iid |"))
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert "| 3/3 | 0.670 +- 0.010 |" in dp_iid and f"[{0.67 - half:.3f}, {0.67 + half:.3f}]" in dp_iid


def test_plots_are_written_for_done_runs(tmp_path: Path) -> None:
    from fedtune.sweep_plots import FILES, plot_sweep

    rows = run_sweep(plan({"privacy.target_epsilon": [1, 8, "none"], "data.partition": ["iid", "dirichlet:0.5"], "seed": [0, 1]},
                          tmp_path), runner=FakeSimulate(), echo=lambda _: None)

    written = plot_sweep(rows, tmp_path)

    assert [p.name for p in written] == list(FILES)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in written)
    assert plot_sweep([RunRow(name="x", setting=(), status="failed", run_dir="")], tmp_path / "none") == []


def test_legend_labels_name_only_the_keys_that_differ_between_lines() -> None:
    from fedtune.sweep_plots import labels

    central = (("federation.sites", "1"), ("train.learning_rate", "0.01"), ("data.partition", "iid"))
    iid = (("federation.sites", "4"), ("train.learning_rate", "0.05"), ("data.partition", "iid"))
    skewed = (("federation.sites", "4"), ("train.learning_rate", "0.05"), ("data.partition", "dirichlet:0.5"))

    assert labels([central, iid, skewed]) == ["sites=1, learning_rate=0.01, partition=iid",
                                              "sites=4, learning_rate=0.05, partition=iid",
                                              "sites=4, learning_rate=0.05, partition=dirichlet:0.5"]
    assert labels([iid, skewed]) == ["partition=iid", "partition=dirichlet:0.5"]
    assert labels([iid]) == ["all runs"] and labels([]) == []


def test_rounds_are_read_from_metrics(tmp_path: Path) -> None:
    p = plan({"seed": [0]}, tmp_path, federation={"rounds": 2})

    rows = run_sweep(p, runner=FakeSimulate(), echo=lambda _: None)

    assert rows[0].rounds == (RoundPoint(round=1, metric=pytest.approx(0.33), max_epsilon=4.0),
                              RoundPoint(round=2, metric=pytest.approx(0.66), max_epsilon=8.0))


# ---- shipped sweep files --------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_plans(path: Path, tmp_path: Path) -> None:
    plan_ = plan_sweep(tomllib.loads(path.read_text()), out=tmp_path, preflight=False)  # its data is generated by a benchmark

    assert plan_.cells and len({c.name for c in plan_.cells}) == len(plan_.cells)


# ---- the command ----------------------------------------------------------------------------------

def test_the_command_names_every_problem_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    sweep_file = tmp_path / "bad.toml"
    sweep_file.write_text("[grid]\nprivacy.target_epsilonn = [1]\nfederation.sites = [0]\n")

    result = CliRunner().invoke(main, ["sweep", "--config", str(sweep_file), "--out", str(tmp_path / "out"), "--dry-run"])

    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "did you mean 'privacy.target_epsilon'" in result.output and "federation.sites must be >= 1, got 0" in result.output
    assert str(sweep_file) in result.output and not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs_and_runs_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('[federation]\nrounds = 1\n[grid]\nprivacy.target_epsilon = [8, "none"]\nseed = [0, 1]\n')

    result = CliRunner().invoke(main, ["sweep", "--config", str(sweep_file), "--out", str(tmp_path / "out"), "--dry-run"])

    assert result.exit_code == 0, result.output
    assert result.output.count("to run ") == 4 and "4 runs: 0 done, 4 to run" in result.output
    assert "privacy.target_epsilon=none seed=1" in result.output
    assert not (tmp_path / "out").exists()


def test_report_tabulates_the_done_runs_and_runs_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('[federation]\nrounds = 2\n[grid]\nprivacy.target_epsilon = [8, "none"]\nseed = [0, 1]\n')
    plan_ = plan_sweep(tomllib.loads(sweep_file.read_text()), out=tmp_path / "out", preflight=False)
    runner = FakeSimulate()
    for cell in plan_.cells[:3]:  # three runs done, as a sweep stopped part-way leaves them
        cell.config_file.parent.mkdir(parents=True, exist_ok=True)
        dump_toml(cell.config, cell.config_file)
        runner(cell, tmp_path / "log.txt", None)

    result = CliRunner().invoke(main, ["sweep", "--config", str(sweep_file), "--out", str(tmp_path / "out"), "--report"])

    assert result.exit_code == 0, result.output
    table = read_csv(tmp_path / "out" / "sweep.csv")
    assert [r["status"] for r in table] == ["done"] * 3 + ["pending"]
    assert not (tmp_path / "out" / "logs").exists(), "nothing was started"
    assert "1 of 4 runs not run yet" in result.output and "2/2" in result.output and "1/2" in result.output
    assert "| 2/2 |" in (tmp_path / "out" / "summary.md").read_text()

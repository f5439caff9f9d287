"""benchmarks/privacy_unit.py: the grid it runs and the table it prints, against hand-computed values.

No model runs here: the benchmark's runs are measured by the benchmark itself.
"""

from __future__ import annotations

import pytest

from fedtune.client.train import StepPlan
from fedtune.common.config import TrainConfig
from tests.benchmark_module import load_benchmark


def _bench():  # type: ignore[no-untyped-def]
    return load_benchmark("privacy_unit.py", "privacy_unit_bench")


def test_grid_covers_every_seed_before_the_next_and_scales_local_work_to_rows_per_site() -> None:
    bench = _bench()

    points = bench.build_grid([10, 1000], ["sample", "client"], [0, 1], train_rows=17280, sites_per_round=20,
                              examples_per_round=32)

    assert [(p.seed, p.sites, p.unit) for p in points] == [
        (0, 10, "sample"), (0, 10, "client"), (0, 1000, "sample"), (0, 1000, "client"),
        (1, 10, "sample"), (1, 10, "client"), (1, 1000, "sample"), (1, 1000, "client"),
    ]
    ten, thousand = points[0], points[2]
    # N = 10: all 10 sites every round (K capped at N, q = 1); 17280 / 10 = 1728 rows; E = 32 / 1728.
    assert (ten.sites_per_round, ten.fraction_train, ten.rows_per_site) == (10, 1.0, 1728.0)
    assert ten.local_epochs == pytest.approx(0.0185185185, rel=1e-9)
    # N = 1000: K = 20 of 1000 sites (q = 0.02); 17.28 rows; E = 32 / 17.28.
    assert (thousand.sites_per_round, thousand.fraction_train, thousand.rows_per_site) == (20, 0.02, 17.28)
    assert thousand.local_epochs == pytest.approx(1.8518518519, rel=1e-9)


def test_grid_local_epochs_give_a_site_about_the_same_examples_per_round_under_fedtunes_step_plan() -> None:
    bench = _bench()
    ten, thousand = bench.build_grid([10, 1000], ["none"], [0], train_rows=17280, sites_per_round=20, examples_per_round=32)

    # A 1728-row site with batch 32: q = 32/1728, one step of about 32 examples.
    large = StepPlan.for_dataset(1728, TrainConfig(batch_size=32, local_epochs=ten.local_epochs))
    # A 17-row site: q = 1 (batch > n), round(1.85) = 2 full-batch steps, 34 examples.
    small = StepPlan.for_dataset(17, TrainConfig(batch_size=32, local_epochs=thousand.local_epochs))

    assert (large.steps, large.sample_rate) == (1, pytest.approx(32 / 1728))
    assert (small.steps, small.sample_rate) == (2, 1.0)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"units": ["sample", "secagg"]}, "secagg"),
    ({"sites": [0, 10]}, "sites ([0, 10])"),
    ({"sites_per_round": 0}, "sites_per_round (0)"),
])
def test_grid_refuses_what_it_cannot_run_and_names_the_value(kwargs: dict, named: str) -> None:  # type: ignore[type-arg]
    bench = _bench()
    args = {"sites": [10], "units": ["sample"], "seeds": [0], "train_rows": 100, "sites_per_round": 5, "examples_per_round": 32}
    args.update(kwargs)

    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        bench.build_grid(args.pop("sites"), args.pop("units"), args.pop("seeds"), **args)


def _row(sites: int, unit: str, acc: float | None, *, z: float = 0.0, eps: float | None = None) -> dict:  # type: ignore[type-arg]
    return {"sites": sites, "unit": unit, "test_accuracy": acc, "noise_multiplier": z, "epsilon": eps,
            "rows_per_site": 17280 / sites, "sites_per_round": min(sites, 20)}


def test_summary_gives_mean_min_max_over_seeds_and_leaves_failed_runs_out() -> None:
    bench = _bench()
    rows = [
        _row(1000, "none", 0.80),
        _row(1000, "client", 0.50, z=0.45, eps=7.99),
        _row(10, "client", 0.20, z=1.5, eps=8.0),
        _row(1000, "client", 0.70, z=0.45, eps=7.98),
        _row(1000, "client", None),  # a failed run
        _row(1000, "sample", 0.14, z=2.9, eps=6.5),
    ]

    summary = bench.summarize(rows)

    assert [(s["sites"], s["unit"]) for s in summary] == [(10, "client"), (1000, "sample"), (1000, "client"), (1000, "none")]
    client = summary[2]
    # (0.50 + 0.70) / 2 = 0.60; the failed third run counts as failed, not as 0.
    assert client["accuracy_mean"] == pytest.approx(0.60)
    assert (client["accuracy_min"], client["accuracy_max"], client["runs"], client["failed"]) == (0.50, 0.70, 2, 1)
    assert (client["epsilon"], client["noise_multiplier"], client["rows_per_site"], client["sites_per_round"]) == (7.99, 0.45, 17.28, 20)
    assert summary[3]["epsilon"] is None  # the reference has no guarantee to report

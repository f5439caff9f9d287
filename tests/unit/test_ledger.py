"""The site's persistent privacy ledger: accumulation, restarts, refusal before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client.ledger import LEDGER_FILE, PrivacyLedger
from fedtune.common.accounting import Segment, epsilon
from fedtune.common.errors import ConfigError, PrivacyBudgetError

SEG = Segment(sample_rate=0.1, noise_multiplier=1.0, steps=10)


def _charge(ledger: PrivacyLedger, r: int, *, budget: float = 100.0, dataset: str = "ds", seg: Segment = SEG) -> float:
    return ledger.charge(dataset, run="run-1", round=r, segment=seg, clip_norm=1.0, delta=1e-5, budget_epsilon=budget)


def test_charges_accumulate_to_the_composed_epsilon(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    reported = [_charge(ledger, r) for r in range(1, 4)]
    assert reported[0] < reported[1] < reported[2]
    assert reported[2] == pytest.approx(epsilon([SEG] * 3, delta=1e-5))
    assert ledger.spent_epsilon("ds", delta=1e-5) == pytest.approx(reported[2])


def test_site_restarted_between_rounds_reports_same_epsilon_as_one_that_never_stopped(tmp_path: Path) -> None:
    steady = PrivacyLedger(tmp_path / "steady")
    for r in range(1, 5):
        last_steady = _charge(steady, r)
    for r in range(1, 5):
        restarted = PrivacyLedger(tmp_path / "restarted")  # a fresh object per round: a new process
        last_restarted = _charge(restarted, r)
    assert last_restarted == pytest.approx(last_steady, rel=1e-12)
    assert len(PrivacyLedger(tmp_path / "restarted").charges("ds")) == 4


def test_round_past_budget_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    one = epsilon([SEG], delta=1e-5)
    two = epsilon([SEG, SEG], delta=1e-5)
    budget = (one + two) / 2  # room for one round, not two
    _charge(ledger, 1, budget=budget)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(PrivacyBudgetError) as info:
        _charge(ledger, 2, budget=budget)
    assert info.value.budget == budget
    assert info.value.spent == pytest.approx(one)
    assert info.value.requested == pytest.approx(two - one)
    assert "budget" in str(info.value) and f"{budget:g}" in str(info.value)
    assert (tmp_path / LEDGER_FILE).read_bytes() == before


def test_datasets_are_accounted_separately(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, 1, dataset="a")
    _charge(ledger, 2, dataset="a")
    only_b = _charge(ledger, 1, dataset="b")
    assert only_b == pytest.approx(epsilon([SEG], delta=1e-5))


def test_noise_plan_reaches_target_exactly_after_planned_rounds(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    plan = ledger.plan_noise(
        "ds", run="r", sample_rate=0.1, steps_per_round=10, rounds=5, target_epsilon=4.0, budget_epsilon=8.0, delta=1e-5
    )
    seg = Segment(sample_rate=0.1, noise_multiplier=plan.noise_multiplier, steps=10)
    spent = [ledger.charge("ds", run="r", round=r, segment=seg, clip_norm=1.0, delta=1e-5, budget_epsilon=8.0) for r in range(1, 6)]
    assert spent[-1] <= 4.0
    assert spent[-1] == pytest.approx(4.0, rel=5e-3)
    # The plan is stored: the same run gets the same z on later rounds and after a restart.
    again = PrivacyLedger(tmp_path).plan_noise(
        "ds", run="r", sample_rate=0.1, steps_per_round=10, rounds=5, target_epsilon=4.0, budget_epsilon=8.0, delta=1e-5
    )
    assert again.noise_multiplier == plan.noise_multiplier


def test_noise_plan_is_capped_by_the_site_budget_not_the_run_target(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    plan = ledger.plan_noise(
        "ds", run="r", sample_rate=0.1, steps_per_round=10, rounds=3, target_epsilon=50.0, budget_epsilon=2.0, delta=1e-5
    )
    assert plan.target_epsilon == 2.0
    total = epsilon([Segment(sample_rate=0.1, noise_multiplier=plan.noise_multiplier, steps=30)], delta=1e-5)
    assert total <= 2.0


def test_second_run_plans_with_what_earlier_runs_spent(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for r in range(1, 4):
        _charge(ledger, r)
    spent = ledger.spent_epsilon("ds", delta=1e-5)
    plan = ledger.plan_noise(
        "ds", run="run-2", sample_rate=0.1, steps_per_round=10, rounds=2, target_epsilon=spent + 1.0, budget_epsilon=100.0, delta=1e-5
    )
    seg = Segment(sample_rate=0.1, noise_multiplier=plan.noise_multiplier, steps=20)
    assert epsilon([SEG] * 3 + [seg], delta=1e-5) <= spent + 1.0 + 1e-9


def test_exhausted_budget_is_refused_at_planning(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, 1)
    with pytest.raises(PrivacyBudgetError, match="no privacy is left"):
        ledger.plan_noise(
            "ds", run="run-2", sample_rate=0.1, steps_per_round=10, rounds=2, target_epsilon=0.01, budget_epsilon=100.0, delta=1e-5
        )


def test_unreadable_ledger_is_an_error_never_a_silent_reset(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyLedger(tmp_path).charges("ds")


def test_ledger_entries_carry_every_privacy_knob(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, 1)
    entry = json.loads((tmp_path / LEDGER_FILE).read_text())["datasets"]["ds"]["charges"][0]
    for key in ("sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "accountant", "run", "round"):
        assert key in entry

"""The coordinator's test schedule: which rounds are tested, on which held-out examples, and how it is stated."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedtune.cli.options import apply_flags
from fedtune.common.config import EvaluationConfig, RunConfig, from_dict, from_flat
from fedtune.common.errors import ConfigError
from fedtune.server.eval_schedule import EvalSchedule, scheduled_test
from fedtune.server.rounds import TestScore as Score  # "Test..." would be collected by pytest


def schedule(*, every: int = 1, sample: int = 0, final_full: bool = True, test_size: int = 200, num_rounds: int = 10,
             seed: int = 0) -> EvalSchedule:
    return EvalSchedule(settings=EvaluationConfig(every=every, sample=sample, final_full=final_full), test_size=test_size,
                        num_rounds=num_rounds, seed=seed)


@pytest.mark.parametrize(("every", "num_rounds", "expected"), [
    (1, 4, [1, 2, 3, 4]),
    (3, 10, [3, 6, 9, 10]),  # every third round, and the last one although 10 is not a multiple of 3
    (5, 10, [5, 10]),
    (7, 3, [3]),  # k past the run: the last round only
])
def test_every_k_rounds_and_always_the_last(every: int, num_rounds: int, expected: list[int]) -> None:
    plan = schedule(every=every, num_rounds=num_rounds)

    tested = [r for r in range(1, num_rounds + 1) if plan.tests(r)]

    assert tested == expected


def test_a_sample_is_used_before_the_last_round_which_gets_the_whole_split() -> None:
    plan = schedule(sample=50, test_size=200, num_rounds=4)

    assert [plan.sampled(r) for r in (1, 2, 3, 4)] == [True, True, True, False]
    assert plan.describe()["final_sampled"] is False and plan.describe()["final_examples"] == 200


def test_the_last_round_uses_the_sample_only_when_told_and_says_so() -> None:
    plan = schedule(sample=50, final_full=False, test_size=200, num_rounds=4)

    assert plan.sampled(4)
    described = plan.describe()
    assert described["final_sampled"] is True and described["final_examples"] == 50 and described["test_examples"] == 200


def test_a_sample_as_large_as_the_split_is_the_split() -> None:
    plan = schedule(sample=500, test_size=200, num_rounds=3)

    assert not any(plan.sampled(r) for r in (1, 2, 3))
    assert len(plan.sample_indices()) == 200
    # summary.json says the whole split: no sample (and no sample seed) was ever used.
    assert plan.describe() == {"every": 1, "sample": 0, "test_examples": 200, "final_full": True, "final_sampled": False,
                               "final_examples": 200, "sample_seed": None}
    assert schedule(sample=200, test_size=200).describe()["sample"] == 0
    assert schedule(sample=199, test_size=200).describe()["sample"] == 199


def test_the_sample_is_fixed_by_the_seed_distinct_and_inside_the_split() -> None:
    first = schedule(sample=30, test_size=100).sample_indices()
    again = schedule(sample=30, test_size=100, every=4, num_rounds=2).sample_indices()  # the schedule does not move it
    other_seed = schedule(sample=30, test_size=100, seed=1).sample_indices()

    assert first.tolist() == again.tolist()
    assert len(set(first.tolist())) == 30 and min(first) >= 0 and max(first) < 100
    assert first.tolist() == sorted(first.tolist())
    # Two independent draws of 30 of 100 agree in full with probability 1/C(100,30) (about 3e-26).
    assert first.tolist() != other_seed.tolist()


def test_scheduled_test_scores_the_rows_the_schedule_picks() -> None:
    full = TensorDataset(torch.arange(40).reshape(20, 2), torch.arange(20))
    plan = schedule(every=2, sample=5, test_size=20, num_rounds=5)
    seen: list[list[int]] = []

    def score(arrays: object, dataset: TensorDataset) -> Score:
        seen.append(dataset.tensors[1].tolist())  # which held-out rows were scored
        return Score(accuracy=0.5, macro_f1=0.5, loss=1.0, examples=len(dataset))

    test = scheduled_test(score, full, plan)  # type: ignore[arg-type]
    results = {r: test(None, r) for r in range(1, 6)}  # type: ignore[arg-type]
    before_training = test(None)  # type: ignore[arg-type]

    assert results[1] is None and results[3] is None, "rounds the schedule leaves untested release no score"
    expected_sample = plan.sample_indices().tolist()
    assert results[2] is not None and results[2].sampled and results[2].examples == 5
    assert results[4] is not None and results[4].sampled
    assert results[5] is not None and not results[5].sampled and results[5].examples == 20
    assert before_training is not None and before_training.examples == 20 and not before_training.sampled
    assert seen == [expected_sample, expected_sample, list(range(20)), list(range(20))]


def test_evaluation_settings_load_from_a_config_and_round_trip_through_flower_run_config() -> None:
    run = from_dict({"evaluation": {"every": 5, "sample": 1000, "final_full": False}})

    assert run.evaluation == EvaluationConfig(every=5, sample=1000, final_full=False)
    assert from_flat(run.to_flat()) == run
    assert RunConfig().evaluation == EvaluationConfig(every=1, sample=0, final_full=True), "the default tests every round on all examples"


def test_bad_evaluation_settings_name_the_key_the_value_and_the_flag() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"evaluation": {"every": 0, "sample": -3}})
    assert "evaluation.every must be an integer >= 1 (1: every round), got 0." in err.value.problems
    assert "evaluation.sample must be an integer >= 0 (0: the whole test split), got -3." in err.value.problems

    with pytest.raises(ConfigError) as flag_err:
        apply_flags({"eval_every": 0}, RunConfig())
    assert any("got 0" in p and "--eval-every" in p for p in flag_err.value.problems)


def test_cli_flags_set_the_evaluation_section() -> None:
    run = apply_flags({"eval_every": 3, "eval_sample": 256, "eval_sample_final": True}, RunConfig())

    assert run.evaluation == EvaluationConfig(every=3, sample=256, final_full=False)

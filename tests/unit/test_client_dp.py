"""Client-level DP (DP-FedAvg): clipping, the fixed-denominator noisy mean, Poisson sampling of
sites, the strategy wrapper over real Flower messages, N from the grid, and the accounting.

Every aggregate is compared with an oracle written here from numpy primitives (np.linalg.norm of
the flattened update, np.sum(...) / m), never with the module's own helpers.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from fedtune.common.accounting import Segment, calibrate_noise_multiplier, epsilon
from fedtune.common.config import RunConfig, from_dict
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.messages import RoundInstructions
from fedtune.server.aggregation import update_delta
from fedtune.server.app import client_dp_plan, make_strategy
from fedtune.server.client_dp import ClientLevelDP, clip_update, dp_fedavg_aggregate
from fedtune.server.client_dp_plan import (
    calibrate_client_noise,
    client_level_epsilon,
    client_sample_rate,
    connected_sites,
    poisson_sample,
)
from fedtune.server.records import RunRecorder
from fedtune.server.rounds import run_rounds

# Messages built outside a Flower runtime need the task identity the runtime would set.
pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4), "classifier.weight": (3, 8)}


def _random(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def _oracle_clip(delta: dict[str, np.ndarray], c: float) -> dict[str, np.ndarray]:
    norm = np.linalg.norm(_flat(delta))
    factor = min(1.0, c / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in delta.items()}


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_update_delta_is_update_minus_global_in_float64() -> None:
    # Prepare
    update, glob = _random(1), _random(2)

    # Execute
    delta = update_delta(update, glob)

    # Assert
    assert list(delta) == list(glob)
    for k in SHAPES:
        assert delta[k].dtype == np.float64
        np.testing.assert_array_equal(delta[k], update[k].astype(np.float64) - glob[k].astype(np.float64))


def test_update_delta_refuses_missing_names_and_wrong_shapes() -> None:
    glob = _random(2)
    with pytest.raises(UpdateError, match=r"missing: \['classifier.weight'\]"):
        update_delta({k: v for k, v in _random(1).items() if k != "classifier.weight"}, glob)
    with pytest.raises(UpdateError, match=r"a.lora_A.weight has shape \[2, 8\], expected \[4, 8\]"):
        update_delta({**_random(1), "a.lora_A.weight": np.zeros((2, 8), np.float32)}, glob)


def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    # Prepare: a delta of norm ~10, clipped to 1.5
    delta = _random(3, scale=10.0 / math.sqrt(88))
    independent_norm = float(np.linalg.norm(_flat(delta)))
    assert independent_norm > 1.5

    # Execute
    clipped, norm, was_clipped = clip_update(delta, 1.5)

    # Assert
    assert was_clipped
    assert norm == pytest.approx(independent_norm, rel=1e-12)
    assert np.linalg.norm(_flat(clipped)) == pytest.approx(1.5, rel=1e-12)
    cosine = _flat(clipped) @ _flat(delta) / (np.linalg.norm(_flat(clipped)) * independent_norm)
    assert cosine == pytest.approx(1.0, abs=1e-12)
    for k in SHAPES:
        np.testing.assert_allclose(clipped[k], delta[k].astype(np.float64) * (1.5 / independent_norm), rtol=1e-12)


def test_update_within_the_clip_norm_is_unchanged() -> None:
    delta = _random(4, scale=0.01)

    clipped, norm, was_clipped = clip_update(delta, 1.0)

    assert not was_clipped
    assert norm == pytest.approx(np.linalg.norm(_flat(delta)), rel=1e-12)
    for k in SHAPES:
        np.testing.assert_array_equal(clipped[k], delta[k].astype(np.float64))


def test_all_zero_update_is_returned_unchanged_without_dividing_by_its_norm() -> None:
    # Prepare: the case Flower's clip_inputs_inplace fails on
    delta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    # Execute: any 0/0 or x/0 would raise here
    with np.errstate(all="raise"):
        clipped, norm, was_clipped = clip_update(delta, 1.0)

    # Assert
    assert norm == 0.0
    assert not was_clipped
    for k, s in SHAPES.items():
        assert clipped[k].shape == s
        assert not clipped[k].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_refused_rather_than_passed_unclipped(bad: float) -> None:
    delta = _random(5)
    delta["classifier.weight"][0, 0] = bad
    with pytest.raises(UpdateError, match="cannot be clipped"):
        clip_update(delta, 1.0)


def test_noiseless_aggregate_with_a_huge_clip_norm_is_the_sum_over_expected_sites() -> None:
    # Prepare
    deltas = [_random(s) for s in (10, 11, 12)]
    m = 3

    # Execute
    mean = dp_fedavg_aggregate(deltas, clip_norm=1e9, noise_multiplier=0.0, expected_sites=m, rng=np.random.default_rng(0))

    # Assert
    for k in SHAPES:
        oracle = np.sum([d[k].astype(np.float64) for d in deltas], axis=0) / m
        np.testing.assert_allclose(mean[k], oracle, rtol=1e-12, atol=1e-15)


def test_denominator_is_the_expected_number_of_sites_not_the_number_that_replied() -> None:
    # Prepare: 4 sites expected, 2 replied
    deltas = [_random(20), _random(21)]

    # Execute
    mean = dp_fedavg_aggregate(deltas, clip_norm=1e9, noise_multiplier=0.0, expected_sites=4, rng=np.random.default_rng(0))

    # Assert: half of the plain mean of the two replies
    for k in SHAPES:
        plain_mean = np.mean([d[k].astype(np.float64) for d in deltas], axis=0)
        np.testing.assert_allclose(mean[k], 0.5 * plain_mean, rtol=1e-12, atol=1e-15)


def test_noiseless_aggregate_clips_each_site_before_summing() -> None:
    # Prepare: norms ~0.3, ~3 and ~30 against C = 1
    deltas = [_random(30 + i, scale=s / math.sqrt(88)) for i, s in enumerate((0.3, 3.0, 30.0))]

    # Execute
    mean = dp_fedavg_aggregate(deltas, clip_norm=1.0, noise_multiplier=0.0, expected_sites=5, rng=np.random.default_rng(0))

    # Assert
    for k in SHAPES:
        oracle = np.sum([_oracle_clip(d, 1.0)[k] for d in deltas], axis=0) / 5
        np.testing.assert_allclose(mean[k], oracle, rtol=1e-12, atol=1e-15)


# 200,000 coordinates; z C / m = 1.5 * 2.0 / 3 = 1.0. Standard errors: of the mean 1/sqrt(n) = 0.0022,
# of the sample std ~ sigma/sqrt(2n) = 0.0016, of the fraction within one sigma
# sqrt(0.6827 * 0.3173 / n) = 0.0010. Each check allows 5 standard errors: for a seed drawn at random
# the three together fail with probability < 2e-6 (the seed is fixed, so the test is deterministic).
NOISE_SHAPES = {"lora_A": (400, 250), "lora_B": (250, 400)}  # one LoRA pair of rank 400, 200,000 coordinates
N_COORDS = 200_000


def _check_standard_normal(residual: np.ndarray, sigma: float) -> None:
    n = residual.size
    assert abs(residual.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(residual.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    p = 0.682689492  # P(|X| < sigma) for a Gaussian
    assert abs(np.mean(np.abs(residual) < sigma) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_noise_is_gaussian_with_std_z_c_over_m_on_the_mean() -> None:
    # Prepare: two sites with deltas well inside C, so the residual is the noise alone
    deltas = [_random(40 + i, NOISE_SHAPES, scale=1e-3) for i in range(2)]
    assert all(np.linalg.norm(_flat(d)) < 2.0 for d in deltas)

    # Execute
    mean = dp_fedavg_aggregate(deltas, clip_norm=2.0, noise_multiplier=1.5, expected_sites=3, rng=np.random.default_rng(7))

    # Assert
    residual = np.concatenate(
        [(mean[k] - np.sum([d[k].astype(np.float64) for d in deltas], axis=0) / 3).ravel() for k in NOISE_SHAPES]
    )
    assert residual.size == N_COORDS
    _check_standard_normal(residual, 1.0)
    # The two tensors get independent draws, not the same one.
    a, b = (mean[k].ravel()[:50_000] for k in NOISE_SHAPES)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(50_000)


def test_noise_is_released_even_when_no_site_replied() -> None:
    template = {k: np.zeros(s, np.float32) for k, s in NOISE_SHAPES.items()}

    mean = dp_fedavg_aggregate([], clip_norm=2.0, noise_multiplier=1.5, expected_sites=3, rng=np.random.default_rng(8), template=template)

    _check_standard_normal(_flat(mean), 1.0)


def test_aggregate_without_deltas_or_template_is_refused() -> None:
    with pytest.raises(ConfigError, match="template"):
        dp_fedavg_aggregate([], clip_norm=1.0, noise_multiplier=1.0, expected_sites=2, rng=np.random.default_rng(0))


SHARED_KNOB_ERRORS = [
    ({"clip_norm": 0.0}, "`clip_norm` must be a finite number > 0, got 0.0"),
    ({"clip_norm": math.inf}, "`clip_norm` must be a finite number > 0, got inf"),
    ({"noise_multiplier": -0.5}, "`noise_multiplier` must be a finite number >= 0, got -0.5"),
    ({"noise_multiplier": math.nan}, "`noise_multiplier` must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [*SHARED_KNOB_ERRORS, ({"expected_sites": 0}, "`expected_sites` must be a finite number > 0"), ({"expected_sites": True}, "got True")],
)
def test_out_of_range_knobs_of_the_aggregate_are_refused_naming_the_value(kwargs: dict, fragment: str) -> None:  # type: ignore[type-arg]
    knobs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_sites": 3, **kwargs}
    with pytest.raises(ConfigError) as pure:
        dp_fedavg_aggregate([_random(0)], rng=np.random.default_rng(0), **knobs)
    assert fragment in str(pure.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        *SHARED_KNOB_ERRORS,
        ({"sample_rate": 0.0}, "`sample_rate` (q) must be in (0, 1], got 0.0"),
        ({"sample_rate": 1.5}, "`sample_rate` (q) must be in (0, 1], got 1.5"),
        ({"sites": 0}, "`sites` (N) must be an integer >= 1, got 0"),
        ({"sites": 2.5}, "`sites` (N) must be an integer >= 1, got 2.5"),
        ({"sampling_rng": np.random.default_rng(0)}, "`sampling_rng` must be a random.Random or None, got Generator"),
    ],
)
def test_out_of_range_knobs_of_the_wrapper_are_refused_naming_the_value(kwargs: dict, fragment: str) -> None:  # type: ignore[type-arg]
    knobs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.5, "sites": 4, **kwargs}
    with pytest.raises(ConfigError) as wrapper:
        ClientLevelDP(FedAvg(), **knobs)
    assert fragment in str(wrapper.value)


def test_wrapper_reports_every_bad_knob_at_once_and_refuses_a_non_strategy() -> None:
    with pytest.raises(ConfigError) as err:
        ClientLevelDP(object(), clip_norm=-1.0, noise_multiplier=-1.0, sample_rate=0.0, sites=0)  # type: ignore[arg-type]
    assert len(err.value.problems) == 5
    assert "`inner` must be a flwr.serverapp.strategy.Strategy, got object" in str(err.value)


# ---------------------------------------------------------------------------------------------
# The strategy wrapper over real Flower messages
# ---------------------------------------------------------------------------------------------


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})


def _request(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(arrays: dict[str, np.ndarray], *, node: int = 1, n: int = 10) -> Message:
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0})
    return Message(RecordDict({"arrays": _record(arrays), "metrics": metrics}), reply_to=_request(node))


class SpyStrategy(Strategy):
    """Records what it is asked; must never be asked to sample or aggregate training."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []  # type: ignore[type-arg]

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.calls.append(("configure_train", server_round))
        raise AssertionError("the wrapper must not delegate configure_train (FedAvg samples a fixed number of sites)")

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        self.calls.append(("aggregate_train", server_round))
        raise AssertionError("the wrapper must not delegate aggregate_train")

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.calls.append(("configure_evaluate", server_round, arrays, config, grid))
        return ["evaluate-messages"]

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        self.calls.append(("aggregate_evaluate", server_round, replies))
        return MetricRecord({"accuracy": 0.5})

    def summary(self) -> None:
        self.calls.append(("summary",))


class NodesOnlyGrid:
    """Just enough of a Grid for sampling: the ids of the connected nodes (a fake of fedtune's own
    counterpart, not of anything under test; `connects_per_look` makes nodes arrive one look at a time)."""

    def __init__(self, n: int, *, start: int | None = None, connects_per_look: int = 0) -> None:
        self.n = n
        self.online = n if start is None else start
        self.connects_per_look = connects_per_look
        self.looks = 0

    def get_node_ids(self) -> list[int]:
        self.looks += 1
        ids = list(range(101, 101 + self.online))
        self.online = min(self.n, self.online + self.connects_per_look)
        return ids[::-1]  # not sorted: the order must not matter



def test_wrapper_delegates_evaluation_and_summary_but_samples_and_aggregates_training_itself() -> None:
    # Prepare
    spy = SpyStrategy()
    dp = ClientLevelDP(spy, clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, sites=3, seed=0)
    glob, config, grid = _record(_random(0)), ConfigRecord({"lr": 0.1}), NodesOnlyGrid(3)

    # Execute
    train_messages = list(dp.configure_train(4, glob, config, grid))  # type: ignore[arg-type]
    dp.aggregate_train(4, [])
    evaluate_messages = dp.configure_evaluate(4, glob, config, grid)  # type: ignore[arg-type]
    evaluated = dp.aggregate_evaluate(4, ["reply"])  # type: ignore[list-item]
    dp.summary()

    # Assert
    assert [c[0] for c in spy.calls] == ["configure_evaluate", "aggregate_evaluate", "summary"]
    assert spy.calls[0][1:] == (4, glob, config, grid)
    assert evaluate_messages == ["evaluate-messages"]
    assert spy.calls[1][1:] == (4, ["reply"])
    assert evaluated is not None and evaluated["accuracy"] == 0.5
    # q = 1: one train message per connected node, each carrying the global adapter and the config
    assert sorted(m.metadata.dst_node_id for m in train_messages) == [101, 102, 103]
    for m in train_messages:
        assert m.metadata.message_type == MessageType.TRAIN
        assert m.content["arrays"] is glob
        assert dict(m.content["config"]) == {"lr": 0.1, "server-round": 4}


def test_wrapper_returns_global_plus_unweighted_mean_delta_over_expected_sites() -> None:
    # Prepare: 3 of 4 expected sites reply, with very different example counts
    glob = _random(0)
    updates = [_random(s) for s in (1, 2, 3)]
    dp = ClientLevelDP(SpyStrategy(), clip_norm=1e9, noise_multiplier=0.0, sample_rate=1.0, sites=4, seed=0)
    dp.configure_train(1, _record(glob), ConfigRecord(), NodesOnlyGrid(4))  # type: ignore[arg-type]
    replies = [_reply(u, node=i + 1, n=n) for i, (u, n) in enumerate(zip(updates, (10, 1000, 3)))]

    # Execute
    arrays, metrics = dp.aggregate_train(1, replies)

    # Assert
    assert arrays is not None and metrics is not None
    assert list(arrays.keys()) == list(SHAPES)
    for k, shape in SHAPES.items():
        got = arrays[k].numpy()
        assert got.dtype == np.float32 and got.shape == shape
        oracle = glob[k] + np.sum([u[k].astype(np.float64) - glob[k] for u in updates], axis=0) / 4
        np.testing.assert_allclose(got, oracle, rtol=1e-6, atol=1e-6)  # float32
    assert metrics["client-dp-clipped-fraction"] == 0.0
    assert metrics["client-dp-noise-std"] == 0.0
    assert metrics["client-dp-sites"] == 3


def test_wrapper_clips_each_site_delta_and_reports_the_clipped_fraction() -> None:
    # Prepare: deltas of norm ~0.3, ~3, ~30 and ~0.1 against C = 1
    glob = _random(0)
    deltas = [_random(50 + i, scale=s / math.sqrt(88)) for i, s in enumerate((0.3, 3.0, 30.0, 0.1))]
    dp = ClientLevelDP(SpyStrategy(), clip_norm=1.0, noise_multiplier=0.0, sample_rate=1.0, sites=4, seed=0)
    dp.configure_train(2, _record(glob), ConfigRecord(), NodesOnlyGrid(4))  # type: ignore[arg-type]
    replies = [_reply({k: glob[k] + d[k] for k in SHAPES}, node=i + 1) for i, d in enumerate(deltas)]

    # Execute
    arrays, metrics = dp.aggregate_train(2, replies)

    # Assert
    assert arrays is not None and metrics is not None
    sent = [{k: (glob[k] + d[k]).astype(np.float64) - glob[k] for k in SHAPES} for d in deltas]  # what arrived
    for k in SHAPES:
        oracle = glob[k] + np.sum([_oracle_clip(s, 1.0)[k] for s in sent], axis=0) / 4
        np.testing.assert_allclose(arrays[k].numpy(), oracle, rtol=1e-6, atol=1e-6)
    assert metrics["client-dp-clipped-fraction"] == 0.5


def test_wrapper_adds_seeded_noise_of_std_z_c_over_m_around_the_mean() -> None:
    # Prepare: z C / m = 1.5 * 2 / 3 = 1; tolerances and flake rate as for NOISE_SHAPES above
    glob = _random(0, NOISE_SHAPES)
    updates = [{k: v + 1e-3 for k, v in _random(60 + i, NOISE_SHAPES).items()} for i in range(2)]
    make = lambda: ClientLevelDP(SpyStrategy(), clip_norm=2.0, noise_multiplier=1.5, sample_rate=1.0, sites=3, seed=11)  # noqa: E731
    dp, twin = make(), make()
    for s in (dp, twin):
        s.configure_train(1, _record(glob), ConfigRecord(), NodesOnlyGrid(3))  # type: ignore[arg-type]
    replies = [_reply({k: glob[k] + 1e-3 * np.sign(u[k]) for k in NOISE_SHAPES}) for u in updates]

    # Execute
    arrays, metrics = dp.aggregate_train(1, replies)
    again, _ = twin.aggregate_train(1, replies)

    # Assert
    assert arrays is not None and again is not None and metrics is not None
    assert metrics["client-dp-noise-std"] == pytest.approx(1.0)
    sent = [{k: (glob[k] + 1e-3 * np.sign(u[k])).astype(np.float32).astype(np.float64) for k in NOISE_SHAPES} for u in updates]
    residual = np.concatenate(
        [
            (arrays[k].numpy().astype(np.float64) - (glob[k] + np.sum([s[k] - glob[k] for s in sent], axis=0) / 3)).ravel()
            for k in NOISE_SHAPES
        ]
    )
    _check_standard_normal(residual, 1.0)
    for k in NOISE_SHAPES:
        np.testing.assert_array_equal(arrays[k].numpy(), again[k].numpy())  # same seed, same noise


def test_wrapper_without_a_seed_draws_fresh_noise_every_time() -> None:
    glob = _random(0, NOISE_SHAPES)
    results = []
    for _ in range(2):
        dp = ClientLevelDP(SpyStrategy(), clip_norm=2.0, noise_multiplier=1.5, sample_rate=1.0, sites=3)
        dp.configure_train(1, _record(glob), ConfigRecord(), NodesOnlyGrid(3))  # type: ignore[arg-type]
        arrays, _ = dp.aggregate_train(1, [_reply(glob)])
        assert arrays is not None
        results.append(np.concatenate([arrays[k].numpy().astype(np.float64).ravel() - glob[k].ravel() for k in NOISE_SHAPES]))

    _check_standard_normal(results[0], 1.0)
    _check_standard_normal(results[1], 1.0)
    assert abs(np.corrcoef(results[0], results[1])[0, 1]) < 5 / math.sqrt(N_COORDS)


def test_wrapper_skips_error_and_malformed_replies_keeping_the_fixed_denominator() -> None:
    # Prepare
    glob = _random(0)
    good = _random(1)
    nan = _random(2)
    nan["classifier.weight"][1, 1] = np.nan
    error = Message(Error(code=100, reason="PrivacyBudgetError: over budget"), reply_to=_request(3))
    dp = ClientLevelDP(SpyStrategy(), clip_norm=1e9, noise_multiplier=0.0, sample_rate=1.0, sites=4, seed=0)
    dp.configure_train(1, _record(glob), ConfigRecord(), NodesOnlyGrid(4))  # type: ignore[arg-type]

    # Execute
    arrays, metrics = dp.aggregate_train(
        1, [_reply(good), _reply(nan, node=2), error, _reply({k: v for k, v in _random(4).items() if k != "classifier.weight"}, node=4)]
    )

    # Assert
    assert arrays is not None and metrics is not None
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), glob[k] + (good[k].astype(np.float64) - glob[k]) / 4, rtol=1e-6, atol=1e-6)
    assert metrics["client-dp-sites"] == 1


def test_wrapper_releases_noise_when_no_site_replied() -> None:
    glob = _random(0, NOISE_SHAPES)
    dp = ClientLevelDP(SpyStrategy(), clip_norm=2.0, noise_multiplier=1.5, sample_rate=1.0, sites=3, seed=5)
    dp.configure_train(1, _record(glob), ConfigRecord(), NodesOnlyGrid(3))  # type: ignore[arg-type]

    arrays, metrics = dp.aggregate_train(1, [])

    assert arrays is not None and metrics is not None
    assert "client-dp-clipped-fraction" not in metrics  # no site to count: absent, not 0
    _check_standard_normal(np.concatenate([arrays[k].numpy().astype(np.float64).ravel() - glob[k].ravel() for k in NOISE_SHAPES]), 1.0)


def test_aggregate_train_before_configure_train_is_refused() -> None:
    dp = ClientLevelDP(SpyStrategy(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, sites=3, seed=0)
    with pytest.raises(RuntimeError, match="configure_train was last called for round None"):
        dp.aggregate_train(1, [])


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------

# (q, z, T, delta, epsilon) pinned with Google's dp-accounting 0.6.0 (shares no code with Opacus):
#
#   import dp_accounting
#   acc = dp_accounting.rdp.RdpAccountant()  # neighboring_relation defaults to ADD_OR_REMOVE_ONE
#   acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), T)
#   print(f"{acc.get_epsilon(delta):.6g}")
#
# Points chosen where its fractional-order series converges (no "failed to converge" warning).
PINNED_CLIENT_LEVEL = [
    (0.2, 3.0, 100, 1e-5, 3.25398),
    (0.05, 2.0, 300, 1e-6, 2.38709),
    (0.1, 1.5, 100, 1e-5, 3.92354),
    (1.0, 5.0, 20, 1e-5, 4.16162),
]


@pytest.mark.parametrize(("q", "z", "rounds", "delta", "expected"), PINNED_CLIENT_LEVEL)
def test_client_level_epsilon_matches_the_accountant_and_dp_accounting(
    q: float, z: float, rounds: int, delta: float, expected: float
) -> None:
    eps = client_level_epsilon(sample_rate=q, noise_multiplier=z, rounds=rounds, delta=delta)

    assert eps == epsilon([Segment(q, z, rounds)], delta=delta)
    assert eps == pytest.approx(expected, rel=0.01)


def test_client_level_epsilon_decreases_with_more_noise() -> None:
    eps = [client_level_epsilon(sample_rate=0.1, noise_multiplier=z, rounds=100, delta=1e-5) for z in (0.8, 1.0, 1.5, 2.5, 4.0)]

    assert all(a > b for a, b in zip(eps, eps[1:])), eps


def test_client_level_epsilon_is_infinite_without_noise_and_zero_without_rounds() -> None:
    assert client_level_epsilon(sample_rate=0.5, noise_multiplier=0.0, rounds=10, delta=1e-5) == math.inf
    assert client_level_epsilon(sample_rate=0.5, noise_multiplier=1.0, rounds=0, delta=1e-5) == 0.0
    with pytest.raises(ConfigError, match="`sample_rate` must be in"):
        client_level_epsilon(sample_rate=0.0, noise_multiplier=0.0, rounds=10, delta=1e-5)
    with pytest.raises(ConfigError, match="`delta` must be in"):
        client_level_epsilon(sample_rate=0.5, noise_multiplier=0.0, rounds=10, delta=0.0)


def test_calibrated_client_noise_meets_the_target_without_overshoot() -> None:
    # Prepare
    target, delta, q, rounds = 4.0, 1e-5, 0.2, 50

    # Execute
    z = calibrate_client_noise(target_epsilon=target, delta=delta, sample_rate=q, rounds=rounds)

    # Assert
    assert z == calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=rounds)
    assert client_level_epsilon(sample_rate=q, noise_multiplier=z, rounds=rounds, delta=delta) <= target
    assert client_level_epsilon(sample_rate=q, noise_multiplier=z * (1 - 2e-3), rounds=rounds, delta=delta) > target


def test_plan_epsilon_is_dp_accountings_poisson_sampled_gaussian_for_add_remove_neighbours() -> None:
    # Prepare: N = 10 connected sites, f = 0.2 -> q = 0.2; z = 3 fixed, T = 100, delta = 1e-5.
    # 3.25398 is the first row of PINNED_CLIENT_LEVEL (dp-accounting 0.6.0, add/remove one site).
    run = _deployed_run(sites=10, fraction_train=0.2, rounds=100, noise_multiplier=3.0)

    # Execute
    plan = client_dp_plan(run, NodesOnlyGrid(10))

    # Assert
    assert plan.sample_rate == 0.2 and plan.sites == 10 and plan.expected_sites == pytest.approx(2.0)
    assert plan.epsilon == pytest.approx(3.25398, rel=0.01)


def test_calibrated_plan_epsilon_matches_dp_accounting_computed_here() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    # Prepare: q = max(0.1, min_sites / N) = 0.25 with N = 8 and min_sites = 2; z calibrated to 6 over 40 rounds
    run = _deployed_run(sites=8, fraction_train=0.1, rounds=40, target_epsilon=6.0)

    # Execute
    plan = client_dp_plan(run, NodesOnlyGrid(8))

    # Assert: Google's independent RDP accountant, for Poisson sampling and add/remove-one neighbours
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(plan.noise_multiplier)), 40)
    independent = acc.get_epsilon(1e-5)
    assert plan.sample_rate == 0.25
    assert plan.epsilon == pytest.approx(independent, rel=0.01)
    assert independent <= 6.0 * 1.01


# ---------------------------------------------------------------------------------------------
# Poisson sampling of sites
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sites", "fraction", "min_sites", "q"),
    [(10, 0.3, 2, 0.3), (10, 0.1, 2, 0.2), (3, 0.5, 2, 2 / 3), (4, 1.0, 2, 1.0), (2, 0.2, 3, 1.0), (100, 0.05, 1, 0.05)],
)
def test_sample_rate_is_the_fraction_raised_until_min_sites_are_expected(sites: int, fraction: float, min_sites: int, q: float) -> None:
    assert client_sample_rate(sites=sites, fraction_train=fraction, min_sites=min_sites) == pytest.approx(q, rel=1e-15)


def test_sample_rate_refuses_impossible_settings_naming_them() -> None:
    with pytest.raises(ConfigError) as err:
        client_sample_rate(sites=0, fraction_train=0.0, min_sites=-1)
    assert err.value.problems == [
        "`sites` (N) must be an integer >= 1, got 0.",
        "`fraction_train` must be in (0, 1], got 0.0.",
        "`min_sites` must be an integer >= 0, got -1.",
    ]


# 50 connected sites, q = 0.3, R = 2,000 rounds through the deployed sampler (random.SystemRandom, not
# seedable: the test is not deterministic). Each site's count is Binomial(R, q): mean 600, sd 20.49; the
# total is Binomial(50 R, q): mean 30,000, sd 144.9. The round size is Binomial(50, q) with variance
# 10.5; the sample variance over R rounds has sd ~ 10.5 * sqrt(2 / R + (1 - 6 q (1 - q)) / (50 q (1 - q) R))
# = 0.33. Every check allows 5.5 sd (two-sided tail 3.8e-8 each, normal approximation); with 52 checks
# the test fails by chance with probability < 2.1e-6. A fixed-size sample of 15 would pass the rates but
# fail the variance (0 instead of 10.5).
SAMPLING_ROUNDS = 2000


def test_deployed_sampler_includes_each_site_independently_with_probability_q() -> None:
    # Prepare
    n, q, rounds = 50, 0.3, SAMPLING_ROUNDS
    dp = ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=q, sites=n)
    grid, glob = NodesOnlyGrid(n), _record(_random(0))
    assert isinstance(dp.sampling_rng, random.SystemRandom)  # the OS CSPRNG, not a seedable generator

    # Execute
    counts = dict.fromkeys(range(101, 101 + n), 0)
    sizes = []
    for r in range(1, rounds + 1):
        messages = list(dp.configure_train(r, glob, ConfigRecord(), grid))  # type: ignore[arg-type]
        sizes.append(len(messages))
        for m in messages:
            counts[m.metadata.dst_node_id] += 1

    # Assert
    sd_site = math.sqrt(rounds * q * (1 - q))
    assert all(abs(c - rounds * q) < 5.5 * sd_site for c in counts.values()), counts
    assert abs(sum(counts.values()) - n * rounds * q) < 5.5 * math.sqrt(n * rounds * q * (1 - q))
    var = n * q * (1 - q)
    sd_var = var * math.sqrt(2 / rounds + (1 - 6 * q * (1 - q)) / (var * rounds))
    assert abs(float(np.var(sizes, ddof=1)) - var) < 5.5 * sd_var, float(np.var(sizes, ddof=1))


def test_seeded_sampling_is_reproducible_whatever_order_the_grid_lists_nodes_in() -> None:
    ids = list(range(1, 41))

    first = poisson_sample(sorted(ids), 0.5, random.Random(3))
    again = poisson_sample(sorted(ids), 0.5, random.Random(3))
    via_wrapper = [
        m.metadata.dst_node_id
        for m in ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, sites=40, seed=3).configure_train(
            1, _record(_random(0)), ConfigRecord(), NodesOnlyGrid(40)  # type: ignore[arg-type]
        )
    ]

    assert first == again
    assert 0 < len(first) < 40
    assert via_wrapper == [i + 100 for i in first]  # the grid lists 140..101; sampling sees them sorted


class _NeverSample(random.Random):
    """A sampling source whose every draw is the largest double below 1: no site is ever sampled for q < 1."""

    def random(self) -> float:
        return 1.0 - 2.0**-53


def test_round_with_no_sampled_site_still_releases_a_noised_adapter(tmp_path: Path) -> None:
    # Prepare: q = 0.5 of N = 3 (m = 1.5), z C / m = 1.5 * 1.0 / 1.5 = 1.0; no site is sampled
    glob = {k: v.astype(np.float32) for k, v in _random(0, NOISE_SHAPES).items()}
    dp = ClientLevelDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.5, sample_rate=0.5, sites=3, seed=9, sampling_rng=_NeverSample())
    checkpoints: list[int] = []

    # Execute: the real round loop, one round
    final, totals = run_rounds(
        NodesOnlyGrid(3),  # type: ignore[arg-type]
        dp,
        initial=_record(glob),
        num_rounds=1,
        instructions=RoundInstructions(server_round=1, num_rounds=1, labels=("a", "b")),
        timeout=1.0,
        recorder=RunRecorder(tmp_path),
        checkpoint=lambda r, _arrays: checkpoints.append(r),
        validate=False,
        echo=lambda _line: None,
    )

    # Assert: the released adapter is the global one plus N(0, 1) on every coordinate
    assert checkpoints == [1] and totals.bytes_down == 0
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["sites_sampled"] == 0 and line["client_dp"]["client-dp-sites"] == 0
    assert line["client_dp"]["client-dp-noise-std"] == pytest.approx(1.0)
    residual = np.concatenate([final[k].numpy().astype(np.float64).ravel() - glob[k].astype(np.float64).ravel() for k in NOISE_SHAPES])
    _check_standard_normal(residual, 1.0)


# ---------------------------------------------------------------------------------------------
# N: the sites actually there
# ---------------------------------------------------------------------------------------------


def _deployed_run(
    *, sites: int, fraction_train: float = 1.0, rounds: int = 5, noise_multiplier: float = 0.0, target_epsilon: float = 8.0,
    round_timeout: float = 5.0, simulation: bool = False,
) -> RunConfig:
    return from_dict(
        {
            "simulation": simulation,
            "federation": {"sites": sites, "fraction_train": fraction_train, "rounds": rounds, "round_timeout": round_timeout},
            "client_dp": {"enabled": True, "noise_multiplier": noise_multiplier, "target_epsilon": target_epsilon},
        }
    )


class NoGrid:
    def get_node_ids(self) -> list[int]:
        raise AssertionError("a simulation takes N from federation.sites, not from the grid")


def test_deployed_plan_takes_n_from_the_connected_sites_and_records_the_scheme() -> None:
    # Prepare: 5 sites planned and connected; f = 0.4
    run = _deployed_run(sites=5, fraction_train=0.4)
    grid = NodesOnlyGrid(5)

    # Execute
    plan = client_dp_plan(run, grid)  # type: ignore[arg-type]
    record = plan.to_dict()
    strategy = make_strategy(run, plan)

    # Assert
    assert grid.looks >= 1
    assert record["sites"] == 5 and record["sample_rate"] == 0.4 and record["expected_sites"] == pytest.approx(2.0)
    assert record["sampling_scheme"] == "poisson" and "Poisson" in record["sampling"]
    assert record["neighbouring"] == "add or remove one site (all of its data)"
    assert "grid.get_node_ids" in record["sites_source"]
    assert record["epsilon"] <= 8.0
    assert isinstance(strategy, ClientLevelDP)
    assert (strategy.sample_rate, strategy.sites, strategy.noise_multiplier) == (0.4, 5, plan.noise_multiplier)
    assert isinstance(strategy.sampling_rng, random.SystemRandom)


def test_deployed_plan_waits_for_sites_still_connecting() -> None:
    # Prepare: 4 planned, 1 online at the first look, one more at each look
    grid = NodesOnlyGrid(4, start=1, connects_per_look=1)

    # Execute
    plan = client_dp_plan(_deployed_run(sites=4), grid)  # type: ignore[arg-type]

    # Assert
    assert plan.sites == 4 and grid.looks == 4


def test_deployed_run_with_more_connected_sites_than_planned_is_refused_naming_both() -> None:
    # The config default (3) against 10 registered sites: refused at once, not calibrated for 3
    run = from_dict({"simulation": False, "client_dp": {"enabled": True}})
    assert run.federation.sites == 3

    with pytest.raises(ConfigError) as err:
        client_dp_plan(run, NodesOnlyGrid(10))  # type: ignore[arg-type]

    assert "federation.sites = 3 sites" in str(err.value) and "but 10 are connected" in str(err.value)


def test_deployed_run_with_fewer_connected_sites_than_planned_is_refused_after_the_wait() -> None:
    run = _deployed_run(sites=10, round_timeout=0.3)

    with pytest.raises(ConfigError) as err:
        client_dp_plan(run, NodesOnlyGrid(3))  # type: ignore[arg-type]

    assert "federation.sites = 10 sites" in str(err.value)
    assert "but 3 were connected after waiting 0.3 s" in str(err.value)


def test_connected_sites_counts_distinct_nodes() -> None:
    class Doubled:
        def get_node_ids(self) -> list[int]:
            return [7, 7, 8]

    assert connected_sites(Doubled(), planned=2, timeout=0.0) == 2  # type: ignore[arg-type]


def test_simulated_plan_takes_n_from_federation_sites() -> None:
    run = _deployed_run(sites=6, fraction_train=0.5, simulation=True)

    plan = client_dp_plan(run, NoGrid())  # type: ignore[arg-type]

    assert plan.sites == 6 and plan.sample_rate == 0.5
    assert plan.to_dict()["sites_source"].startswith("federation.sites (simulation")

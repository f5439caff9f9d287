"""Robust aggregation rules (median, trimmed mean, Krum, Multi-Krum) and their strategy wrapper.

Every aggregate is compared with an oracle written here from NumPy primitives, tensor by tensor
(np.median; np.sort then slice; Krum by brute force over all pairs with np.linalg.norm), never
with the module's own helpers. The robustness tests check the bounds stated in
``server/aggregation.py``'s docstring, computed here from the honest updates alone, and check that
the plain mean breaks them, so the attack is strong enough for the test to fail.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.common.config import RunConfig, from_dict, parse_aggregation
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.messages import RoundInstructions
from fedtune.server.aggregation import (
    TooFewUpdates,
    coordinate_median,
    krum,
    krum_scores,
    robust_aggregate,
    trimmed_mean,
    updates_from,
)
from fedtune.server.app import make_strategy
from fedtune.server.records import RunRecorder
from fedtune.server.robust import RobustAggregation
from fedtune.server.rounds import run_rounds

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4), "classifier.weight": (3, 6), "classifier.bias": (3,)}


def _random(seed: int, scale: float = 1.0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: scale * rng.normal(size=s) for k, s in shapes.items()}


def _updates(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return [_random(1000 * seed + k) for k in range(n)]


# ---------------------------------------------------------------------------------------------
# Oracles (tensor by tensor, from NumPy primitives)
# ---------------------------------------------------------------------------------------------


def _oracle_median(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0) for k in SHAPES}


def _oracle_trimmed(updates: list[dict[str, np.ndarray]], beta: float) -> dict[str, np.ndarray]:
    n = len(updates)
    # k = floor(BETA n) with BETA as the decimal written in the config (0.29 * 100 = 29).
    k = int((Decimal(str(beta)) * n).to_integral_value(rounding=ROUND_FLOOR))
    return {name: np.mean(np.sort(np.stack([u[name] for u in updates]), axis=0)[k : n - k], axis=0) for name in SHAPES}


def _oracle_krum(updates: list[dict[str, np.ndarray]], f: int, m: int) -> tuple[dict[str, np.ndarray], list[int]]:
    n = len(updates)
    dist2 = [[sum(np.linalg.norm(updates[i][k] - updates[j][k]) ** 2 for k in SHAPES) for j in range(n)] for i in range(n)]
    scores = [sum(sorted(dist2[i][j] for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return {k: np.mean([updates[i][k] for i in chosen], axis=0) for k in SHAPES}, chosen


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(np.linalg.norm(np.asarray(a[k], dtype=np.float64) - b[k]) ** 2 for k in SHAPES))


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], **tol: float) -> None:
    assert list(got) == list(want)
    for k, value in want.items():
        np.testing.assert_allclose(got[k], value, rtol=tol.get("rtol", 1e-12), atol=tol.get("atol", 1e-12))


# ---------------------------------------------------------------------------------------------
# Each rule against its oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_median_matches_numpy_median(n: int, seed: int) -> None:
    updates = _updates(n, seed)

    got = coordinate_median(updates)

    _assert_close(got, _oracle_median(updates))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 11])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.29, 0.45])
def test_trimmed_mean_matches_sorted_trim(n: int, beta: float) -> None:
    updates = _updates(n, 3)

    got = trimmed_mean(updates, beta)

    _assert_close(got, _oracle_trimmed(updates, beta))


def test_trimmed_mean_reads_beta_as_the_decimal_written() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the config means 29 of 100.
    updates = _updates(100, 4)

    got = trimmed_mean(updates, 0.29)

    _assert_close(got, _oracle_trimmed(updates, 0.29))
    below = {k: np.mean(np.sort(np.stack([u[k] for u in updates]), axis=0)[28:72], axis=0) for k in SHAPES}
    assert _distance(got, below) > 1e-6  # a floor(0.29 * 100) = 28 implementation would fail


@pytest.mark.parametrize(("n", "f"), [(3, 0), (4, 0), (5, 1), (6, 1), (9, 2), (12, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_and_multi_krum_match_brute_force_over_all_pairs(n: int, f: int, seed: int) -> None:
    updates = _updates(n, seed)

    one = krum(updates, f)
    multi = robust_aggregate(parse_aggregation(f"multi-krum:{f}"), updates)

    want_one, chosen_one = _oracle_krum(updates, f, 1)
    want_multi, chosen_multi = _oracle_krum(updates, f, n - f)
    _assert_close(one.update, want_one)
    assert list(one.selected) == chosen_one
    _assert_close(multi.update, want_multi)
    assert list(multi.selected) == chosen_multi and len(chosen_multi) == n - f


def test_krum_scores_are_sums_over_the_n_minus_f_minus_2_nearest_others() -> None:
    # Four points on a line at 0, 1, 3, 10 (one coordinate of one tensor), F = 0: n - F - 2 = 2 neighbours.
    updates = [{"x": np.array([v])} for v in (0.0, 1.0, 3.0, 10.0)]

    scores = krum_scores(updates, 0)

    assert scores.tolist() == [1 + 9, 1 + 4, 4 + 9, 49 + 81]
    assert list(krum(updates, 0).selected) == [1]


def test_krum_distance_is_over_the_whole_update_not_tensor_by_tensor() -> None:
    # Update 2 is nearest to 0 in tensor 'a' alone but far in 'b'; over both tensors it is the outlier.
    # One neighbour each (n - F - 2 = 1); per tensor, 'a' alone would score 0.01, 0.81, 0.01.
    updates = [
        {"a": np.array([0.0]), "b": np.array([0.0])},
        {"a": np.array([1.0]), "b": np.array([0.0])},
        {"a": np.array([0.1]), "b": np.array([5.0])},
    ]

    assert list(krum(updates, 0).selected) == [0]  # scores 1, 1 (a tie: the first received), 25.01
    assert krum_scores(updates, 0).tolist() == pytest.approx([1.0, 1.0, 0.01 + 25.0])


@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.3", "krum:0", "multi-krum:1"])
def test_unweighted_whatever_the_sites_report(rule: str) -> None:
    updates = _updates(5, 6)
    spec = parse_aggregation(rule)

    plain = robust_aggregate(spec, updates)
    claimed = robust_aggregate(spec, updates, weights=[1_000_000, 1, 1, 1, 1])

    _assert_close(claimed.update, plain.update, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Small n, zero updates, refusals
# ---------------------------------------------------------------------------------------------


def test_single_site_median_and_trimmed_mean_are_that_update() -> None:
    (only,) = _updates(1, 7)

    for result in (coordinate_median([only]), trimmed_mean([only], 0.4)):
        _assert_close(result, only, rtol=0, atol=0)


def test_two_sites_median_and_trimmed_mean_are_their_mean() -> None:
    a, b = _updates(2, 8)
    mean = {k: (a[k] + b[k]) / 2 for k in SHAPES}

    _assert_close(coordinate_median([a, b]), mean)
    _assert_close(trimmed_mean([a, b], 0.45), mean)  # floor(0.9) = 0 cut: nothing trimmed


@pytest.mark.parametrize(("rule", "n", "f"), [("krum", 1, 0), ("krum", 2, 0), ("krum", 4, 1), ("multi-krum", 6, 2), ("multi-krum", 2, 0)])
def test_krum_refuses_n_at_most_2f_plus_2_naming_n_and_f(rule: str, n: int, f: int) -> None:
    with pytest.raises(TooFewUpdates) as err:
        robust_aggregate(parse_aggregation(f"{rule}:{f}"), _updates(n, 9))

    assert (err.value.updates, err.value.byzantine, err.value.needed) == (n, f, 2 * f + 3)
    assert f"{rule}:{f} needs at least {2 * f + 3} updates" in str(err.value)
    assert f"got n = {n} with F = {f}" in str(err.value)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.2", "krum:1", "multi-krum:1"])
def test_zero_updates_aggregate_to_exactly_zero(rule: str) -> None:
    zeros = [{k: np.zeros(s) for k, s in SHAPES.items()} for _ in range(5)]

    result = robust_aggregate(parse_aggregation(rule), zeros)

    for k, s in SHAPES.items():
        assert np.array_equal(result.update[k], np.zeros(s))


def test_a_zero_update_among_others_is_an_ordinary_point() -> None:
    updates = [{k: np.zeros(s) for k, s in SHAPES.items()}, *_updates(4, 10)]

    _assert_close(coordinate_median(updates), _oracle_median(updates))
    _assert_close(krum(updates, 1).update, _oracle_krum(updates, 1, 1)[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.2", "krum:0"])
def test_rules_refuse_non_finite_values_rather_than_sort_them(rule: str, bad: float) -> None:
    # Screening rejects these first (tests/unit/test_screening.py); the rule refuses them too.
    updates = _updates(4, 11)
    updates[2]["classifier.bias"][1] = bad

    with pytest.raises(UpdateError, match=r"updates \[2\] have NaN or Inf values"):
        robust_aggregate(parse_aggregation(rule), updates)


def test_updates_are_site_minus_global_and_refuse_mismatched_shapes() -> None:
    glob, site = _random(1), _random(2)

    (delta,) = updates_from([site], glob)

    _assert_close(delta, {k: site[k] - glob[k] for k in SHAPES})
    with pytest.raises(UpdateError, match=r"tensor classifier.bias has shape \[4\], expected \[3\]"):
        updates_from([{**site, "classifier.bias": np.zeros(4)}], glob)


# ---------------------------------------------------------------------------------------------
# Robustness: one site sends a scaled or sign-flipped update
# ---------------------------------------------------------------------------------------------
#
# Honest updates h_i = mu + 0.01 * noise_i (mu, noise_i standard normal). Stated bounds (server/aggregation.py), from honest values only:
#   median, trimmed mean (F <= floor(BETA n)): every coordinate within the honest range, so
#       ||agg - mean(h)|| <= ||r||, r_j = max_i |h_ij - mean(h)_j|;
#   Krum, Multi-Krum (n > 2F + 2): ||agg - mean(h)|| <= sqrt(n - F - 2) D + R, D the largest distance
#       between two honest updates, R the largest distance of one from their mean.


def _honest(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    mu = _random(seed)
    return [{k: mu[k] + 0.01 * v for k, v in _random(seed * 100 + i + 1).items()} for i in range(n)]


def _bound(rule: str, honest: list[dict[str, np.ndarray]], n: int, f: int) -> float:
    mean = {k: np.mean([h[k] for h in honest], axis=0) for k in SHAPES}
    if rule in ("median", "trimmed-mean"):
        return math.sqrt(sum(float(np.sum(np.max([np.abs(h[k] - mean[k]) for h in honest], axis=0) ** 2)) for k in SHAPES))
    d = max(_distance(a, b) for a in honest for b in honest)
    r = max(_distance(h, mean) for h in honest)
    return math.sqrt(n - f - 2) * d + r


ATTACKS: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "scaled-x100": lambda h: {k: 100 * v for k, v in h.items()},
    "sign-flipped": lambda h: {k: -v for k, v in h.items()},
    "sign-flipped-x100": lambda h: {k: -100 * v for k, v in h.items()},
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize(("rule", "n"), [("median", 3), ("median", 6), ("trimmed-mean:0.2", 5), ("krum:1", 5), ("krum:1", 8), ("multi-krum:1", 5), ("multi-krum:2", 9)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_attacker_cannot_move_the_aggregate_beyond_the_stated_bound(rule: str, n: int, attack: str, seed: int) -> None:
    # Prepare: n - 1 honest updates and one attacker that transforms its own honest update.
    honest = _honest(n, seed)
    attacked = [*honest[:-1], ATTACKS[attack](honest[-1])]
    honest = honest[:-1]
    spec = parse_aggregation(rule)
    mean = {k: np.mean([h[k] for h in honest], axis=0) for k in SHAPES}
    bound = _bound(spec.rule, honest, n, spec.byzantine)

    # Execute
    result = robust_aggregate(spec, attacked)

    # Assert: within the bound; FedAvg's plain mean is not (the attack is strong enough to fail the test)
    assert _distance(result.update, mean) <= bound * (1 + 1e-12)
    plain = {k: np.mean([u[k] for u in attacked], axis=0) for k in SHAPES}
    assert _distance(plain, mean) > bound


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    shift=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    rule=st.sampled_from(["median", "trimmed-mean:0.2", "krum:1", "multi-krum:1"]),
)
def test_any_single_attacker_stays_within_the_stated_bound(seed: int, scale: float, shift: float, rule: str) -> None:
    # Whatever one site of 5 sends (any scale of any direction, shifted), the bounds above hold.
    honest = _honest(5, seed)[:4]
    attacker = {k: scale * v + shift for k, v in _random(seed + 77).items()}
    spec = parse_aggregation(rule)
    mean = {k: np.mean([h[k] for h in honest], axis=0) for k in SHAPES}

    result = robust_aggregate(spec, [*honest[:2], attacker, *honest[2:]])

    assert _distance(result.update, mean) <= _bound(spec.rule, honest, 5, max(spec.byzantine, 1)) * (1 + 1e-9) + 1e-12


# ---------------------------------------------------------------------------------------------
# The strategy wrapper, end to end through the round loop
# ---------------------------------------------------------------------------------------------

METRICS = {
    "dp": 1, "epsilon": 1.0, "budget-epsilon": 8.0, "delta": 1e-5, "noise-multiplier": 1.0, "clip-norm": 1.0,
    "sample-rate": 0.1, "steps": 5,
}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


class FakeSitesGrid:
    """A Grid whose sites answer at once with a fixed adapter (or not at all): fedtune's round loop,
    Flower's FedAvg sampling and real Flower Messages, with local training replaced by ``answer``."""

    def __init__(self, answer: Callable[[int, ArrayRecord], dict[str, Any] | None], nodes: list[int]) -> None:
        self.answer = answer
        self.nodes = nodes
        self._waiting: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink assigns ids on push
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            reply = self.answer(node, msg.content.array_records["arrays"])
            if reply is None:
                continue  # the site never answers: the round times out on it
            content = RecordDict(
                {
                    "arrays": _record(reply["arrays"]),
                    "metrics": MetricRecord({**METRICS, "num-examples": reply.get("n", 10)}),
                    "site": ConfigRecord({"name": f"site-{node}"}),
                }
            )
            self._waiting.append(Message(content, reply_to=msg))
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        ready = [m for m in self._waiting if m.metadata.reply_to_message_id in set(message_ids)]
        self._waiting = [m for m in self._waiting if m not in ready]
        return ready


def _run(strategy: Any, grid: FakeSitesGrid, glob: dict[str, np.ndarray], tmp_path: Path, **kwargs: Any) -> tuple[ArrayRecord, dict[str, Any]]:
    final, _ = run_rounds(
        grid,  # type: ignore[arg-type]
        strategy,
        initial=_record(glob),
        num_rounds=1,
        instructions=RoundInstructions(server_round=1, num_rounds=1, labels=("a", "b")),
        timeout=0.3,
        recorder=RunRecorder(tmp_path),
        checkpoint=lambda r, a: None,
        validate=False,
        echo=lambda line: None,
        **kwargs,
    )
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    return final, line


def _as64(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in record.items()}


def _run_config(**federation: Any) -> RunConfig:
    return from_dict({"federation": {"sites": 5, "min_sites": 2, **federation}})


@pytest.mark.parametrize("rule", ["median", "trimmed-mean:0.2", "multi-krum:1"])
def test_round_loop_applies_the_rule_to_updates_and_adds_back_the_global_adapter(rule: str, tmp_path: Path) -> None:
    # Prepare: 7 sites sampled, one never replies, one sends NaN (screened out): the rule sees 5 updates.
    nodes = [11, 22, 33, 44, 55, 66, 77]
    glob = _as64(_record(_random(0)))
    sent = {node: _as64(_record(_random(node))) for node in nodes}
    sent[55] = {**sent[55], "classifier.bias": np.array([np.nan, 0.0, 0.0])}

    def answer(node: int, received: ArrayRecord) -> dict[str, Any] | None:
        assert np.array_equal(received["classifier.weight"].numpy(), glob["classifier.weight"].astype(np.float32))
        return None if node == 66 else {"arrays": sent[node], "n": node}

    strategy = make_strategy(_run_config(sites=7, aggregation=rule))
    assert isinstance(strategy, RobustAggregation)

    # Execute
    final, line = _run(strategy, FakeSitesGrid(answer, nodes), glob, tmp_path)

    # Assert: the oracle over the updates (site - global) of the 4 accepted sites, plus the global adapter
    assert line["sites_sampled"] == 7 and line["sites_replied"] == 5
    assert line["robust"]["robust-sites"] == 5  # the rule's own count is in the round line
    if rule == "multi-krum:1":
        assert line["robust"]["robust-selected"] == 4  # Multi-Krum averages n - F updates
    assert [r["site"] for r in line["sites_rejected"]] == ["site-55"]
    assert "NaN or Inf" in line["sites_rejected"][0]["reason"]
    used = [{k: sent[n][k] - glob[k] for k in SHAPES} for n in (11, 22, 33, 44, 77)]
    spec = parse_aggregation(rule)
    oracle = {
        "median": lambda: _oracle_median(used),
        "trimmed-mean": lambda: _oracle_trimmed(used, spec.trim),
        "multi-krum": lambda: _oracle_krum(used, spec.byzantine, len(used) - spec.byzantine)[0],
    }[spec.rule]()
    want = {k: (glob[k] + oracle[k]).astype(np.float32) for k in SHAPES}
    for k in SHAPES:
        assert final[k].numpy().dtype == np.float32
        np.testing.assert_allclose(final[k].numpy(), want[k], rtol=1e-6, atol=1e-7)


def test_krum_round_with_too_few_accepted_updates_keeps_the_global_adapter(tmp_path: Path) -> None:
    # krum:1 needs 5 updates; 5 are sampled but one site does not answer.
    nodes = [1, 2, 3, 4, 5]
    glob = _as64(_record(_random(0)))
    strategy = make_strategy(_run_config(aggregation="krum:1"))

    final, line = _run(strategy, FakeSitesGrid(lambda node, _: None if node == 3 else {"arrays": _random(node)}, nodes), glob, tmp_path)

    assert line["sites_replied"] == 4
    assert line["robust"] == {"robust-sites": 4, "robust-skipped": 1}
    for k in SHAPES:
        assert np.array_equal(final[k].numpy(), glob[k].astype(np.float32))


def test_bytes_up_counts_a_lower_rank_reply_as_received_not_as_padded(tmp_path: Path) -> None:
    # Site 1 replies at the run's rank 4, site 2 at rank 2; screening pads site 2's reply to rank 4 in the message.
    glob = _as64(_record(_random(0)))
    full = _random(1)
    low = {**_random(2), "a.lora_A.weight": _random(2)["a.lora_A.weight"][:2], "a.lora_B.weight": _random(2)["a.lora_B.weight"][:, :2]}
    replies = {1: full, 2: low}
    strategy = make_strategy(_run_config(sites=2))

    final, line = _run(strategy, FakeSitesGrid(lambda node, _: {"arrays": replies[node]}, [1, 2]), glob, tmp_path)

    # What travelled: each reply's arrays as Flower serialises them (numpy .npy bytes), before any padding.
    sent = sum(len(Array.from_numpy_ndarray(np.asarray(v, dtype=np.float32)).data) for r in replies.values() for v in r.values())
    padded = 2 * sum(len(Array.from_numpy_ndarray(np.asarray(v, dtype=np.float32)).data) for v in full.values())
    assert line["sites_replied"] == 2 and line["bytes_up"] == sent < padded
    assert final["a.lora_A.weight"].numpy().shape == (4, 6)


def test_krum_through_the_round_loop_ignores_a_scaled_site(tmp_path: Path) -> None:
    nodes = [1, 2, 3, 4, 5]
    honest = _honest(5, 4)
    glob = _as64(_record(_random(0)))
    sent = {n: {k: glob[k] + honest[i][k] for k in SHAPES} for i, n in enumerate(nodes)}
    sent[5] = {k: glob[k] + 100 * honest[4][k] for k in SHAPES}  # claims the most examples too
    strategy = make_strategy(_run_config(aggregation="krum:1"))

    final, _ = _run(strategy, FakeSitesGrid(lambda node, _: {"arrays": sent[node], "n": 10**6 if node == 5 else 10}, nodes), glob, tmp_path)

    got = {k: final[k].numpy().astype(np.float64) - glob[k] for k in SHAPES}
    mean = {k: np.mean([h[k] for h in honest[:4]], axis=0) for k in SHAPES}
    assert _distance(got, mean) <= _bound("krum", honest[:4], 5, 1) + 1e-5  # float32 round trip


def test_wrapper_delegates_sampling_and_evaluation_to_the_inner_strategy() -> None:
    inner = FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    strategy = RobustAggregation(inner, parse_aggregation("median"))
    grid = FakeSitesGrid(lambda node, _: None, [7, 8])

    train = list(strategy.configure_train(1, _record(_random(0)), ConfigRecord(), grid))  # type: ignore[arg-type]
    evaluate = list(strategy.configure_evaluate(1, _record(_random(0)), ConfigRecord(), grid))  # type: ignore[arg-type]

    assert sorted(m.metadata.dst_node_id for m in train) == [7, 8]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [7, 8]
    assert strategy.aggregate_train(1, []) == (None, None)
    with pytest.raises(RuntimeError, match="configure_train was last called for round 1"):
        strategy.aggregate_train(2, [])


# ---------------------------------------------------------------------------------------------
# Which settings combine
# ---------------------------------------------------------------------------------------------


def test_fedavg_stays_fedavg() -> None:
    assert type(make_strategy(_run_config())) is FedAvg


def test_robust_rule_with_client_level_dp_is_refused_saying_why() -> None:
    run = from_dict({"federation": {"sites": 5, "aggregation": "median"}, "client_dp": {"enabled": True}})

    with pytest.raises(ConfigError, match="cannot be combined with client_dp: DP-FedAvg's noise is calibrated"):
        make_strategy(run)


def test_robust_rule_with_secure_aggregation_is_refused_by_the_run_config() -> None:
    with pytest.raises(ConfigError, match="needs each site's update, and secure aggregation shows the coordinator only their sum"):
        from_dict({"federation": {"aggregation": "trimmed-mean:0.1"}, "secure_agg": {"enabled": True}})


def test_server_optimiser_steps_from_the_robust_aggregate(tmp_path: Path) -> None:
    # Server SGD (server_opt 'none', eta 0.5; Reddi et al. 2021) outside the median: x + 0.5 * median(Delta).
    nodes = [1, 2, 3]
    glob = _as64(_record(_random(0)))
    sent = {n: _as64(_record(_random(n))) for n in nodes}
    strategy = make_strategy(_run_config(sites=3, aggregation="median", server_lr=0.5))

    final, _ = _run(strategy, FakeSitesGrid(lambda node, _: {"arrays": sent[node]}, nodes), glob, tmp_path)

    median = _oracle_median([{k: sent[n][k] - glob[k] for k in SHAPES} for n in nodes])
    for k in SHAPES:
        np.testing.assert_allclose(final[k].numpy(), glob[k] + 0.5 * median[k], rtol=1e-6, atol=1e-7)


def test_krum_with_too_few_sampled_sites_is_refused_before_round_one() -> None:
    with pytest.raises(ConfigError) as err:
        make_strategy(_run_config(sites=6, fraction_train=0.5, aggregation="krum:1"))

    assert err.value.problems == [
        (
            "federation.aggregation = 'krum:1' needs at least 5 updates per round (n > 2F + 2, Blanchard et al. 2017), but the run "
            "samples 3 (federation.sites = 6, fraction_train = 0.5, min_sites = 2): sample more sites or lower F."
        )
    ]


def test_update_norm_bound_with_secure_aggregation_is_refused() -> None:
    run = from_dict({"federation": {"max_update_norm": 5.0}, "secure_agg": {"enabled": True}})

    with pytest.raises(ConfigError, match=r"max_update_norm = 5 cannot be combined with secure_agg"):
        make_strategy(run)

"""Server optimisers (FedAvgM, FedAdam, FedYogi, server SGD) over real Flower strategies and messages.

The oracle is written here from Reddi et al. 2021 ("Adaptive Federated Optimization",
arXiv:2003.00295), Algorithm 2, and Hsu et al. 2019 (FedAvgM): one flat float64 vector per round,
the site mean from ``np.average(..., weights=...)``, never the module's own helpers. Flower's own
FedAvgM (an independent implementation of the same recursion) is a second oracle for 'momentum'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedtune.common.config import RunConfig, SecureAggConfig, from_dict
from fedtune.common.errors import ConfigError, UpdateError
from fedtune.common.messages import RoundInstructions
from fedtune.server.app import make_strategy
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.records import RunRecorder
from fedtune.server.rounds import run_rounds
from fedtune.server.server_opt import ServerOptimizer, ServerOptSettings

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4), "classifier.weight": (3, 8)}
NODES = [101, 102, 103]
ROUNDS = 6


# ---------------------------------------------------------------------------------------------
# The oracle: Algorithm 2 on one flat vector
# ---------------------------------------------------------------------------------------------


class PaperOracle:
    """Reddi et al. 2021, Algorithm 2 (m_{-1} = 0, v_{-1} = tau^2, no bias correction), and FedAvgM
    (Hsu et al. 2019: v <- beta v + Delta, x <- x + eta v), on a flat float64 vector."""

    def __init__(self, name: str, x0: np.ndarray, *, eta: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.name, self.x, self.eta, self.b1, self.b2, self.tau = name, x0.astype(np.float64), eta, beta1, beta2, tau
        self.m = np.zeros_like(self.x)
        self.v = np.full_like(self.x, tau * tau)

    def step(self, mean_of_sites: np.ndarray) -> np.ndarray:
        delta = mean_of_sites - self.x
        if self.name == "sgd":
            self.x = self.x + self.eta * delta
        elif self.name == "momentum":
            self.m = self.b1 * self.m + delta
            self.x = self.x + self.eta * self.m
        else:
            self.m = self.b1 * self.m + (1.0 - self.b1) * delta
            if self.name == "adam":
                self.v = self.b2 * self.v + (1.0 - self.b2) * delta**2
            else:  # yogi
                self.v = self.v - (1.0 - self.b2) * delta**2 * np.sign(self.v - delta**2)
            self.x = self.x + self.eta * self.m / (np.sqrt(self.v) + self.tau)
        return self.x


# ---------------------------------------------------------------------------------------------
# Helpers: real Flower messages
# ---------------------------------------------------------------------------------------------


def _random(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})


def _flat(arrays: Any) -> np.ndarray:
    """Flatten an ArrayRecord or a dict of arrays in SHAPES order, as float64."""
    values = [arrays[k].numpy() if isinstance(arrays, ArrayRecord) else arrays[k] for k in SHAPES]
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])


def _reply(arrays: dict[str, np.ndarray], *, node: int, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0})
    return Message(RecordDict({"arrays": _record(arrays), "metrics": metrics}), reply_to=request)


class NodesOnlyGrid:
    """Just enough of a Grid for FedAvg's sampling (a fake of fedtune's counterpart, not of anything under test)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _round_updates(rng: np.random.Generator) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Three sites' adapters and example counts for one round."""
    return [_random(rng, 0.3) for _ in NODES], [int(w) for w in rng.integers(10, 400, size=len(NODES))]


def _oracle_mean(updates: list[dict[str, np.ndarray]], weights: list[int]) -> np.ndarray:
    return np.average(np.stack([_flat(u) for u in updates]), axis=0, weights=np.asarray(weights, dtype=np.float64))


Round = tuple[list[dict[str, np.ndarray]], list[int]]


def _play(strategy: Any, x0: dict[str, np.ndarray], rounds: list[Round]) -> list[ArrayRecord | None]:
    """Run the rounds through configure_train / aggregate_train as server/rounds.py does."""
    arrays, out = _record(x0), []
    for r, (updates, weights) in enumerate(rounds, start=1):
        strategy.configure_train(r, arrays, ConfigRecord(), NodesOnlyGrid(NODES))
        replies = [_reply(u, node=node, n=w) for u, node, w in zip(updates, NODES, weights)]
        new, _ = strategy.aggregate_train(r, replies)
        out.append(new)
        if new is not None:
            arrays = new
    return out


def _run_config(**federation: Any) -> RunConfig:
    return from_dict({"federation": {"min_sites": 2, **federation}})


# ---------------------------------------------------------------------------------------------
# Each optimiser against the paper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "eta"), [("momentum", 0.7), ("adam", 0.05), ("yogi", 0.05), ("sgd", 0.5)],
)
def test_each_optimizer_follows_algorithm_2_over_several_rounds(name: str, eta: float) -> None:
    # Prepare
    rng = np.random.default_rng(11)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(ROUNDS)]
    strategy = ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), ServerOptSettings(name=name, lr=eta))
    oracle = PaperOracle(name, _flat(x0), eta=eta)

    # Execute
    got = _play(strategy, x0, rounds)

    # Assert: every round's adapter, float32 out of a float64 computation
    for r, (new, (updates, weights)) in enumerate(zip(got, rounds), start=1):
        expected = oracle.step(_oracle_mean(updates, weights))
        assert new is not None and all(new[k].numpy().dtype == np.float32 and new[k].numpy().shape == s for k, s in SHAPES.items())
        np.testing.assert_allclose(_flat(new), expected, rtol=2e-5, atol=2e-6, err_msg=f"{name}, round {r}")
    assert strategy.state.steps == ROUNDS
    # The optimiser is not FedAvg in disguise: the last adapter is far from the last mean.
    assert np.abs(_flat(got[-1]) - _oracle_mean(*rounds[-1])).max() > 1e-2


def test_momentum_matches_flowers_fedavgm_over_several_rounds() -> None:
    # Prepare
    rng = np.random.default_rng(5)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(ROUNDS)]
    ours = ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), ServerOptSettings(name="momentum", lr=0.6, beta1=0.8))
    flowers = FedAvgM(min_train_nodes=2, min_available_nodes=2, server_learning_rate=0.6, server_momentum=0.8)

    # Execute
    a, b = _play(ours, x0, rounds), _play(flowers, x0, rounds)

    # Assert (Flower computes in float32)
    for r, (x, y) in enumerate(zip(a, b), start=1):
        np.testing.assert_allclose(_flat(x), _flat(y), rtol=1e-5, atol=1e-6, err_msg=f"round {r}")


def test_server_opt_none_is_fedavg_exactly() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(3)]

    # Execute
    strategy = make_strategy(_run_config(server_opt="none"))
    got, fedavg = _play(strategy, x0, rounds), _play(FedAvg(min_train_nodes=2, min_available_nodes=2), x0, rounds)

    # Assert: no wrapper at all, and bit-identical adapters
    assert type(strategy) is FedAvg
    for x, y in zip(got, fedavg):
        for k in SHAPES:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())


@pytest.mark.parametrize("settings", [ServerOptSettings(name="momentum", lr=1.0, beta1=0.0), ServerOptSettings(name="sgd", lr=1.0)],
                         ids=["momentum-beta0", "sgd"])
def test_unit_learning_rate_without_momentum_is_fedavg(settings: ServerOptSettings) -> None:
    rng = np.random.default_rng(4)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(4)]

    got = _play(ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), settings), x0, rounds)
    fedavg = _play(FedAvg(min_train_nodes=2, min_available_nodes=2), x0, rounds)

    # x + 1 (y - x) in float64 is y again for float32 x and y of comparable size: exact.
    for x, y in zip(got, fedavg):
        for k in SHAPES:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())


def test_state_persists_across_rounds() -> None:
    # Prepare: two rounds; a fresh optimiser sees only the second
    rng = np.random.default_rng(8)
    x0 = _random(rng)
    first, second = _round_updates(rng), _round_updates(rng)
    settings = ServerOptSettings(name="adam", lr=0.05)
    persistent = ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), settings)

    # Execute
    after_first, after_second = _play(persistent, x0, [first, second])
    assert after_first is not None
    fresh = ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), settings)
    (restarted,) = _play(fresh, {k: after_first[k].numpy() for k in SHAPES}, [second])

    # Assert: the second step used round 1's moments
    oracle = PaperOracle("adam", _flat(x0), eta=0.05)
    oracle.step(_oracle_mean(*first))
    np.testing.assert_allclose(_flat(after_second), oracle.step(_oracle_mean(*second)), rtol=2e-5, atol=2e-6)
    assert np.abs(_flat(after_second) - _flat(restarted)).max() > 1e-3
    assert persistent.state.steps == 2 and fresh.state.steps == 1
    assert set(persistent.state.m) == set(SHAPES) == set(persistent.state.v)


def test_a_round_with_no_update_keeps_the_adapter_and_the_state() -> None:
    # Prepare: round 2 has no reply (every update rejected, or nobody answered)
    rng = np.random.default_rng(9)
    x0 = _random(rng)
    r1, r3 = _round_updates(rng), _round_updates(rng)
    strategy = ServerOptimizer(FedAvg(min_train_nodes=2, min_available_nodes=2), ServerOptSettings(name="yogi", lr=0.05))
    (x1,) = _play(strategy, x0, [r1])
    assert x1 is not None
    saved = strategy.state

    # Execute
    strategy.configure_train(2, x1, ConfigRecord(), NodesOnlyGrid(NODES))
    empty, _ = strategy.aggregate_train(2, [])

    # Assert: no adapter (the round loop keeps x1), the very same state; round 3 continues as if round 2 never happened
    assert empty is None
    assert strategy.state is saved and strategy.state.steps == 1
    strategy.configure_train(3, x1, ConfigRecord(), NodesOnlyGrid(NODES))
    x3, _ = strategy.aggregate_train(3, [_reply(u, node=n, n=w) for u, n, w in zip(r3[0], NODES, r3[1])])
    oracle = PaperOracle("yogi", _flat(x0), eta=0.05)
    oracle.step(_oracle_mean(*r1))
    np.testing.assert_allclose(_flat(x3), oracle.step(_oracle_mean(*r3)), rtol=2e-5, atol=2e-6)


def test_a_step_for_a_round_never_configured_is_refused() -> None:
    strategy = ServerOptimizer(FedAvg(), ServerOptSettings(name="adam", lr=0.1))
    strategy.configure_train(1, _record(_random(np.random.default_rng(0))), ConfigRecord(), NodesOnlyGrid(NODES))
    with pytest.raises(RuntimeError, match="round 2.*round 1"):
        strategy.apply(2, _record(_random(np.random.default_rng(1))))


def test_an_aggregate_with_other_tensors_is_refused_naming_them() -> None:
    rng = np.random.default_rng(0)
    strategy = ServerOptimizer(FedAvg(), ServerOptSettings(name="momentum", lr=1.0))
    strategy.configure_train(1, _record(_random(rng)), ConfigRecord(), NodesOnlyGrid(NODES))
    wrong = {k: v for k, v in _random(rng).items() if k != "classifier.weight"}
    with pytest.raises(UpdateError, match=r"missing: \['classifier.weight'\]"):
        strategy.apply(1, _record(wrong))
    with pytest.raises(UpdateError, match=r"classifier.weight has shape \[2, 8\], expected \[3, 8\]"):
        strategy.apply(1, _record({**wrong, "classifier.weight": np.zeros((2, 8), np.float32)}))


def test_bad_settings_are_refused_all_at_once_naming_each_value() -> None:
    with pytest.raises(ConfigError) as err:
        ServerOptSettings(name="rmsprop", lr=0.0, beta1=1.0, beta2=-0.1, tau=0.0)
    text = str(err.value)
    assert len(err.value.problems) == 5
    for fragment in ("got 'rmsprop'", "eta) must be a finite number > 0, got 0.0", "beta1 must be in [0, 1), got 1.0",
                     "beta2 must be in [0, 1), got -0.1", "tau must be a finite number > 0, got 0.0"):
        assert fragment in text


def test_evaluation_is_delegated_to_the_inner_strategy() -> None:
    calls: list[tuple[Any, ...]] = []

    class Spy(FedAvg):
        def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            calls.append(("configure_evaluate", server_round))
            return ["evaluate"]

        def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
            calls.append(("aggregate_evaluate", server_round))
            return MetricRecord({"accuracy": 0.5})

    strategy = ServerOptimizer(Spy(), ServerOptSettings(name="adam", lr=0.1))
    arrays = _record(_random(np.random.default_rng(0)))
    assert list(strategy.configure_evaluate(3, arrays, ConfigRecord(), NodesOnlyGrid(NODES))) == ["evaluate"]
    assert strategy.aggregate_evaluate(3, []) is not None
    assert calls == [("configure_evaluate", 3), ("aggregate_evaluate", 3)]


# ---------------------------------------------------------------------------------------------
# Wiring: make_strategy, client-level DP, secure aggregation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_opt", "lr", "name"), [("momentum", 1.0, "momentum"), ("adam", 0.01, "adam"), ("yogi", 0.01, "yogi"),
                                                        ("none", 0.5, "sgd")])
def test_make_strategy_wraps_fedavg_in_the_configured_optimizer(server_opt: str, lr: float, name: str) -> None:
    strategy = make_strategy(_run_config(server_opt=server_opt, server_lr=lr))
    assert isinstance(strategy, ServerOptimizer) and isinstance(strategy.inner, FedAvg)
    assert (strategy.settings.name, strategy.settings.lr) == (name, lr)
    assert (strategy.settings.beta1, strategy.settings.beta2, strategy.settings.tau) == (0.9, 0.99, 1e-3)


def test_under_client_level_dp_the_optimizer_steps_from_the_dp_release() -> None:
    # Prepare: DP-FedAvg with q = 1, z = 0 and a clip that never binds releases x + sum(Delta_i) / N
    # (unit weights, the fixed denominator); the optimiser must step from that release.
    rng = np.random.default_rng(12)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(3)]
    inner = ClientLevelDP(FedAvg(), clip_norm=1e6, noise_multiplier=0.0, sample_rate=1.0, sites=len(NODES), seed=0)
    strategy = ServerOptimizer(inner, ServerOptSettings(name="adam", lr=0.05))
    oracle = PaperOracle("adam", _flat(x0), eta=0.05)

    # Execute
    got = _play(strategy, x0, rounds)

    # Assert
    for new, (updates, _weights) in zip(got, rounds):
        np.testing.assert_allclose(_flat(new), oracle.step(_oracle_mean(updates, [1] * len(NODES))), rtol=2e-5, atol=2e-6)


def test_make_strategy_puts_the_optimizer_outside_client_level_dp() -> None:
    from fedtune.server.app import client_dp_plan

    run = from_dict({"simulation": True, "federation": {"sites": 10, "fraction_train": 0.5, "rounds": 5, "server_opt": "yogi",
                     "server_lr": 0.01}, "client_dp": {"enabled": True, "noise_multiplier": 1.0}})
    strategy = make_strategy(run, client_dp_plan(run))
    assert isinstance(strategy, ServerOptimizer) and isinstance(strategy.inner, ClientLevelDP)


def test_with_a_robust_rule_the_optimizer_steps_from_the_coordinate_wise_median() -> None:
    # Prepare: make_strategy's composition; the median of the updates is x + median_i(y_i - x) = median_i(y_i)
    rng = np.random.default_rng(13)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(3)]
    strategy = make_strategy(_run_config(aggregation="median", server_opt="momentum", server_lr=0.8))
    assert isinstance(strategy, ServerOptimizer)
    oracle = PaperOracle("momentum", _flat(x0), eta=0.8)

    # Execute
    got = _play(strategy, x0, rounds)

    # Assert
    for new, (updates, _weights) in zip(got, rounds):
        np.testing.assert_allclose(_flat(new), oracle.step(np.median(np.stack([_flat(u) for u in updates]), axis=0)), rtol=2e-5, atol=2e-6)


# Secure aggregation: the real SecAgg+ workflow and client mod, through the in-process grid and the
# fixed-update sites of test_secure_agg (only the sites' training is stubbed).
from tests.unit.test_secure_agg import SHAPES as SECURE_SHAPES  # noqa: E402
from tests.unit.test_secure_agg import WEIGHTS, InProcessGrid, _contexts, _update, stub_sites  # noqa: E402,F401


class SecureGrid(InProcessGrid):
    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)


@pytest.mark.usefixtures("stub_sites")  # imported above: the fixed-update sites (its value is not needed here)
def test_under_secure_aggregation_the_optimizer_steps_from_the_secagg_mean(tmp_path: Path) -> None:
    # Prepare: three sites that always send the same adapter; FedAvgM with eta 0.5, beta 0.9
    nodes = [11, 22, 33]
    rng = np.random.default_rng(0)
    x0 = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SECURE_SHAPES.items()}
    strategy = make_strategy(from_dict({"federation": {"min_sites": 3, "server_opt": "momentum", "server_lr": 0.5}}))
    assert isinstance(strategy, ServerOptimizer)
    updates = {n: _update(n) for n in nodes}
    total = sum(WEIGHTS[n] for n in nodes)
    mean = {k: sum(updates[n][k].astype(np.float64) * WEIGHTS[n] for n in nodes) / total for k in SECURE_SHAPES}

    # Execute: the real round loop, two secure rounds
    final, _ = run_rounds(
        SecureGrid(_contexts(nodes)),  # type: ignore[arg-type]
        strategy,
        initial=_record(x0),
        num_rounds=2,
        instructions=RoundInstructions(server_round=1, num_rounds=2, labels=("a", "b")),
        timeout=30.0,
        recorder=RunRecorder(tmp_path),
        checkpoint=lambda r, _arrays: None,
        secure=SecureAggConfig(enabled=True),
        validate=False,
        echo=lambda _line: None,
    )

    # Assert: x_1 = x_0 + eta (mean - x_0); x_2 = x_1 + eta (0.9 (mean - x_0) + (mean - x_1)), up to SecAgg+'s quantisation
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    bound = line["secure_agg"]["quantization_error_bound"]
    assert 0 < bound < 1e-4
    for k in SECURE_SHAPES:
        x, y = x0[k].astype(np.float64), mean[k]
        v1 = y - x
        x1 = x + 0.5 * v1
        x2 = x1 + 0.5 * (0.9 * v1 + (y - x1))
        # each round's mean is off by at most the bound; it enters x_2 with total weight under 2
        np.testing.assert_allclose(final[k].numpy(), x2, rtol=0, atol=2 * bound + 1e-6, err_msg=k)
        assert np.abs(x2 - y).max() > 100 * bound, "x_2 must differ from the plain secure mean for the test to mean anything"
    assert strategy.state.steps == 2


# ---------------------------------------------------------------------------------------------
# federation.server_momentum (--server-momentum): beta1 as a setting
# ---------------------------------------------------------------------------------------------


def test_server_momentum_reaches_fedavgm_and_steps_as_the_oracle_with_beta_half() -> None:
    # Prepare: the key through make_strategy (as app.py builds it), against FedAvgM with beta 0.5 on a flat vector
    rng = np.random.default_rng(21)
    x0 = _random(rng)
    rounds = [_round_updates(rng) for _ in range(3)]
    strategy = make_strategy(_run_config(server_opt="momentum", server_lr=0.5, server_momentum=0.5))
    assert isinstance(strategy, ServerOptimizer) and strategy.settings.beta1 == 0.5
    half, default = PaperOracle("momentum", _flat(x0), eta=0.5, beta1=0.5), PaperOracle("momentum", _flat(x0), eta=0.5, beta1=0.9)

    # Execute
    got = _play(strategy, x0, rounds)

    # Assert: each of the 3 steps is beta 0.5's; by step 3 beta 0.9's adapter is measurably elsewhere
    for r, (new, (updates, weights)) in enumerate(zip(got, rounds), start=1):
        mean = _oracle_mean(updates, weights)
        expected, other = half.step(mean), default.step(mean)
        np.testing.assert_allclose(_flat(new), expected, rtol=2e-5, atol=2e-6, err_msg=f"round {r}")
    assert np.abs(expected - other).max() > 1e-2


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_server_momentum_is_beta1_of_adam_and_yogi_too(name: str) -> None:
    strategy = make_strategy(_run_config(server_opt=name, server_lr=0.01, server_momentum=0.3))
    assert isinstance(strategy, ServerOptimizer)
    assert (strategy.settings.beta1, strategy.settings.beta2, strategy.settings.tau) == (0.3, 0.99, 1e-3)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_server_momentum_outside_0_1_is_refused_naming_key_value_and_range(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"federation": {"server_opt": "momentum", "server_momentum": value}})
    assert err.value.problems == [f"federation.server_momentum (beta1 of 'momentum', 'adam', 'yogi') must be in [0, 1), got {value}."]


def test_server_momentum_flag_is_validated_before_anything_starts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    for command in (["simulate"], ["run", "--insecure", "--labels", "a,b"]):
        result = CliRunner().invoke(main, [*command, "--server-opt", "momentum", "--server-momentum", "1", "--out", str(tmp_path / "r")])
        assert result.exit_code != 0, result.output
        assert "federation.server_momentum (beta1 of 'momentum', 'adam', 'yogi') must be in [0, 1), got 1.0." in result.output
    assert not (tmp_path / "r").exists()


def test_server_momentum_is_recorded_in_config_toml_and_a_resume_may_never_change_it(tmp_path: Path) -> None:
    # Prepare: a run directory as the coordinator leaves it (config.toml, identity), FedAvgM at beta 0.5
    from click.testing import CliRunner

    from fedtune.cli import main
    from fedtune.common.config import dump_toml, load_toml
    from fedtune.server.resume import RunIdentity, check_changes, config_diff, parse_allow_change, write_identity

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored = from_dict({"federation": {"server_opt": "momentum", "server_lr": 0.5, "server_momentum": 0.5}, "out": str(run_dir)})
    dump_toml(stored, run_dir / "config.toml")
    write_identity(run_dir, RunIdentity(run_id="42", created=0.0, fedtune_version="test"))

    # Execute: resume with --server-momentum 0.9 (the CLI); then the change named in --allow-change (the checks
    # the CLI runs, called directly: were it wrongly accepted, the CLI would start a whole simulation)
    refused = CliRunner().invoke(main, ["simulate", "--resume", str(run_dir), "--server-momentum", "0.9"])
    with pytest.raises(ConfigError) as named:
        parse_allow_change(["federation.server_momentum"])
    changes = config_diff(load_toml(run_dir / "config.toml"), from_dict({"federation": {"server_momentum": 0.9}}, base=stored))
    with pytest.raises(ConfigError) as allowed:
        check_changes(changes, ("federation.server_momentum",), run_dir=run_dir)

    # Assert: recorded as set; refused, naming key, both values and why; no resume request left behind
    assert "server_momentum = 0.5" in (run_dir / "config.toml").read_text()
    assert [str(c) for c in changes] == ["federation.server_momentum: 0.5 -> 0.9"]
    assert refused.exit_code == 2, refused.output
    assert "federation.server_momentum can never change when a run resumes (0.5 -> 0.9): the checkpoint's momentum" in refused.output
    assert not (run_dir / "resume-request.json").exists()
    assert "federation.server_momentum can never change when a run resumes: the checkpoint's momentum was accumulated with this beta1" in str(named.value)
    assert "federation.server_momentum can never change when a run resumes (0.5 -> 0.9)" in str(allowed.value)

"""Server optimisers over the averaged adapter update: FedAvgM, FedAdam, FedYogi (and server SGD).

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated Optimization",
ICLR 2021 (arXiv:2003.00295), Algorithm 2; FedAvgM: Hsu, Qi, Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019 (arXiv:1909.06335).

The coordinator treats the round's aggregate as a pseudo-gradient: with x_t the global adapter
sent in round t and y_t what the inner strategy released (FedAvg's weighted mean, a robust rule's
result, DP-FedAvg's noised mean, or SecAgg+'s unmasked mean), Delta_t = y_t - x_t and, per
coordinate (squares, roots and divisions elementwise), with server learning rate eta:

- 'sgd'      x_{t+1} = x_t + eta Delta_t                      (eta = 1: FedAvg itself)
- 'momentum' v_t = beta1 v_{t-1} + Delta_t;  x_{t+1} = x_t + eta v_t       (FedAvgM, v_{-1} = 0)
- 'adam'     m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
             v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2
             x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
- 'yogi'     as 'adam', but v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)

with m_{-1} = 0 and v_{-1} = tau^2, the smallest start Algorithm 2 allows (v_{-1} >= tau^2), and
beta1 = 0.9, beta2 = 0.99, tau = 1e-3 (the paper's defaults; beta1 is ``federation.server_momentum``,
``--server-momentum``, so it can be swept under DP). As in the paper there is no bias
correction. Flower 1.42's FedAdam differs on both points (v starts at 0, and it scales eta by
sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))); its FedAvgM is the same recursion as 'momentum' here.

Why a wrapper, not Flower's FedAvgM/FedAdam/FedYogi: those subclass FedAvg and optimise FedAvg's
own mean. fedtune must optimise whatever the round released: DP-FedAvg's noised mean
(`ClientLevelDP` replaces FedAvg's aggregation), a robust rule's result, and SecAgg+'s mean, which
never passes through a strategy's `aggregate_train` (`server/rounds.py` calls :meth:`ServerOptimizer.apply`
on it). One implementation serves the three paths.

Privacy: the optimiser reads only what the round released, so under client-level DP it is
post-processing and the guarantee is unchanged; under secure aggregation it reads only the
mean, which the coordinator sees anyway. Under DP, momentum averages the noise of past rounds:
with independent noise each round, m_t carries (1 - beta1) / (1 + beta1) of one round's noise
variance relative to a steady Delta (5% at beta1 = 0.9). For FedAvgM the step on a steady Delta
tends to eta / (1 - beta1) Delta, so a sweep of beta1 at a fixed eta / (1 - beta1) compares only
how many rounds of noise the momentum averages (about (1 + beta1) / (1 - beta1)), at the price of
a slower response in a run of few rounds.

Adaptive steps are scale-free: where |Delta| >> tau, an 'adam'/'yogi' step is about eta per
coordinate in the first rounds, whatever the size of Delta, so eta must be chosen for the size of
a LoRA weight (Reddi et al. tuned eta over 10^-3..1; 'momentum' and 'sgd' scale with Delta).

A round whose inner strategy released nothing (every update rejected, no site replied; FedAvg
returns None) is not a step: the adapter stays x_t and the optimiser's state (m, v, its step
count) is left exactly as it was. DP-FedAvg always releases (noise only when no site took part),
so under client-level DP every round is a step.

The state (m, v and the step count) is part of every checkpoint (`OptimizerState.to_arrays`,
`ServerOptimizer.load_state`, written by `fedtune.server.resume`): a run resumed after a crash
takes exactly the step an uninterrupted one would, instead of restarting Adam's moments at zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.errors import ConfigError, UpdateError, check_tensor_names

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")

# Reddi et al. 2021, Section 5 / Algorithm 2 defaults.
BETA1, BETA2, TAU = 0.9, 0.99, 1e-3


@dataclass(frozen=True, kw_only=True)
class ServerOptSettings:
    """A server optimiser and its hyperparameters (the symbols of the module docstring).

    Attributes:
        name: 'sgd', 'momentum' (FedAvgM), 'adam' (FedAdam) or 'yogi' (FedYogi).
        lr: eta, the server learning rate, > 0.
        beta1: momentum (FedAvgM's beta) or first-moment decay, in [0, 1).
        beta2: second-moment decay ('adam', 'yogi'), in [0, 1).
        tau: adaptivity ('adam', 'yogi'), > 0; v starts at tau^2.
    """

    name: str
    lr: float
    beta1: float = BETA1
    beta2: float = BETA2
    tau: float = TAU

    def __post_init__(self) -> None:
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(f"server optimiser must be one of {list(OPTIMIZERS)}, got {self.name!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"server learning rate (eta) must be a finite number > 0, got {self.lr}.")
        for key, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                problems.append(f"server optimiser {key} must be in [0, 1), got {value}.")
        if not (math.isfinite(self.tau) and self.tau > 0):
            problems.append(f"server optimiser tau must be a finite number > 0, got {self.tau}.")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class OptimizerState:
    """m (FedAvgM's v for 'momentum'), v (second moment; empty for 'sgd'/'momentum'), in float64, and the steps taken."""

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = 0


    def to_arrays(self) -> dict[str, np.ndarray]:
        """m and v as one name -> float64 array map ("m/<tensor>", "v/<tensor>") for a safetensors file."""
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()}}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, steps: int) -> OptimizerState:
        """The inverse of :meth:`to_arrays`; a key that is neither "m/..." nor "v/..." is refused."""
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for key, array in arrays.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ConfigError(f"server optimiser state: key {key!r} is not 'm/<tensor>' or 'v/<tensor>'.")
            (m if kind == "m" else v)[name] = np.asarray(array, dtype=np.float64)
        if not (isinstance(steps, int) and steps >= 0):
            raise ConfigError(f"server optimiser state: steps must be an integer >= 0, got {steps!r}.")
        return cls(m=m, v=v, steps=steps)


@dataclass(frozen=True)
class ServerStep:
    arrays: dict[str, np.ndarray]  # x_{t+1}, float64
    state: OptimizerState


def server_step(settings: ServerOptSettings, state: OptimizerState, x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> ServerStep:
    """One step of ``settings``' optimiser from x_t towards the round's aggregate y_t (pure; float64).

    Raises:
        UpdateError: y does not name exactly x's tensors, or a shape differs.
    """
    check_tensor_names(x, y, source="the round's aggregate")
    s = settings
    new_x: dict[str, np.ndarray] = {}
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    for name, ref in x.items():
        x_t = np.asarray(ref, dtype=np.float64)
        y_t = np.asarray(y[name], dtype=np.float64)
        if y_t.shape != x_t.shape:
            raise UpdateError(f"the round's aggregate: tensor {name} has shape {list(y_t.shape)}, expected {list(x_t.shape)}")
        delta = y_t - x_t
        if s.name == "sgd":
            new_x[name] = x_t + s.lr * delta
            continue
        m_prev = state.m.get(name, np.zeros_like(x_t))
        if s.name == "momentum":
            m[name] = s.beta1 * m_prev + delta
            new_x[name] = x_t + s.lr * m[name]
            continue
        m[name] = s.beta1 * m_prev + (1 - s.beta1) * delta
        v_prev = state.v.get(name, np.full_like(x_t, s.tau**2))
        sq = delta * delta
        if s.name == "adam":
            v[name] = s.beta2 * v_prev + (1 - s.beta2) * sq
        else:  # yogi: v moves towards Delta^2 by at most (1 - beta2) Delta^2, so it never collapses to 0
            v[name] = v_prev - (1 - s.beta2) * sq * np.sign(v_prev - sq)
        new_x[name] = x_t + s.lr * m[name] / (np.sqrt(v[name]) + s.tau)
    return ServerStep(arrays=new_x, state=OptimizerState(m=m, v=v, steps=state.steps + 1))


class ServerOptimizer(Strategy):
    """A server optimiser around any strategy: the inner one samples, aggregates and evaluates;
    this one turns its aggregate into a step of the optimiser (see the module docstring).

    `configure_train` remembers x_t (the adapter sent this round) and delegates; `aggregate_train`
    delegates, then returns :meth:`apply` of the inner aggregate (None stays None: no step, state
    untouched), with the inner metrics. Evaluation and summary are delegated.

    Args:
        inner: the strategy whose aggregate is the pseudo-gradient's end point.
        settings: the optimiser and its hyperparameters.
    """

    def __init__(self, inner: Strategy, settings: ServerOptSettings) -> None:
        if not isinstance(inner, Strategy):
            raise ConfigError(f"`inner` must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}.")
        self.inner = inner
        self.settings = settings
        self._state = OptimizerState()
        self._current: ArrayRecord | None = None
        self._current_round: int | None = None

    @property
    def state(self) -> OptimizerState:
        """The optimiser's state after the last step (read-only; arrays are float64 copies held here)."""
        return self._state

    def load_state(self, state: OptimizerState, *, adapter: Mapping[str, np.ndarray]) -> None:
        """Continue from ``state`` (a checkpoint's), checked against the run's ``adapter`` tensors.

        m (and v for 'adam'/'yogi') must name exactly the adapter's tensors with their shapes once a
        step was taken, and be empty before; 'sgd' keeps none.

        Raises:
            ConfigError: the state belongs to another optimiser or another adapter.
        """
        s = self.settings
        problems = []
        wants_m = s.name != "sgd" and state.steps > 0
        wants_v = s.name in ("adam", "yogi") and state.steps > 0
        for label, held, wanted in (("m", state.m, wants_m), ("v", state.v, wants_v)):
            if not wanted:
                if held:
                    problems.append(f"server optimiser state holds {label} for {len(held)} tensors, but {s.name!r} after "
                                    f"{state.steps} steps keeps none.")
                continue
            if set(held) != set(adapter):
                missing, extra = sorted(set(adapter) - set(held)), sorted(set(held) - set(adapter))
                problems.append(f"server optimiser state {label} names other tensors than the adapter's: missing "
                                f"{missing[:3]}, unexpected {extra[:3]}.")
                continue
            for name, ref in adapter.items():
                if np.shape(held[name]) != np.shape(ref):
                    problems.append(f"server optimiser state {label}/{name} has shape {list(np.shape(held[name]))}, "
                                    f"expected {list(np.shape(ref))}.")
        if problems:
            raise ConfigError(problems)
        self._state = state

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current, self._current_round = arrays, server_round
        return self.inner.configure_train(server_round, arrays, config, grid)

    def apply(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """x_{t+1} from the round's aggregate y_t, with x_t's names, shapes and dtypes; advances the state.

        Public because secure aggregation replaces the inner strategy's aggregation
        (``server/rounds.py`` hands the SecAgg+ mean here).
        """
        if self._current is None or self._current_round != server_round:
            raise RuntimeError(
                f"server optimiser asked to step for round {server_round}, but configure_train was last called for "
                f"round {self._current_round}: x_t of this round is unknown"
            )
        x = {name: arr.numpy() for name, arr in self._current.items()}
        step = server_step(self.settings, self._state, x, {name: arr.numpy() for name, arr in aggregate.items()})
        self._state = step.state
        delta_norm = math.sqrt(sum(float(np.sum((aggregate[k].numpy().astype(np.float64) - x[k].astype(np.float64)) ** 2)) for k in x))
        step_norm = math.sqrt(sum(float(np.sum((step.arrays[k] - x[k].astype(np.float64)) ** 2)) for k in x))
        logger.info("round %d: server optimiser %s (eta %g, beta1 %g): |Delta| %.3g, |step| %.3g", server_round, self.settings.name,
                    self.settings.lr, self.settings.beta1, delta_norm, step_norm)
        return ArrayRecord({name: Array.from_numpy_ndarray(step.arrays[name].astype(ref.dtype, copy=False)) for name, ref in x.items()})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregate, metrics = self.inner.aggregate_train(server_round, replies)
        if aggregate is None:
            logger.info("round %d: nothing aggregated; the server optimiser takes no step (state kept)", server_round)
            return None, metrics
        return self.apply(server_round, aggregate), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        s = self.settings
        logger.info("server optimiser %s: eta %g, beta1 %g, beta2 %g, tau %g (Reddi et al. 2021)", s.name, s.lr, s.beta1, s.beta2, s.tau)
        self.inner.summary()


def server_opt_settings(*, name: str, lr: float, momentum: float = BETA1) -> ServerOptSettings | None:
    """The settings ``federation.server_opt``, ``server_lr`` and ``server_momentum`` name, or None for plain FedAvg.

    'none' with eta = 1 is FedAvg (no optimiser: the average is the new adapter, exactly); 'none'
    with another eta is server SGD, x_t + eta Delta_t (Reddi et al.'s FedOpt with SGD), which has
    no momentum. ``momentum`` is beta1 of 'momentum', 'adam' and 'yogi'.
    """
    if name == "none":
        if lr == 1.0:
            return None
        name = "sgd"
    return ServerOptSettings(name=name, lr=lr, beta1=momentum)


def server_optimizer(inner: Strategy, *, name: str, lr: float, momentum: float = BETA1) -> Strategy:
    """``inner`` wrapped in the optimiser ``federation.server_opt`` names, or ``inner`` itself for plain FedAvg
    (see :func:`server_opt_settings`)."""
    settings = server_opt_settings(name=name, lr=lr, momentum=momentum)
    return inner if settings is None else ServerOptimizer(inner, settings)

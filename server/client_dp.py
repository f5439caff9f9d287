"""Client-level differential privacy: DP-FedAvg as a wrapper around a Flower strategy.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg). Each round, every connected site joins independently with probability q
(Poisson sampling, drawn from the operating system's CSPRNG), each sampled site's update is
turned into a delta against the global adapter, the delta is clipped to L2 norm C (over all
tensors together), the clipped deltas are summed, Gaussian noise N(0, (z C)^2) is added to every
coordinate of the sum, and the sum is divided by the *fixed* m = q N, the expected number of
sampled sites (their estimator f_f with unit weights). Adding or removing one site changes the
sum by at most C, so each round is a Poisson-sampled Gaussian mechanism with rate q and noise
multiplier z, and `client_level_epsilon` (in `fedtune.server.client_dp_plan`) accounts T rounds
of it with the sampled-Gaussian RDP accountant (Mironov, Talwar, Zhang 2019): the accountant
matches what is done, for add/remove-one-site neighbours.

Why sites are Poisson-sampled inside the strategy, rather than as Flower's fixed-size sample
accounted as sampling without replacement, is said in `fedtune.server.client_dp_plan`: the
accountant's bound holds for the sampling done here, for add/remove-one-site neighbours, and a
site's privacy depends only on q, z and T.

The guarantee is about sites (a hospital's whole dataset), not records. It holds for the released
global adapters, as long as who was sampled stays with the coordinator; the coordinator itself
sees every update in the clear (the trusted-server model of the paper). It composes with, and is
independent of, the sample-level DP-SGD at each site.

Pure functions (`clip_update`, `dp_fedavg_aggregate`; `update_delta` from `server.aggregation`) do the math;
`ClientLevelDP` is the stateful strategy wrapper. The sampling (`client_sample_rate`,
`poisson_sample`), N on the grid (`connected_sites`), the accounting and the calibration
(`client_level_epsilon`, `plan_client_level`) are in `fedtune.server.client_dp_plan`.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.errors import ConfigError, UpdateError

from .aggregation import update_delta
from .client_dp_plan import ClientLevelPlan, is_int, is_real, poisson_sample

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]

METRIC_CLIPPED_FRACTION = "client-dp-clipped-fraction"
METRIC_NOISE_STD = "client-dp-noise-std"


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


class ClippedUpdate(NamedTuple):
    """What `clip_update` returns: unpacks as ``(delta, norm, was_clipped)``."""

    delta: dict[str, np.ndarray]
    """The clipped delta, L2 norm <= C."""
    norm: float
    """The L2 norm of the delta before clipping, over all tensors together."""
    was_clipped: bool
    """Whether the delta was scaled down (its norm exceeded C)."""


def clip_update(delta: Arrays, clip_norm: float) -> ClippedUpdate:
    """Clip a delta to L2 norm C over all its tensors together: Delta * min(1, C / ||Delta||).

    Scaling keeps the direction. A delta with norm <= C, including an all-zero one (a site that
    did not move), is returned unchanged; nothing is divided by its norm, unlike Flower's
    `clip_inputs_inplace`, which fails on a zero update.

    Args:
        delta: name -> array.
        clip_norm: C, > 0.

    Returns:
        ClippedUpdate(delta, norm, was_clipped); the arrays are float64 copies.

    Raises:
        ConfigError: C is not a finite number > 0.
        UpdateError: the delta has NaN or Inf values (its norm would not bound anything).
    """
    _check_clip_norm(clip_norm)
    arrays = {name: np.array(value, dtype=np.float64) for name, value in delta.items()}
    # Sum of squares tensor by tensor; Inf or NaN anywhere makes the total non-finite.
    norm = math.sqrt(math.fsum(float(np.vdot(a, a)) for a in arrays.values()))
    if not math.isfinite(norm):
        raise UpdateError(f"update delta has norm {norm} (NaN or Inf values, or overflow); it cannot be clipped")
    if norm <= clip_norm:
        return ClippedUpdate(arrays, norm, False)
    scale = clip_norm / norm
    return ClippedUpdate({name: a * scale for name, a in arrays.items()}, norm, True)


def dp_fedavg_aggregate(
    deltas: Sequence[Arrays],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_sites: float,
    rng: np.random.Generator,
    template: Arrays | None = None,
) -> dict[str, np.ndarray]:
    """The DP-FedAvg mean delta: (sum_k clip(Delta_k, C) + N(0, (z C)^2 I)) / m.

    McMahan et al. 2018, estimator f_f with unit weights. The denominator m is fixed (the expected
    number of sampled sites, q N), not the number of deltas received: with a fixed m, one site's
    presence moves the result by at most C / m whatever the others do, so noise of standard
    deviation z C / m on the mean gives the accounted guarantee. A site that does not reply simply
    contributes nothing (the mean shrinks towards zero); it must not shrink the denominator.

    Every site counts once (unweighted). Weighting by example counts would break the sensitivity
    bound: a site's weight n_k / sum(n) depends on data the site reports, so a site claiming a
    large n could move the mean by up to C instead of C / m, and the weighted denominator itself
    changes when a site is added or removed. (The paper's capped weights w_k <= w_max with a fixed
    denominator q W are not implemented.)

    Args:
        deltas: one name -> array mapping per site that replied; may be empty.
        clip_norm: C, > 0.
        noise_multiplier: z >= 0; the noise on each coordinate of the sum has std z C.
        expected_sites: m, > 0 (need not be an integer under Poisson sampling).
        rng: the source of the Gaussian noise.
        template: name -> array whose names and shapes the result takes; defaults to the first
            delta's, and is required when `deltas` is empty (noise is released even then).

    Returns:
        name -> float64 array: the noisy mean delta.

    Raises:
        ConfigError: a knob out of range, or neither deltas nor a template.
        UpdateError: a delta with non-finite values or names/shapes unlike the template's.
    """
    _check_knobs(clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_sites=expected_sites)
    clipped = [clip_update(d, clip_norm).delta for d in deltas]
    return _noisy_mean(
        clipped, clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_sites=expected_sites,
        rng=rng, template=template,
    )


def _noisy_mean(
    clipped: Sequence[Mapping[str, np.ndarray]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_sites: float,
    rng: np.random.Generator,
    template: Arrays | None,
) -> dict[str, np.ndarray]:
    reference = template if template is not None else (clipped[0] if clipped else None)
    if reference is None:
        raise ConfigError("dp_fedavg_aggregate needs a `template` (names and shapes) when `deltas` is empty.")
    shapes = {name: np.shape(value) for name, value in reference.items()}
    for i, delta in enumerate(clipped):
        got = {name: np.shape(value) for name, value in delta.items()}
        if got != shapes:
            raise UpdateError(f"delta {i} has tensors {got}, expected {shapes}")
    std = noise_multiplier * clip_norm
    mean = {}
    for name, shape in shapes.items():
        total = np.zeros(shape, dtype=np.float64)
        for delta in clipped:
            total += delta[name]
        if std > 0.0:
            total += rng.normal(0.0, std, size=shape)
        mean[name] = total / expected_sites
    return mean


# ---------------------------------------------------------------------------------------------
# Strategy wrapper
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClientDPState:
    """What `ClientLevelDP` needs to continue a run after a crash (see `fedtune.server.resume`).

    Attributes:
        rounds: T so far, the noisy aggregates released (one per `aggregate_train`); the
            guarantee is accounted for every one of them, those before a crash included.
        sampling: the seeded sampling generator's state (`random.Random.getstate()` as JSON
            lists), or None when sites are sampled from the OS CSPRNG (nothing to continue).
        noise: the seeded noise generator's `bit_generator.state`, or None without a seed (a
            fresh CSPRNG-seeded generator every round).
    """

    rounds: int
    sampling: list[Any] | None = None
    noise: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "sampling": self.sampling, "noise": self.noise}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientDPState:
        try:
            return cls(rounds=int(data["rounds"]), sampling=data.get("sampling"), noise=data.get("noise"))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"client-level DP state {dict(data)!r} is malformed ({err}).") from None


def _json_lists(value: Any) -> Any:
    return [_json_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class ClientLevelDP(Strategy):
    """DP-FedAvg around a Flower strategy: this one samples sites and aggregates; the inner one evaluates.

    `configure_train` samples by Poisson: it asks the grid for the connected nodes and sends the
    round's global adapter to each with probability q, independently (`poisson_sample`); it
    remembers the global adapter it sends. A connected count other than the planned N is logged
    (the denominator stays q N; each site's privacy does not depend on N). The inner strategy's
    `configure_train` and `aggregate_train` are *replaced*, not wrapped (FedAvg samples a fixed
    number of sites, which the accountant does not cover, and weights by examples, which breaks
    the sensitivity bound): each reply's single ArrayRecord becomes a delta against the remembered
    global adapter, and the result is global + `dp_fedavg_aggregate(...)`, with the global's
    names, shapes and dtype. A reply that is an error or cannot be used (wrong names or shapes,
    non-finite values) is skipped with a warning; like a site that did not reply, it adds nothing
    to the sum, which keeps the bound. `configure_evaluate`, `aggregate_evaluate` and `summary`
    are delegated to the inner strategy.

    Noise is released even when no site was sampled or replied (global + noise / m): returning
    the global adapter unchanged in that case would tell whether a lone sampled site took part.

    Randomness: with a `seed`, `random.Random(seed)` samples and `numpy.random.default_rng(seed)`
    draws the noise (reproducible; for tests and research only). Without one, sites are sampled
    with `random.SystemRandom()` (the operating system's CSPRNG), and every round's noise comes
    from a fresh `numpy.random.Generator(numpy.random.PCG64(secrets.randbits(128)))`: the 128-bit
    seed comes from the CSPRNG, so the noise cannot be reproduced from a known seed, the clock or
    another round's state. The noise is not a cryptographically secure source: PCG64 is not a
    CSPRNG (its state is recoverable from enough raw outputs), and floating-point Gaussian samples
    leak through their low-order bits (Mironov, "On Significance of the Least Significant Bits
    for Differential Privacy", CCS 2012); Opacus's `secure_mode` addresses both, this does not.

    The round's MetricRecord carries `client-dp-clipped-fraction` (sites whose delta exceeded C
    among those used; omitted when none were), `client-dp-noise-std` (z C / m, the noise std on
    each coordinate of the mean delta), `client-dp-sites`, `client-dp-expected-sites`,
    `client-dp-sample-rate`, `client-dp-clip-norm` and `client-dp-noise-multiplier`. The clipped
    fraction and the count are computed in the clear: fine for the coordinator's records, not
    themselves private.

    Args:
        inner: the strategy that runs evaluation (e.g. FedAvg).
        clip_norm: C, > 0.
        noise_multiplier: z >= 0 (0 only for debugging: no privacy).
        sample_rate: q, the probability that a connected site joins a round, 0 < q <= 1.
        sites: N, the number of sites planned and observed; m = q N is the fixed denominator.
        seed: seeds sampling and noise for reproducibility; None (the default) for deployment.
        sampling_rng: the source of the sampling decisions, overriding the one `seed` chooses
            (tests only).
        arrayrecord_key, configrecord_key: the keys of the train message's adapter and config
            (FedAvg's defaults).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        sites: int,
        seed: int | None = None,
        sampling_rng: random.Random | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        problems = _knob_problems(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
        if not (is_real(sample_rate) and 0.0 < float(sample_rate) <= 1.0):
            problems.append(f"`sample_rate` (q) must be in (0, 1], got {sample_rate!r}.")
        if not (is_int(sites) and sites >= 1):
            problems.append(f"`sites` (N) must be an integer >= 1, got {sites!r}.")
        if not isinstance(inner, Strategy):
            problems.append(f"`inner` must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}.")
        if seed is not None and not is_int(seed):
            problems.append(f"`seed` must be an integer or None, got {seed!r}.")
        if sampling_rng is not None and not isinstance(sampling_rng, random.Random):
            problems.append(f"`sampling_rng` must be a random.Random or None, got {type(sampling_rng).__name__}.")
        if problems:
            raise ConfigError(problems)
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.sites = int(sites)
        self.seed = seed
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        if sampling_rng is not None:
            self.sampling_rng: random.Random = sampling_rng
        else:
            self.sampling_rng = random.Random(seed) if seed is not None else random.SystemRandom()
        self._seeded_rng = np.random.default_rng(seed) if seed is not None else None
        self._global: ArrayRecord | None = None
        self._global_round: int | None = None
        self._released = 0
        if self.noise_multiplier == 0.0:
            logger.warning("client-level DP with noise_multiplier=0: updates are clipped but NOT private")

    @classmethod
    def from_plan(cls, inner: Strategy, plan: ClientLevelPlan, *, seed: int | None = None) -> ClientLevelDP:
        """The strategy that carries out `plan` (C, z, q and N)."""
        return cls(
            inner, clip_norm=plan.clip_norm, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
            sites=plan.sites, seed=seed,
        )

    @property
    def expected_sites(self) -> float:
        """m = q N: the expected number of sampled sites, the fixed denominator."""
        return self.sample_rate * self.sites

    @property
    def noise_std(self) -> float:
        """z C / m: the standard deviation of the noise on each coordinate of the mean delta."""
        return self.noise_multiplier * self.clip_norm / self.expected_sites

    def state(self) -> ClientDPState:
        """The rounds released so far and, when seeded, both generators' positions."""
        sampling = None
        if not isinstance(self.sampling_rng, random.SystemRandom):
            sampling = _json_lists(self.sampling_rng.getstate())
        noise = dict(self._seeded_rng.bit_generator.state) if self._seeded_rng is not None else None
        return ClientDPState(rounds=self._released, sampling=sampling, noise=noise)

    def load_state(self, state: ClientDPState) -> None:
        """Continue from a checkpoint's state: the same sites and noise a run that never stopped would draw.

        Raises:
            ConfigError: the state is seeded and this strategy is not (or the reverse): a deployed
                run must never continue a simulation's predictable generators.
        """
        seeded = self._seeded_rng is not None
        if (state.noise is not None) != seeded or (state.sampling is not None) != (not isinstance(self.sampling_rng, random.SystemRandom)):
            raise ConfigError(
                f"client-level DP state is {'seeded' if state.noise is not None else 'unseeded'}, but this run's "
                f"strategy is {'seeded' if seeded else 'unseeded (OS CSPRNG)'}: it belongs to another kind of run."
            )
        if state.sampling is not None:
            self.sampling_rng.setstate(_tuples(state.sampling))
        if state.noise is not None and self._seeded_rng is not None:
            self._seeded_rng.bit_generator.state = state.noise
        self._released = state.rounds

    def _rng(self) -> np.random.Generator:
        if self._seeded_rng is not None:
            return self._seeded_rng
        return np.random.Generator(np.random.PCG64(secrets.randbits(128)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A train message to each connected site sampled by Poisson at rate q; may be none."""
        self._global, self._global_round = arrays, server_round
        # Sorted so that a seeded run samples the same sites whatever order the grid lists them in.
        connected = sorted(set(grid.get_node_ids()))
        if len(connected) != self.sites:
            logger.warning(
                "round %d: %d sites connected, but the run was planned for N = %d: the denominator stays "
                "q N = %g (each site's privacy depends only on q, z and T)",
                server_round, len(connected), self.sites, self.expected_sites,
            )
        sampled = poisson_sample(connected, self.sample_rate, self.sampling_rng)
        logger.info("round %d: Poisson sampling (q = %g) chose %d of %d connected sites", server_round,
                    self.sample_rate, len(sampled), len(connected))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node) for node in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Global + DP-FedAvg noisy mean delta of the replies (see the class docstring)."""
        if self._global is None or self._global_round != server_round:
            raise RuntimeError(
                f"aggregate_train for round {server_round}, but configure_train was last called for "
                f"round {self._global_round}: the global adapter of this round is unknown"
            )
        global_arrays = {name: arr.numpy() for name, arr in self._global.items()}
        clipped: list[dict[str, np.ndarray]] = []
        norms: list[float] = []
        n_clipped = 0
        for reply in replies:
            try:
                result = clip_update(update_delta(_reply_arrays(reply), global_arrays), self.clip_norm)
            except UpdateError as err:
                logger.warning("round %d: update from node %s not used: %s", server_round, reply.metadata.src_node_id, err)
                continue
            clipped.append(result.delta)
            norms.append(result.norm)
            n_clipped += result.was_clipped
        mean = _noisy_mean(
            clipped, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
            expected_sites=self.expected_sites, rng=self._rng(), template=global_arrays,
        )
        self._released += 1
        new = ArrayRecord(
            {
                name: Array.from_numpy_ndarray(
                    (np.asarray(ref, dtype=np.float64) + mean[name]).astype(ref.dtype, copy=False)
                )
                for name, ref in global_arrays.items()
            }
        )
        metrics: dict[str, float | int] = {
            METRIC_NOISE_STD: self.noise_std,
            "client-dp-sites": len(clipped),
            "client-dp-expected-sites": self.expected_sites,
            "client-dp-sample-rate": self.sample_rate,
            "client-dp-clip-norm": self.clip_norm,
            "client-dp-noise-multiplier": self.noise_multiplier,
        }
        if clipped:
            metrics[METRIC_CLIPPED_FRACTION] = n_clipped / len(clipped)
        else:
            logger.warning("round %d: no usable update; releasing the global adapter plus noise only", server_round)
        logger.info(
            "round %d: client-level DP over %d/%g sites, %d clipped at C=%g (median norm %s), noise std %.3g on the mean",
            server_round, len(clipped), self.expected_sites, n_clipped, self.clip_norm,
            f"{float(np.median(norms)):.3g}" if norms else "-", self.noise_std,
        )
        return new, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the DP settings, then the inner strategy's summary."""
        logger.info(
            "client-level DP (DP-FedAvg): C=%g, z=%g, Poisson sampling q=%g of N=%d sites (m=%g), noise std on the mean %.3g, "
            "randomness %s",
            self.clip_norm, self.noise_multiplier, self.sample_rate, self.sites, self.expected_sites, self.noise_std,
            f"seeded ({self.seed})" if self.seed is not None else "from the OS CSPRNG",
        )
        self.inner.summary()


def _reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    if reply.has_error():
        raise UpdateError(f"site error: {reply.error.reason}")
    records = reply.content.array_records
    if len(records) != 1:
        raise UpdateError(f"reply must carry exactly one ArrayRecord, found {sorted(records)}")
    (record,) = records.values()
    return {name: arr.numpy() for name, arr in record.items()}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _knob_problems(*, clip_norm: object, noise_multiplier: object) -> list[str]:
    problems = []
    if not (is_real(clip_norm) and float(clip_norm) > 0.0):  # type: ignore[arg-type]
        problems.append(f"`clip_norm` must be a finite number > 0, got {clip_norm!r}.")
    if not (is_real(noise_multiplier) and float(noise_multiplier) >= 0.0):  # type: ignore[arg-type]
        problems.append(f"`noise_multiplier` must be a finite number >= 0, got {noise_multiplier!r}.")
    return problems


def _check_knobs(*, clip_norm: object, noise_multiplier: object, expected_sites: object) -> None:
    problems = _knob_problems(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    if not (is_real(expected_sites) and float(expected_sites) > 0.0):  # type: ignore[arg-type]
        problems.append(
            f"`expected_sites` must be a finite number > 0 (the expected number of sites sampled per round), "
            f"got {expected_sites!r}."
        )
    if problems:
        raise ConfigError(problems)


def _check_clip_norm(clip_norm: object) -> None:
    if not (is_real(clip_norm) and float(clip_norm) > 0.0):  # type: ignore[arg-type]
        raise ConfigError(f"`clip_norm` must be a finite number > 0, got {clip_norm!r}.")

"""Client-level differential privacy: DP-FedAvg as a wrapper around a Flower strategy.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg). Each round, every sampled site's update is turned into a delta against the
global adapter, the delta is clipped to L2 norm C (over all tensors together), the clipped deltas
are summed, Gaussian noise N(0, (z C)^2) is added to every coordinate of the sum, and the sum is
divided by the *fixed* m, the expected number of sampled sites (their estimator f_f with unit
weights). Adding or removing one site changes the sum by at most C, so each round is a Gaussian
mechanism with noise multiplier z on the sum; over T rounds in which each site is sampled with
probability q, `client_level_epsilon` accounts for it with the sampled-Gaussian RDP accountant.

The guarantee is about sites (a hospital's whole dataset), not records. It holds for the released
global adapters; the coordinator itself sees every update in the clear (the trusted-server model
of the paper). It composes with, and is independent of, the sample-level DP-SGD at each site.

Pure functions (`update_delta`, `clip_update`, `dp_fedavg_aggregate`) do the math on dicts of
numpy arrays; `ClientLevelDP` is the stateful strategy wrapper.
"""

from __future__ import annotations

import logging
import math
import numbers
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.accounting import Segment, calibrate_noise_multiplier, epsilon
from fedtune.common.errors import ConfigError, UpdateError, check_tensor_names

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]

METRIC_CLIPPED_FRACTION = "client-dp-clipped-fraction"
METRIC_NOISE_STD = "client-dp-noise-std"


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------


def update_delta(update: Arrays, global_arrays: Arrays) -> dict[str, np.ndarray]:
    """The delta Delta_k = w_k - w_t of one site's update against the global adapter, in float64.

    Args:
        update: the site's adapter after local training, name -> array.
        global_arrays: the global adapter the site started from, name -> array.

    Returns:
        name -> float64 array, for every name of `global_arrays` (in its order).

    Raises:
        UpdateError: the names or shapes differ.
    """
    check_tensor_names(global_arrays, update, source="update")
    delta = {}
    for name, ref in global_arrays.items():
        got = np.asarray(update[name])
        if got.shape != np.shape(ref):
            raise UpdateError(f"tensor {name} has shape {list(got.shape)}, expected {list(np.shape(ref))}")
        delta[name] = got.astype(np.float64) - np.asarray(ref, dtype=np.float64)
    return delta


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
# Accounting
# ---------------------------------------------------------------------------------------------


def client_level_epsilon(
    *, sample_rate: float, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` of T rounds of DP-FedAvg, per site (client-level, add/remove one site).

    Each round is one sampled Gaussian mechanism with rate q and noise multiplier z on the sum of
    clipped deltas, so this is `fedtune.common.accounting.epsilon([Segment(q, z, T)])`.

    Sampling caveat: the accountant assumes Poisson sampling, each site joining each round
    independently with probability q, and that who was sampled stays secret. Flower's FedAvg
    instead samples a fixed-size set of m = max(int(f N), min_train_nodes) sites uniformly without
    replacement (with Python's non-cryptographic `random`); pass q = m / N. The Poisson figure is
    not a proven bound for fixed-size sampling (the bounds for sampling without replacement, e.g.
    Wang, Balle, Kasiviswanathan 2019, are for replace-one neighbours and are larger; see also
    Lebeda et al. 2024 on this pitfall). With q = 1 (every site every round) there is no
    amplification and the figure is exact for either scheme.

    Args:
        sample_rate: q, the fraction of sites sampled per round, 0 < q <= 1.
        noise_multiplier: z >= 0; z = 0 gives `inf` (no privacy) for T >= 1.
        rounds: T, the number of rounds (noisy releases), >= 0.
        delta: the target delta, 0 < delta < 1.
        accountant: one of `fedtune.common.accounting.ACCOUNTANTS`.

    Returns:
        Epsilon (>= 0); 0.0 for T = 0.

    Raises:
        ConfigError: a knob out of range.
    """
    if noise_multiplier == 0 and not isinstance(noise_multiplier, bool):
        Segment(sample_rate, 1.0, rounds)  # validates q and T, as the z > 0 path does
        epsilon([], delta=delta, accountant=accountant)  # validates delta and the accountant
        return math.inf if rounds > 0 else 0.0
    return epsilon([Segment(sample_rate, noise_multiplier, rounds)], delta=delta, accountant=accountant)


def calibrate_client_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest z with which T rounds of DP-FedAvg at rate q stay within `target_epsilon`.

    `fedtune.common.accounting.calibrate_noise_multiplier` with steps = T; the same sampling
    caveat as `client_level_epsilon` applies.

    Raises:
        ConfigError: a knob out of range, or a target the accountant cannot certify.
    """
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=rounds, accountant=accountant
    )


def fedavg_sample_size(*, sites: int, fraction_train: float, min_train_nodes: int) -> int:
    """m, the number of sites Flower's FedAvg samples per round: max(int(f N), min_train_nodes).

    FedAvg samples none when f = 0. Use m as `expected_sites` and m / N as the sample rate q.
    """
    if fraction_train == 0.0:
        return 0
    return max(int(sites * fraction_train), min_train_nodes)


# ---------------------------------------------------------------------------------------------
# Strategy wrapper
# ---------------------------------------------------------------------------------------------


class ClientLevelDP(Strategy):
    """DP-FedAvg around a Flower strategy: the inner one samples sites; this one aggregates.

    `configure_train`, `configure_evaluate`, `aggregate_evaluate` and `summary` are delegated to
    the inner strategy; `configure_train` also remembers the global adapter it sends. The inner
    `aggregate_train` is *replaced*, not wrapped (FedAvg's weighting by examples would break the
    sensitivity bound): each reply's single ArrayRecord becomes a delta against the remembered
    global adapter, and the result is global + `dp_fedavg_aggregate(...)`, with the global's
    names, shapes and dtype. A reply that is an error or cannot be used (wrong names or shapes,
    non-finite values) is skipped with a warning; like a site that did not reply, it adds nothing
    to the sum, which keeps the bound.

    Noise is released even when no site replies (global + noise / m): returning the global adapter
    unchanged in that case would tell whether a lone sampled site took part.

    Noise source: with a `seed`, `numpy.random.default_rng(seed)` (reproducible; for tests and
    research only). Without one, every round draws from a fresh
    `numpy.random.Generator(numpy.random.PCG64(secrets.randbits(128)))`: the 128-bit seed comes
    from the operating system's CSPRNG, so the noise cannot be reproduced from a known seed, the
    clock or another round's state. It is not a cryptographically secure noise source: PCG64 is
    not a CSPRNG (its state is recoverable from enough raw outputs), and floating-point Gaussian
    samples leak through their low-order bits (Mironov, "On Significance of the Least Significant
    Bits for Differential Privacy", CCS 2012); Opacus's `secure_mode` addresses both, this does not.

    The round's MetricRecord carries `client-dp-clipped-fraction` (sites whose delta exceeded C
    among those used; omitted when none were), `client-dp-noise-std` (z C / m, the noise std on
    each coordinate of the mean delta), `client-dp-sites`, `client-dp-expected-sites`,
    `client-dp-clip-norm` and `client-dp-noise-multiplier`. The clipped fraction and the count
    are computed in the clear: fine for the coordinator's records, not themselves private.

    Args:
        inner: the strategy that samples sites and runs evaluation (e.g. FedAvg).
        clip_norm: C, > 0.
        noise_multiplier: z >= 0 (0 only for debugging: no privacy).
        expected_sites: m, the expected number of sites sampled per round, > 0.
        seed: seeds the noise for reproducibility; None (the default) for deployment.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_sites: float,
        seed: int | None = None,
    ) -> None:
        problems = _knob_problems(clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_sites=expected_sites)
        if not isinstance(inner, Strategy):
            problems.append(f"`inner` must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}.")
        if seed is not None and not _is_int(seed):
            problems.append(f"`seed` must be an integer or None, got {seed!r}.")
        if problems:
            raise ConfigError(problems)
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_sites = float(expected_sites)
        self.seed = seed
        self._seeded_rng = np.random.default_rng(seed) if seed is not None else None
        self._global: ArrayRecord | None = None
        self._global_round: int | None = None
        if self.noise_multiplier == 0.0:
            logger.warning("client-level DP with noise_multiplier=0: updates are clipped but NOT private")

    @property
    def noise_std(self) -> float:
        """z C / m: the standard deviation of the noise on each coordinate of the mean delta."""
        return self.noise_multiplier * self.clip_norm / self.expected_sites

    def _rng(self) -> np.random.Generator:
        if self._seeded_rng is not None:
            return self._seeded_rng
        return np.random.Generator(np.random.PCG64(secrets.randbits(128)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy, remembering `arrays` as the round's global adapter."""
        self._global, self._global_round = arrays, server_round
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if messages and len(messages) != self.expected_sites:
            logger.warning(
                "round %d: %d sites sampled, but expected_sites is %g; the noise is calibrated "
                "for %g and the accountant assumes q = expected_sites / sites",
                server_round, len(messages), self.expected_sites, self.expected_sites,
            )
        return messages

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
            "client-level DP (DP-FedAvg): C=%g, z=%g, m=%g, noise std on the mean %.3g, noise %s",
            self.clip_norm, self.noise_multiplier, self.expected_sites, self.noise_std,
            f"seeded ({self.seed})" if self.seed is not None else "from a secrets-seeded PCG64 per round",
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


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))  # type: ignore[arg-type]


def _knob_problems(*, clip_norm: object, noise_multiplier: object, expected_sites: object) -> list[str]:
    problems = []
    if not (_is_real(clip_norm) and float(clip_norm) > 0.0):  # type: ignore[arg-type]
        problems.append(f"`clip_norm` must be a finite number > 0, got {clip_norm!r}.")
    if not (_is_real(noise_multiplier) and float(noise_multiplier) >= 0.0):  # type: ignore[arg-type]
        problems.append(f"`noise_multiplier` must be a finite number >= 0, got {noise_multiplier!r}.")
    if not (_is_real(expected_sites) and float(expected_sites) > 0.0):  # type: ignore[arg-type]
        problems.append(
            f"`expected_sites` must be a finite number > 0 (the expected number of sites sampled per round), "
            f"got {expected_sites!r}."
        )
    return problems


def _check_knobs(*, clip_norm: object, noise_multiplier: object, expected_sites: object) -> None:
    problems = _knob_problems(clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_sites=expected_sites)
    if problems:
        raise ConfigError(problems)


def _check_clip_norm(clip_norm: object) -> None:
    if not (_is_real(clip_norm) and float(clip_norm) > 0.0):  # type: ignore[arg-type]
        raise ConfigError(f"`clip_norm` must be a finite number > 0, got {clip_norm!r}.")

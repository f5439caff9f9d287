"""Privacy accounting for DP-SGD: epsilon of a schedule, and noise calibration to a target epsilon.

Pure math, no I/O. A site's DP-SGD history is a sequence of `Segment`s (sampling rate q, noise
multiplier z, T steps); segments may differ (a re-planned budget after a restart, a changed batch
size), and their privacy composes adaptively.

The RDP accountant follows the references that Opacus's `accountants/analysis/rdp.py` implements,
and calls those very functions:

- Mironov, "Renyi Differential Privacy", CSF 2017: RDP composes by adding curves order by order.
- Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019:
  the RDP of one step of the Poisson-sampled Gaussian mechanism with rate q and noise multiplier z.
- Balle, Barthe, Gaboardi, Hsu, Sato, "Hypothesis Testing Interpretations and Renyi Differential
  Privacy", AISTATS 2020 (Theorem 21): the conversion from an RDP curve to (epsilon, delta)-DP.

The orders (alphas) are Opacus's `RDPAccountant.DEFAULT_ALPHAS`, so a figure here equals what an
Opacus `PrivacyEngine` with the RDP accountant reports for the same history. The grid stops at
alpha = 63, which puts a floor under the epsilon it can certify (about 0.18 at delta = 1e-7, however
large z is); below that, calibration reports the target as unreachable.

The PRV accountant ("prv") is tighter (5-45% below RDP at typical DP-SGD settings):

- Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021: the privacy
  loss random variable (PRV) of each mechanism is truncated to [-L, L] and discretised on a mesh,
  the PRVs are composed by FFT, and epsilon is read off the composed distribution together with a
  rigorous error bound (Theorem 5.5; the domain size L is their Remark 5.6).

It calls Opacus's `accountants/analysis/prv` functions, with the same error budget and domain as
Opacus's `PRVAccountant`, so a figure here matches (to ~1e-9) what a `PrivacyEngine` with the PRV
accountant reports, while epsilon stays below about 10 (see `_PRV_EPS_ERROR` for beyond that).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import prv as opacus_prv
from opacus.accountants.analysis import rdp as opacus_rdp

from .errors import ConfigError

logger = logging.getLogger(__name__)

RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""The RDP orders (alphas) every curve is evaluated on: Opacus's RDPAccountant default."""

# Calibration searches z in this range; beyond it a target is treated as unreachable.
_Z_MIN = 1e-3
_Z_MAX = 1e4
# Relative width of the final bracket: the answer is at most this much larger than the exact one.
_Z_RTOL = 1e-3

# PRV error budget (Gopi et al. 2021, Theorem 5.5). eps_error is absolute: 0.01 and delta / 1000 are
# Opacus's PrivacyEngine defaults. The mesh shrinks as eps_error / sqrt(T), so above epsilon ~ 10
# eps_error grows to 1e-3 x the domain's half-width L (~0.1% of epsilon), and past a mesh of 2^22
# points (32 MiB per array, a few seconds) it grows to fit that mesh: memory and time stay bounded
# for any T, and the figure stays an upper bound, only a looser one.
_PRV_EPS_ERROR = 0.01
_PRV_EPS_ERROR_PER_L = 1e-3
_PRV_DELTA_ERROR_FRACTION = 1e-3
_PRV_MAX_POINTS = 2**22
# Where PRV is not run, the RDP bound (also an upper bound) is reported: past eps_error = 1 the
# domain bound that Opacus and the authors' code use is not known to hold (Opacus, domain.py FIXME),
# and past L = 700 exp(t) overflows in float64 (epsilon would be in the hundreds anyway).
_PRV_MAX_EPS_ERROR = 1.0
_PRV_MAX_L = 700.0


@dataclass(frozen=True)
class Segment:
    """A run of T DP-SGD steps with Poisson sampling rate q and noise multiplier z.

    Attributes:
        sample_rate: q, the probability that a record is in a step's batch; 0 < q <= 1.
        noise_multiplier: z, the noise standard deviation divided by the clipping norm C; z > 0.
        steps: T, the number of steps; T >= 0.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.sample_rate <= 1.0:
            problems.append(f"`sample_rate` must be in (0, 1], got {self.sample_rate!r}.")
        if not (self.noise_multiplier > 0.0 and math.isfinite(self.noise_multiplier)):
            problems.append(
                f"`noise_multiplier` must be a finite number > 0, got {self.noise_multiplier!r}."
            )
        if not _is_count(self.steps, minimum=0):
            problems.append(f"`steps` must be an integer >= 0, got {self.steps!r}.")
        if problems:
            raise ConfigError(problems)


def rdp_curve(segments: Sequence[Segment]) -> np.ndarray:
    """The RDP curve of the adaptive composition of `segments`, one value per order in `RDP_ORDERS`.

    Each segment contributes T times the RDP of one sampled Gaussian step (Mironov, Talwar, Zhang
    2019); segments compose by adding curves order by order (Mironov 2017, Proposition 1).

    Args:
        segments: the history, in any order.

    Returns:
        A new float array aligned with `RDP_ORDERS`; all zeros for an empty history.
    """
    curve = np.zeros(len(RDP_ORDERS))
    for segment in segments:
        if segment.steps > 0:
            curve += segment.steps * _rdp_one_step(segment.sample_rate, segment.noise_multiplier)
    return curve


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(q: float, z: float) -> np.ndarray:
    # Cached because calibration re-evaluates the same spent segments at every probe, and the
    # series for fractional orders is slow (~0.1 s per curve at moderate q and z).
    curve = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(RDP_ORDERS))
    curve = np.asarray(curve, dtype=float)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """Epsilon at delta from the summed RDP curve (Balle et al. 2020, Theorem 21, via Opacus)."""
    eps, _best_order = opacus_rdp.get_privacy_spent(
        orders=list(RDP_ORDERS), rdp=rdp_curve(segments), delta=delta
    )
    # The conversion is an upper bound, and any larger value is one too; a negative bound (delta
    # close to 1) means no loss at all.
    return max(0.0, float(eps))


def _prv_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """An upper bound on epsilon at delta by numerical composition of PRVs (Gopi et al. 2021).

    Segments with the same (q, z) are one PRV composed with itself sum(T) times (composition
    commutes); distinct ones compose by convolution. The domain half-width L and the mesh follow
    Opacus's `PRVAccountant` (Remark 5.6 and Theorem 5.5 of the paper), with L from the RDP bound at
    delta_error / 4 (the whole history) and at delta_error / (8 sum T) (one step of each PRV).

    Of the estimate and its two bounds this returns the *upper* one: epsilon of the discretised
    composition at delta - delta_error, plus eps_error. The mechanism is (epsilon, delta)-DP with
    that value; it is never optimistic, and exceeds the exact epsilon by at most ~2 eps_error.
    Where the discretisation would not be sound or affordable (see `_PRV_MAX_EPS_ERROR`,
    `_PRV_MAX_L`, tiny delta), it returns the RDP bound instead, which is also an upper bound.
    """
    merged: dict[tuple[float, float], int] = {}
    for segment in segments:
        if segment.steps > 0:
            key = (segment.sample_rate, segment.noise_multiplier)
            merged[key] = merged.get(key, 0) + segment.steps
    history = [Segment(q, z, steps) for (q, z), steps in merged.items()]
    total_steps = sum(merged.values())
    delta_error = _PRV_DELTA_ERROR_FRACTION * delta

    with warnings.catch_warnings():
        # A best order at the grid's end makes L larger than needed: a wider domain, never a less
        # sound one. The warning would speak of a bound that is not the one reported.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        one_step = [Segment(s.sample_rate, s.noise_multiplier, 1) for s in history]
        l_max = max(
            _rdp_epsilon(history, delta_error / 4),
            *(_rdp_epsilon([step], delta_error / (8 * total_steps)) for step in one_step),
        )
    # Mesh factor of Theorem 5.5: mesh = eps_error / spread.
    spread = math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    eps_error = max(_PRV_EPS_ERROR, _PRV_EPS_ERROR_PER_L * l_max)
    half_width = max(l_max, eps_error) + 3
    eps_error = max(eps_error, 2 * half_width * spread / _PRV_MAX_POINTS)
    if not (half_width <= _PRV_MAX_L and eps_error <= _PRV_MAX_EPS_ERROR):
        logger.info(
            "PRV accountant: domain half-width %.4g, eps_error %.3g out of range for %d steps at "
            "delta=%g; reporting the RDP bound instead.", half_width, eps_error, total_steps, delta,
        )
        return _rdp_epsilon(segments, delta)

    # Widen the domain (never less sound) to an even 5-smooth number of points: at a size with a
    # large prime factor the FFT is up to 10x slower. With (k - 1/2) mesh steps each side, Opacus's
    # alignment gives 2k + 2 points, whatever the rounding.
    mesh = eps_error / spread
    points = 2 * scipy.fft.next_fast_len(math.ceil(half_width / mesh) + 2, real=True)
    half_width = (points / 2 - 1.5) * mesh
    domain = opacus_prv.Domain.create_aligned(-half_width, half_width, mesh)
    with np.errstate(divide="ignore"):  # log(1 - q) = -inf at q = 1 is intended
        discretised = [
            opacus_prv.discretize(
                opacus_prv.TruncatedPrivacyRandomVariable(
                    opacus_prv.PoissonSubsampledGaussianPRV(s.sample_rate, s.noise_multiplier),
                    domain.t_min,
                    domain.t_max,
                ),
                domain,
            )
            for s in history
        ]
    composed = opacus_prv.compose_heterogeneous(discretised, [s.steps for s in history])
    try:
        _lower, _estimate, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    except ValueError as err:  # delta too small for float64 sums over this many points
        logger.info("PRV accountant: %s; reporting the RDP bound instead.", err)
        return _rdp_epsilon(segments, delta)
    return max(0.0, float(upper))


# One entry per accountant: (history, delta) -> epsilon.
_ACCOUNTANTS: dict[str, Callable[[Sequence[Segment], float], float]] = {
    "rdp": _rdp_epsilon,
    "prv": _prv_epsilon,
}
ACCOUNTANTS: tuple[str, ...] = tuple(_ACCOUNTANTS)
"""The accountant names `epsilon` and `calibrate_noise_multiplier` accept."""


def epsilon(segments: Sequence[Segment], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the adaptive composition of all `segments`.

    With the RDP accountant: sum over segments of T * RDP_q,z(alpha) on the shared grid of orders,
    then the smallest epsilon over alpha of the Balle et al. (2020) conversion at delta. With the
    PRV accountant: the upper end of the numerical bound of Gopi et al. (2021), never below the
    exact epsilon and above it by about 0.01 (about 0.1% of epsilon above ~10); see `_prv_epsilon`.

    Args:
        segments: the DP-SGD history; segments may have different q, z and T.
        delta: the target delta, 0 < delta < 1.
        accountant: one of `ACCOUNTANTS`.

    Returns:
        Epsilon (>= 0); 0.0 when there are no steps at all. May be `inf` for tiny z.

    Raises:
        ConfigError: unknown accountant or delta out of range.
    """
    compute = _accountant(accountant)
    _check_delta(delta)
    if all(segment.steps == 0 for segment in segments):
        return 0.0
    return compute(segments, delta)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    spent: Sequence[Segment] = (),
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier z that keeps the whole history within `target_epsilon`.

    Finds z such that epsilon(spent + [Segment(q, z, T)]) <= target_epsilon at `delta`, and
    epsilon at z * (1 - 1e-3) would exceed it (unless z = 1e-3 already meets the target). Epsilon
    falls as z grows, so a bracketing search whose answer is the bracket's upper end never
    overshoots the target. A site calls this once before its first round with T = rounds x local
    steps, so the target is reached when the planned rounds end; a resumed site passes what it has
    already `spent` to re-plan the remaining budget.

    Args:
        target_epsilon: the budget for the whole history, > 0.
        delta: the target delta, 0 < delta < 1.
        sample_rate: q of the planned steps, 0 < q <= 1.
        steps: T, the number of planned steps, >= 1.
        spent: segments already run (their privacy is already spent).
        accountant: one of `ACCOUNTANTS`.

    Returns:
        The noise multiplier z.

    Raises:
        ConfigError: a knob out of range, the target already used up by `spent`, or a target
            the accountant cannot certify at this delta even with z = 1e4.
    """
    compute = _accountant(accountant)
    problems = []
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        problems.append(f"`target_epsilon` must be a finite number > 0, got {target_epsilon!r}.")
    if not 0.0 < delta < 1.0:
        problems.append(f"`delta` must be in (0, 1), got {delta!r}.")
    if not 0.0 < sample_rate <= 1.0:
        problems.append(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
    if not _is_count(steps, minimum=1):
        problems.append(f"`steps` must be an integer >= 1, got {steps!r}.")
    if problems:
        raise ConfigError(problems)

    history = tuple(spent)
    already = epsilon(history, delta=delta, accountant=accountant)
    if already >= target_epsilon:
        raise ConfigError(
            f"`target_epsilon` is {target_epsilon!r}, but the spent segments already use epsilon="
            f"{already:.4g} at delta={delta!r}; no budget is left for {steps} more steps. "
            "Raise the target or stop training."
        )

    def eps_at(z: float) -> float:
        # Opacus warns when the best order is at the end of its grid; for the probes of a search
        # that is expected and says nothing about the answer, which is checked below unmuted.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return compute(history + (Segment(sample_rate, z, steps),), delta)

    # Bracket the answer with steps of 8x from z = 1, then shrink the bracket with the Illinois
    # variant of false position on log(eps) against log(z), which is close to a straight line: a
    # probe can take ~0.5 s at large q, and this needs about a third of the probes of bisection.
    # Invariant: eps(lo) > target >= eps(hi).
    z = 1.0
    e = eps_at(z)
    if e > target_epsilon:
        lo, e_lo = z, e
        while True:
            if lo >= _Z_MAX:
                raise ConfigError(
                    f"`target_epsilon`={target_epsilon!r} cannot be reached at delta={delta!r} "
                    f"with the {accountant!r} accountant: {steps} steps at "
                    f"sample_rate={sample_rate!r} exceed it even with noise_multiplier={_Z_MAX:g} "
                    f"(already spent: epsilon={already:.4g}). "
                    "Raise the target or delta, or plan fewer steps."
                )
            hi = min(8.0 * lo, _Z_MAX)
            e_hi = eps_at(hi)
            if e_hi <= target_epsilon:
                break
            lo, e_lo = hi, e_hi
    else:
        hi, e_hi = z, e
        while True:
            if hi <= _Z_MIN:
                return hi  # the target is met even with almost no noise
            lo = max(hi / 8.0, _Z_MIN)
            e_lo = eps_at(lo)
            if e_lo > target_epsilon:
                break
            hi, e_hi = lo, e_lo
    z = _shrink_bracket(eps_at, target_epsilon, lo, e_lo, hi, e_hi)
    # Once more without the filter, so a grid-edge warning about the answer reaches the caller.
    compute(history + (Segment(sample_rate, z, steps),), delta)
    return z


def _shrink_bracket(
    eps_at: Callable[[float], float],
    target: float,
    lo: float,
    e_lo: float,
    hi: float,
    e_hi: float,
) -> float:
    """Shrinks [lo, hi] to relative width `_Z_RTOL`, keeping eps(lo) > target >= eps(hi).

    Returns hi, the end that meets the target.
    """

    def gap(e: float) -> float:
        # log(eps / target), finite even where eps is 0 or inf, so interpolation stays defined.
        return math.log(min(max(e, 1e-300), 1e300) / target)

    x_lo, x_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = gap(e_lo), gap(e_hi)
    kept = 0  # +1: lo kept last time, -1: hi kept last time
    while hi - lo > _Z_RTOL * hi:
        x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo) if g_lo != g_hi else 0.5 * (x_lo + x_hi)
        # Stay strictly inside, so every probe shrinks the bracket.
        width = x_hi - x_lo
        x = min(max(x, x_lo + 0.05 * _Z_RTOL * width), x_hi - 0.05 * _Z_RTOL * width)
        e = eps_at(math.exp(x))
        if e > target:
            x_lo, g_lo = x, gap(e)
            if kept == -1:
                g_hi /= 2.0  # Illinois: the end kept twice pulls the next probe toward it
            kept = -1
        else:
            x_hi, g_hi = x, gap(e)
            if kept == 1:
                g_lo /= 2.0
            kept = 1
        lo, hi = math.exp(x_lo), math.exp(x_hi)
    return hi


def _accountant(name: str) -> Callable[[Sequence[Segment], float], float]:
    try:
        return _ACCOUNTANTS[name]
    except (KeyError, TypeError):
        allowed = list(ACCOUNTANTS)
        raise ConfigError(f"`accountant` must be one of {allowed}, got {name!r}.") from None


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"`delta` must be in (0, 1), got {delta!r}.")


def _is_count(value: object, *, minimum: int) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= minimum  # type: ignore[arg-type]
    except TypeError:
        return False

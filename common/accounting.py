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
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from .errors import ConfigError

RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""The RDP orders (alphas) every curve is evaluated on: Opacus's RDPAccountant default."""

# Calibration searches z in this range; beyond it a target is treated as unreachable.
_Z_MIN = 1e-3
_Z_MAX = 1e4
# Relative width of the final bracket: the answer is at most this much larger than the exact one.
_Z_RTOL = 1e-3


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


# One entry per accountant: (history, delta) -> epsilon. A PRV accountant joins here as "prv".
_ACCOUNTANTS: dict[str, Callable[[Sequence[Segment], float], float]] = {"rdp": _rdp_epsilon}
ACCOUNTANTS: tuple[str, ...] = tuple(_ACCOUNTANTS)
"""The accountant names `epsilon` and `calibrate_noise_multiplier` accept."""


def epsilon(segments: Sequence[Segment], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the adaptive composition of all `segments`.

    With the RDP accountant: sum over segments of T * RDP_q,z(alpha) on the shared grid of orders,
    then the smallest epsilon over alpha of the Balle et al. (2020) conversion at delta.

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

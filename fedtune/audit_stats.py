"""Statistics of privacy audits: the one-run epsilon lower bound, Clopper-Pearson intervals, ROC points.

Pure functions of counts and scores (numpy and scipy only), so each is checked against an
independent computation in ``tests/unit/test_canary_bound.py`` and ``tests/unit/test_audit_stats.py``.

One-run audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run",
NeurIPS, arXiv:2305.08846). m canaries, each included in training independently with probability
1/2 (S_i uniform on {-1, +1}); after the run an auditor guesses "in" for some canaries, "out" for
others and abstains on the rest: r guesses, v of them correct. If the training run is
(epsilon, delta)-DP with respect to each canary, then (their Theorem 5.2, with Theorem 3.1 at
delta = 0), for q = e^epsilon / (1 + e^epsilon) and f(v) = P[Binomial(r, q) >= v],

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i.

The right side is the p-value of observing v correct guesses if the run were (epsilon, delta)-DP;
the empirical lower bound at confidence 1 - alpha is the largest epsilon whose p-value is still
below alpha: a run that is (epsilon, delta)-DP for any smaller epsilon would have produced this
many correct guesses with probability under alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
# At least this many expected false positives at the target rate before a TPR at that FPR is reported:
# with fewer, the threshold rests on the one or two top non-member scores and the rate is mostly noise
# (Carlini et al. 2022 report TPR at 0.1% FPR on 25,000+ non-members). 10 / FPR non-members: 1,000 at 1%,
# 10,000 at 0.1%.
MIN_FALSE_POSITIVES = 10
_EPSILON_CAP = 100.0  # q = logistic(100) rounds to 1 in float64; nothing above it can be told apart


# ------------------------------------------------------------------------------------ one-run bound
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the run is (epsilon, delta)-DP per canary (Steinke et al. 2023, Thm 5.2).

    Args:
        m: Canaries, each included independently with probability 1/2.
        r: Guesses made (abstentions excluded), r <= m.
        v: Correct guesses, v <= r.
        epsilon: epsilon of the null hypothesis, >= 0.
        delta: delta of the null hypothesis, in [0, 1].
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}.")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}.")
    from scipy.special import expit
    from scipy.stats import binom

    q = float(expit(epsilon))  # accuracy of epsilon-DP randomised response on one bit
    f_v = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, f_v)
    i = np.arange(1, v + 1)
    # f(v - i) - f(v) = P[v - i <= Bin(r, q) < v], the mass of the i values just below v.
    gaps = binom.sf(v - i - 1, r, q) - f_v
    return min(1.0, f_v + 2.0 * m * delta * float(np.max(gaps / i)))


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Largest epsilon that ``v`` correct out of ``r`` guesses on ``m`` canaries refutes at ``confidence``.

    The p-value falls as epsilon falls, so this is the root of p(epsilon) = 1 - confidence, found by
    bisection to 1e-6; 0.0 when even epsilon = 0 is not refuted (no evidence of leakage).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    alpha = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2.0 * high
        if high > _EPSILON_CAP:
            return _EPSILON_CAP
    while high - low > 1e-6:  # invariant: p(low) < alpha <= p(high)
        mid = (low + high) / 2.0
        if one_run_p_value(m, r, v, mid, delta) < alpha:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class CanaryGuess:
    """One abstaining guesser: the top ``k_in`` scores guessed in, the bottom ``k_out`` guessed out."""

    k_in: int
    k_out: int
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit of m canary scores.

    ``epsilon_lower_bound`` is the best over ``candidates`` guessers, each judged at the Bonferroni
    level (1 - confidence) / len(candidates), so the maximum holds at ``confidence`` overall:
    picking the best k after seeing the scores is itself a choice the bound must pay for.
    """

    canaries: int
    included: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    best: CanaryGuess
    candidates: tuple[CanaryGuess, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "canaries": self.canaries, "included": self.included, "delta": self.delta, "confidence": self.confidence,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "best": vars(self.best), "candidates": [vars(c) for c in self.candidates],
        }


def default_guess_sizes(m: int) -> tuple[int, ...]:
    """k (guesses on each side) to try: 1, 2, 5 per decade up to m // 2 (at most ~3 per decade)."""
    sizes = [k for e in range(0, 7) for k in (10**e, 2 * 10**e, 5 * 10**e) if k <= m // 2]
    return tuple(sizes) or (1,)


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    guess_sizes: Sequence[int] | None = None,
) -> OneRunAudit:
    """Score-ranked guesses on each canary and the epsilon lower bound they support.

    Higher score = more likely included. For each k in ``guess_sizes`` (default
    ``default_guess_sizes(m)``) the top k scores are guessed "in" and the bottom k "out" (the rest
    abstain); ties are broken by a fixed order of the canaries, never by their inclusion.

    Raises:
        ValueError: mismatched lengths, a non-finite score, or a k outside [1, m // 2].
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    inc = np.asarray(included, dtype=bool).ravel()
    if s.size != inc.size or s.size < 2:
        raise ValueError(f"need one inclusion bit per score and at least 2 canaries, got {s.size} scores and {inc.size} bits.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int(np.sum(~np.isfinite(s)))} canary score(s) are not finite; every score must be.")
    m = int(s.size)
    sizes = tuple(guess_sizes) if guess_sizes is not None else default_guess_sizes(m)
    bad = [k for k in sizes if not 1 <= k <= m // 2]
    if bad or not sizes:
        raise ValueError(f"guess sizes must be in [1, m // 2 = {m // 2}], got {list(sizes)}.")
    order = np.argsort(-s, kind="stable")  # highest score first; stable: ties keep canary order
    level = 1.0 - (1.0 - confidence) / len(sizes)
    candidates = []
    for k in sizes:
        correct = int(np.sum(inc[order[:k]]) + np.sum(~inc[order[m - k:]]))
        bound = epsilon_lower_bound(m, 2 * k, correct, delta=delta, confidence=level)
        candidates.append(CanaryGuess(k_in=k, k_out=k, guesses=2 * k, correct=correct, epsilon_lower_bound=bound))
    best = max(candidates, key=lambda c: c.epsilon_lower_bound)
    return OneRunAudit(canaries=m, included=int(inc.sum()), delta=delta, confidence=confidence,
                       epsilon_lower_bound=best.epsilon_lower_bound, best=best, candidates=tuple(candidates))


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct v <= guesses r <= canaries m, got v={v}, r={r}, m={m}.")


# ------------------------------------------------------------------------------ intervals and ROC
@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def clopper_pearson(successes: int, trials: int, *, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Exact (Clopper and Pearson 1934) two-sided interval for a binomial proportion.

    low = Beta((1-c)/2; k, n-k+1), high = Beta((1+c)/2; k+1, n-k); 0 and 1 at the edges k = 0, k = n.
    """
    if not (0 <= successes <= trials and trials >= 1):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return Interval(low=low, high=high)


def non_members_needed(fpr: float) -> int:
    """Non-members needed before a TPR at ``fpr`` is reported: MIN_FALSE_POSITIVES / fpr, rounded up."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}.")
    return math.ceil(MIN_FALSE_POSITIVES / fpr - 1e-9)


@dataclass(frozen=True)
class RocCurve:
    """Every operating point of the rule ``score >= t``: FPR and TPR from (0, 0) to (1, 1), FPR ascending."""

    fpr: np.ndarray
    tpr: np.ndarray


def roc_curve(member_scores: Any, non_member_scores: Any) -> RocCurve:
    """The empirical ROC of ``score >= t`` over every distinct score (members are positives)."""
    pos = np.sort(np.asarray(member_scores, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(non_member_scores, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores on both sides, got {pos.size} members and {neg.size} non-members.")
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")  # members with score >= t
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    return RocCurve(fpr=np.r_[0.0, fp / neg.size], tpr=np.r_[0.0, tp / pos.size])

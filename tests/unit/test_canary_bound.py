"""The one-run epsilon lower bound (Steinke, Nasr, Jagielski 2023) against independent computations.

Oracles: the paper's own p-value written out as its loop over probability masses (their Algorithm,
arXiv:2305.08846 v1, appendix code), scipy's exact one-sided binomial test, and the closed form of
the all-correct case; never fedtune's formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedtune.audit_stats import default_guess_sizes, epsilon_lower_bound, one_run_audit, one_run_p_value


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value, as its appendix code computes it: beta + 2 m delta alpha, alpha a running max."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += stats.binom.pmf(v - i, r, q)  # P[v > Bin(r, q) >= v - i]
        alpha = max(alpha, mass / i)
    return min(1.0, beta + alpha * delta * 2 * m)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 100, 80, 1.0, 0.0), (1000, 100, 80, 1.0, 1e-5), (1000, 200, 190, 2.5, 1e-5),
     (5000, 1000, 700, 0.5, 1e-6), (200, 20, 20, 3.0, 1e-3), (1000, 50, 10, 0.2, 1e-5)],
)
def test_p_value_matches_the_papers_loop(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("r", "v", "eps"), [(100, 80, 1.0), (40, 33, 0.3), (500, 400, 1.2), (10, 10, 2.0)])
def test_p_value_at_delta_zero_is_scipys_exact_binomial_test(r: int, v: int, eps: float) -> None:
    expected = stats.binomtest(v, r, 1 / (1 + math.exp(-eps)), alternative="greater").pvalue

    assert one_run_p_value(10 * r, r, v, eps, 0.0) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 500])
def test_all_guesses_correct_has_a_closed_form(r: int) -> None:
    # Prepare: with v = r and delta = 0 the p-value is q^r, so the bound solves q = alpha^(1/r):
    # epsilon = log(q / (1 - q)).
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))

    # Execute
    bound = epsilon_lower_bound(1000, r, r, delta=0.0, confidence=0.95)

    # Assert
    assert bound == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("m", "r", "v", "delta"), [(1000, 200, 170, 1e-5), (1000, 1000, 700, 1e-5), (400, 60, 58, 1e-4)])
def test_bound_is_where_the_papers_p_value_crosses_five_percent(m: int, r: int, v: int, delta: float) -> None:
    bound = epsilon_lower_bound(m, r, v, delta=delta, confidence=0.95)

    assert bound > 0
    assert _paper_p_value(m, r, v, bound, delta) < 0.05 <= _paper_p_value(m, r, v, bound + 1e-4, delta)


def test_chance_level_guessing_gives_zero() -> None:
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 58, delta=1e-5) == 0.0  # one-sided p ~ 0.07 at epsilon 0


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in (130, 150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 200, 190, delta=1e-3) < epsilon_lower_bound(1000, 200, 190, delta=0.0)


def test_perfect_scores_reach_the_largest_guess_size_bonferroni_corrected() -> None:
    # Prepare: scores that rank every included canary above every excluded one.
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0, 0.01, 1000)

    # Execute
    audit = one_run_audit(scores, included, delta=0.0, confidence=0.95)

    # Assert: the largest k whose guesses can all be right (both sides hold at least k canaries)
    # wins; each of the G candidates is judged at 5% / G.
    sizes = default_guess_sizes(1000)
    k = max(s for s in sizes if s <= min(included.sum(), (~included).sum()))
    q = (0.05 / len(sizes)) ** (1 / (2 * k))
    assert audit.best.k_in == k and audit.best.correct == 2 * k
    assert audit.epsilon_lower_bound == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_scores_independent_of_inclusion_find_nothing() -> None:
    # Under the null each candidate refutes epsilon = 0 with probability <= 5% / G, so all of
    # them together at most 5% of seeds; seed fixed, the test is deterministic.
    rng = np.random.default_rng(1)

    audit = one_run_audit(rng.normal(size=1000), rng.random(1000) < 0.5, delta=1e-5)

    assert audit.epsilon_lower_bound == 0.0


def test_guesses_count_top_in_and_bottom_out() -> None:
    # scores 0..9; included canaries 9, 8 and 0: top 2 in (9, 8: right), bottom 2 out (0: wrong, 1: right).
    included = np.zeros(10, dtype=bool)
    included[[9, 8, 0]] = True

    audit = one_run_audit(np.arange(10.0), included, delta=0.0, guess_sizes=[2])

    assert (audit.best.guesses, audit.best.correct) == (4, 3)


def test_bad_inputs_are_refused_with_the_values() -> None:
    with pytest.raises(ValueError, match="v=5, r=4"):
        one_run_p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="guess sizes"):
        one_run_audit(np.arange(10.0), np.arange(10) % 2 == 0, delta=0.0, guess_sizes=[6])
    with pytest.raises(ValueError, match="not finite"):
        one_run_audit([0.0, float("nan")], [True, False], delta=0.0)


# ------------------------------------------------------------------------------- the canaries
def test_included_and_excluded_canaries_come_from_the_same_distribution() -> None:
    from fedtune.canary_audit import make_canaries

    # Prepare / Execute
    canaries = make_canaries(4000, ["a", "b", "c"], seed=5)
    inc = np.array([c.included for c in canaries])
    labels = np.array([c.label for c in canaries])
    lengths = np.array([len(c.text) for c in canaries])

    # Assert: inclusion is Bernoulli(1/2) (the count's two-sided binomial p-value), and independent of
    # the label (chi-square) and of the text's length (Kolmogorov-Smirnov). Each test at 0.1%: with the
    # seed fixed the test is deterministic; a broken draw (e.g. the first half included) fails all three.
    assert stats.binomtest(int(inc.sum()), inc.size, 0.5).pvalue > 1e-3
    table = [[int(np.sum((labels == lab) & inc)), int(np.sum((labels == lab) & ~inc))] for lab in ("a", "b", "c")]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert stats.ks_2samp(lengths[inc], lengths[~inc]).pvalue > 1e-3
    # Not ordered: the first and second halves hold about as many included canaries.
    assert abs(int(inc[:2000].sum()) - int(inc[2000:].sum())) < 4 * np.sqrt(2000)
    assert len({c.text for c in canaries}) == 4000, "every canary is a distinct text"


# ------------------------------------------------------------------------- the bound's check
def _result(dp: bool, epsilon: float | None, bound_scores: np.ndarray, included: np.ndarray):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from fedtune.canary_audit import CanaryAuditResult

    audit = one_run_audit(bound_scores, included, delta=1e-5)
    return CanaryAuditResult(run_dir=Path("run"), site="site-0", dp=dp, epsilon=epsilon, delta=1e-5, black_box=audit, white_box=None)


def test_a_dp_run_whose_lower_bound_exceeds_its_epsilon_fails_loudly() -> None:
    from fedtune.canary_audit import AuditBoundExceeded, check_bound

    # Prepare: perfect guesses on 1000 canaries refute epsilon ~5; the "run" claims epsilon 1.
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    leaky = _result(True, 1.0, included + rng.normal(0, 0.01, 1000), included)

    with pytest.raises(AuditBoundExceeded, match=r"exceeds site-0's epsilon 1\.000"):
        check_bound(leaky)
    check_bound(_result(True, 50.0, included + rng.normal(0, 0.01, 1000), included))  # within its epsilon: passes
    check_bound(_result(False, None, included + rng.normal(0, 0.01, 1000), included))  # no DP: nothing to exceed


def test_canaries_are_refused_outside_a_classification_simulation() -> None:
    from fedtune.common.config import from_dict
    from fedtune.common.errors import ConfigError

    with pytest.raises(ConfigError, match="data.canaries = 'c.csv' applies to classification simulations only"):
        from_dict({"data": {"canaries": "c.csv"}, "simulation": False})
    with pytest.raises(ConfigError, match=r"data.canary_site must name a simulated site in \[0, 2\], got 3"):
        from_dict({"data": {"canaries": "c.csv", "canary_site": 3}, "federation": {"sites": 3}})

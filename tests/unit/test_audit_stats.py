"""Clopper-Pearson intervals, the ROC curve and the low-FPR reporting rule, against independent oracles.

Oracles: scipy's ``binomtest(...).proportion_ci(method="exact")``, a brute-force threshold sweep, and
scikit-learn's ``roc_curve`` where it is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedtune.audit_stats import clopper_pearson, non_members_needed, roc_curve


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (3, 10), (1, 1000), (512, 1000), (999, 1000), (7, 31)])
@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_clopper_pearson_matches_scipy_exact(k: int, n: int, confidence: float) -> None:
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")

    got = clopper_pearson(k, n, confidence=confidence)

    assert got.low == pytest.approx(expected.low, abs=1e-12)
    assert got.high == pytest.approx(expected.high, abs=1e-12)


def test_clopper_pearson_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="11 of 10"):
        clopper_pearson(11, 10)


def test_non_members_needed_is_ten_false_positives_worth() -> None:
    assert non_members_needed(0.01) == 1000
    assert non_members_needed(0.001) == 10000
    assert non_members_needed(0.05) == 200


def _sweep(pos: np.ndarray, neg: np.ndarray) -> set[tuple[float, float]]:
    points = {(0.0, 0.0)}
    for t in np.concatenate([pos, neg]):
        points.add((float(np.mean(neg >= t)), float(np.mean(pos >= t))))
    return points


def test_roc_curve_holds_every_threshold_point() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 30, 80).astype(float), rng.integers(0, 25, 120).astype(float)

    curve = roc_curve(pos, neg)

    assert set(zip(curve.fpr.tolist(), curve.tpr.tolist())) == _sweep(pos, neg)
    assert curve.fpr[-1] == 1.0 and curve.tpr[-1] == 1.0
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)


def test_roc_curve_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400)

    curve = roc_curve(pos, neg)

    fpr, tpr, _ = metrics.roc_curve(np.r_[np.ones(300), np.zeros(400)], np.r_[pos, neg], drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-12)


# ------------------------------------------------------------- membership inference at low FPR
def test_tpr_at_low_fpr_is_not_reported_without_ten_false_positives_worth_of_non_members() -> None:
    from fedtune.audit import membership_scores

    rng = np.random.default_rng(2)
    result = membership_scores(rng.normal(0, 1, 500), rng.normal(0.5, 1, 999), resamples=20)

    by_fpr = {row.fpr: row for row in result.low_fpr}
    assert not by_fpr[0.01].reported and by_fpr[0.01].non_members_needed == 1000 and by_fpr[0.01].tpr is None
    assert not by_fpr[0.001].reported and by_fpr[0.001].non_members_needed == 10000
    assert result.to_json()["tpr_at_fpr"][1]["tpr"] is None


def test_tpr_at_low_fpr_counts_and_intervals_match_a_direct_count_and_scipy() -> None:
    from fedtune.audit import tpr_at_low_fpr

    # Prepare: 2000 non-members, so 1% FPR allows 20 of them above the threshold.
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1.0, 1, 700), rng.normal(0, 1, 2000)

    row = tpr_at_low_fpr(pos, neg, 0.01)

    threshold = np.sort(neg)[-21]  # the 21st largest: 20 non-members strictly above it
    tp = int(np.sum(pos > threshold))
    assert row.reported and row.false_positives == 20 and row.true_positives == tp
    assert row.tpr == pytest.approx(tp / 700)
    ci = stats.binomtest(tp, 700).proportion_ci(method="exact")
    assert row.tpr_ci == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert row.fpr_ci is not None and row.fpr_ci[0] < 0.01 < row.fpr_ci[1]


def test_roc_plot_is_written_as_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.audit import plot_roc

    rng = np.random.default_rng(4)

    path = plot_roc(rng.normal(1, 1, 200), rng.normal(0, 1, 300), tmp_path / "roc.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

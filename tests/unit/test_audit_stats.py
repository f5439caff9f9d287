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

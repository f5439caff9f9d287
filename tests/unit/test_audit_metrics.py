"""Membership-inference metrics: AUC, TPR at low FPR and bootstrap intervals, against independent oracles.

The oracles are brute force over all (member, non-member) pairs and over all thresholds, plus
scikit-learn's ``roc_auc_score`` where it is installed; never the implementation's own formula.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedtune.audit import auc, bootstrap_ci, membership_scores, tpr_at_fpr
from fedtune.cli.privacy import audit
from fedtune.common.errors import DataError


def _pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(member scores higher) + 1/2 P(tie), over every pair."""
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def _threshold_sweep_tpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """Best TPR of any rule ``score > t`` with FPR <= fpr, trying every distinct score and -inf as t."""
    best = 0.0
    for t in np.concatenate([[-np.inf], pos, neg]):
        if np.mean(neg > t) <= fpr + 1e-12:
            best = max(best, float(np.mean(pos > t)))
    return best


# ---------------------------------------------------------------------------------------- AUC
def test_auc_matches_pairwise_count_with_many_ties() -> None:
    # Prepare: integer scores in a small range, so most pairs tie.
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 6, 137).astype(float), rng.integers(0, 5, 211).astype(float)

    # Execute
    value = auc(pos, neg)

    # Assert
    assert value == pytest.approx(_pairwise_auc(pos, neg), abs=1e-12)


def test_auc_of_a_hand_worked_case_counts_ties_half() -> None:
    # Pairs (3,1) (3,2) (2,1) win, (2,2) ties: (3 + 0.5) / 4.
    assert auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)


def test_auc_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    pos, neg = np.round(rng.normal(0.3, 1, 400), 1), np.round(rng.normal(0, 1, 300), 1)

    value = auc(pos, neg)

    expected = metrics.roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg])
    assert value == pytest.approx(expected, abs=1e-12)


def test_perfect_separation_gives_one_and_reversed_gives_zero() -> None:
    members, non_members = np.arange(50, 100.0), np.arange(0, 50.0)

    assert auc(members, non_members) == 1.0
    assert auc(non_members, members) == 0.0


def test_all_scores_tied_gives_exactly_one_half() -> None:
    assert auc(np.zeros(30), np.zeros(70)) == 0.5


def test_identical_distributions_give_one_half_within_sampling_error() -> None:
    # Prepare: same distribution on both sides. Under this null, AUC has standard deviation
    # sqrt((n1 + n0 + 1) / (12 n1 n0)) (Mann-Whitney); 5 standard deviations fail about once in
    # 1.7 million seeds (the seed is fixed, so the test is deterministic).
    rng = np.random.default_rng(3)
    n1, n0 = 2000, 1500
    pos, neg = rng.normal(size=n1), rng.normal(size=n0)

    value = auc(pos, neg)

    sd = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    assert abs(value - 0.5) < 5 * sd


def test_empty_or_non_finite_scores_are_refused_by_name() -> None:
    with pytest.raises(DataError, match="member scores is empty"):
        auc([], [1.0])
    with pytest.raises(DataError, match="non-member scores is empty"):
        auc([1.0], [])
    with pytest.raises(DataError, match="non-finite"):
        auc([1.0, float("nan")], [0.0])


# -------------------------------------------------------------------------------- TPR at FPR
def test_tpr_at_1pct_fpr_allows_exactly_one_false_positive_in_100() -> None:
    # Prepare: non-members 0..99; at 1% FPR one of them (99) may be flagged, so the threshold is 98.
    non_members = np.arange(100.0)
    members = np.array([99.5, 98.5, 98.0, 50.0])

    value = tpr_at_fpr(members, non_members, 0.01)

    # 99.5 and 98.5 are above 98; 98.0 ties the threshold and is not flagged.
    assert value == pytest.approx(2 / 4)


def test_tpr_with_fewer_than_100_non_members_is_tpr_at_zero_fpr() -> None:
    non_members = np.arange(99.0)  # max 98
    members = np.array([98.5, 98.0, 97.0])

    assert tpr_at_fpr(members, non_members, 0.01) == pytest.approx(1 / 3)


def test_tpr_at_fpr_edges() -> None:
    members, non_members = np.array([1.0, 2.0]), np.array([0.0, 3.0])

    assert tpr_at_fpr(members, non_members, 1.0) == 1.0
    assert tpr_at_fpr(members, non_members, 0.0) == 0.0  # nothing beats the top non-member
    with pytest.raises(ValueError, match="fpr must be in"):
        tpr_at_fpr(members, non_members, 1.5)


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.29, 0.5])
def test_tpr_at_fpr_matches_a_sweep_over_every_threshold(fpr: float) -> None:
    rng = np.random.default_rng(4)
    pos, neg = rng.integers(0, 40, 250).astype(float), rng.integers(0, 35, 300).astype(float)

    value = tpr_at_fpr(pos, neg, fpr)

    assert value == pytest.approx(_threshold_sweep_tpr(pos, neg, fpr))


# ---------------------------------------------------------------------------------- bootstrap
def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.5, 1, n), rng.normal(0, 1, n)


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    pos, neg = _shifted(300, 5)

    for statistic in (auc, lambda a, b: tpr_at_fpr(a, b, 0.01)):
        est = bootstrap_ci(statistic, pos, neg, resamples=300, seed=0)
        assert est.value == pytest.approx(statistic(pos, neg))
        assert est.ci_low <= est.value <= est.ci_high
        assert est.ci_low < est.ci_high


def test_bootstrap_interval_narrows_with_more_examples() -> None:
    # Width shrinks like 1/sqrt(n): 20x the data should give about 4.5x narrower; ask for 2x.
    small = bootstrap_ci(auc, *_shifted(100, 6), resamples=300, seed=0)
    large = bootstrap_ci(auc, *_shifted(2000, 6), resamples=300, seed=0)

    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    pos, neg = _shifted(200, 7)

    first = bootstrap_ci(auc, pos, neg, resamples=200, seed=11)
    again = bootstrap_ci(auc, pos, neg, resamples=200, seed=11)
    other = bootstrap_ci(auc, pos, neg, resamples=200, seed=12)

    assert first == again
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)


def test_lower_loss_on_members_reads_as_membership() -> None:
    # score = -loss: members the model fits better (lower loss) must push AUC towards 1, not 0.
    result = membership_scores([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], resamples=50)

    assert result.auc.value == 1.0
    assert result.members == 3 and result.non_members == 3
    assert result.to_json()["auc"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert "Yeom" in result.method and "bootstrap" in result.method


# ------------------------------------------------------------------------------ CLI errors
def test_audit_without_an_adapter_folder_says_so_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\n")

    result = CliRunner().invoke(audit, [str(tmp_path / "run"), "--members", str(data), "--non-members", str(data)])

    assert result.exit_code == 2
    assert "adapter" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("side", ["--members", "--non-members"])
def test_audit_names_the_flag_of_a_missing_or_empty_file(tmp_path: Path, side: str) -> None:
    # Prepare: a run folder with an adapter/ (never loaded: the data is checked first).
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    good, empty = tmp_path / "good.csv", tmp_path / "empty.csv"
    good.write_text("text,label\nsome note,x\n")
    empty.write_text("text,label\n")
    missing = tmp_path / "missing.csv"

    for bad, words in ((missing, "no such file"), (empty, "no data rows")):
        args = {"--members": str(good), "--non-members": str(good), side: str(bad)}
        result = CliRunner().invoke(audit, [str(tmp_path / "run"), *[x for kv in args.items() for x in kv]])

        assert result.exit_code == 2
        assert f"{side}: {bad}" in result.output and words in result.output

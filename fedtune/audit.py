"""Membership-inference audit of a trained adapter: the loss-threshold attack.

The attack (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", arXiv:1709.01604) scores each example by ``-loss``: a model tends to
have lower loss on the examples it was trained on. Given labeled *members* (training data) and
*non-members* (data the run never saw, from the same distribution), we report

- ROC AUC of the score, rank-based (the Mann-Whitney U statistic over n1 * n0 pairs, ties count
  half), with a 95% percentile bootstrap interval (members and non-members resampled independently,
  with replacement, seeded);
- TPR at 0.1% and 1% FPR (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
  arXiv:2112.03570): the fraction of members flagged by the strictest-enough threshold that flags
  at most that fraction of non-members, with exact Clopper-Pearson 95% intervals on the TPR and on
  the FPR reached. Reported only with at least 10 / FPR non-members (``audit_stats.non_members_needed``:
  1,000 at 1%, 10,000 at 0.1%), i.e. at least 10 false positives allowed; with fewer the threshold rests
  on the top one or two non-member scores and the figure is "n/a (needs N non-members)";
- the ROC curve on log-log axes (PNG), where the low-FPR region is visible.

Reading the figures. AUC 0.5 and TPR@1%FPR ~0.01 are what a coin flip achieves. Under
(epsilon, delta)-DP any attack satisfies TPR <= e^epsilon * FPR + delta (Kairouz et al. 2015), so a
measured TPR above that bound would contradict the guarantee. The converse does not hold: a weak
attack finding nothing is not a proof of privacy; it is a lower bound on leakage, not an upper one.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedtune.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
DEFAULT_FPRS = (0.001, 0.01)
ROC_FILE = "audit-roc.png"
Attack = Literal["loss", "rmia"]  # the membership attacks `fedtune audit --attack` runs
METHOD = (
    "loss-threshold membership inference (Yeom et al. 2018): score = -cross-entropy loss of the final "
    "global adapter on each labeled example; AUC is rank-based (Mann-Whitney U, ties count half), its "
    "{confidence:.0%} interval percentile bootstrap with {resamples} resamples, members and non-members "
    "resampled independently, seed {seed}; TPR at a given FPR uses the best threshold that flags at most that "
    "fraction of non-members (Carlini et al. 2022), with exact Clopper-Pearson intervals, and is reported only "
    "with at least {min_fp} / FPR non-members."
)


# ---------------------------------------------------------------------------- pure metrics
def _as_scores(scores: Any, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise DataError(f"{name} is empty; the attack needs at least one score on each side.")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} holds {int(np.sum(~np.isfinite(arr)))} non-finite score(s); every score must be finite.")
    return arr


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    counts = np.diff(np.r_[starts, values.size])
    mean_rank = starts + (counts + 1) / 2.0  # ranks starts+1 .. starts+count, averaged
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def auc(member_scores: Any, non_member_scores: Any) -> float:
    """ROC AUC of ``score`` for telling members (positives) from non-members.

    Equal to P(s_member > s_non_member) + 0.5 * P(equal) over all n1 * n0 pairs, computed from
    average ranks in O(n log n) (Mann-Whitney U / (n1 * n0)).

    Raises:
        DataError: either side empty or holding a non-finite score.
    """
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(non_member_scores, "non-member scores")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    n1, n0 = pos.size, neg.size
    u = float(np.sum(ranks[:n1])) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def tpr_at_fpr(member_scores: Any, non_member_scores: Any, fpr: float = 0.01) -> float:
    """Largest TPR of a threshold rule ``score > t`` whose FPR on non-members is at most ``fpr``.

    With n0 non-members, at most k = floor(fpr * n0) of them may be flagged, so the threshold is the
    (k+1)-th largest non-member score and members must score strictly above it; tied members are
    not flagged (no randomised thresholds). With n0 < 1 / fpr this is the TPR at zero FPR.

    Raises:
        DataError: either side empty or holding a non-finite score.
        ValueError: ``fpr`` outside [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}.")
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(non_member_scores, "non-member scores")
    return float(np.mean(pos > _fpr_threshold(neg, fpr)))


def _fpr_threshold(neg: np.ndarray, fpr: float) -> float:
    """The (k+1)-th largest non-member score, k = floor(fpr * n0); -inf when every non-member may be flagged."""
    # The 1e-9 keeps a product like 0.29 * 100 = 28.999999999999996 from flooring to 28.
    k = int(math.floor(fpr * neg.size + 1e-9))
    return -math.inf if k >= neg.size else float(np.sort(neg)[::-1][k])


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    member_scores: Any,
    non_member_scores: Any,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """``statistic(members, non_members)`` and its percentile bootstrap interval.

    Each resample draws n1 members and n0 non-members with replacement, independently (the two
    sets are sampled separately, so their sizes are kept); the interval is the (1-c)/2 and
    (1+c)/2 quantiles of the resampled statistic (Efron and Tibshirani 1993, ch. 13).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(non_member_scores, "non-member scores")
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples, dtype=np.float64)
    for b in range(resamples):
        stats[b] = statistic(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
    low, high = np.quantile(stats, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return Estimate(value=float(statistic(pos, neg)), ci_low=float(low), ci_high=float(high))


@dataclass(frozen=True)
class LowFprTpr:
    """TPR at one target FPR, or why it is not reported.

    ``reported`` is False when there are fewer than ``non_members_needed`` non-members; the figures are
    then None. Otherwise ``tpr`` is ``true_positives / members`` at the threshold that flags
    ``false_positives`` <= floor(fpr * n0) non-members, with Clopper-Pearson intervals on both rates.
    """

    fpr: float
    non_members_needed: int
    reported: bool
    tpr: float | None = None
    tpr_ci: tuple[float, float] | None = None
    fpr_reached: float | None = None
    fpr_ci: tuple[float, float] | None = None
    true_positives: int | None = None
    false_positives: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = dict(vars(self))
        for key in ("tpr_ci", "fpr_ci"):
            out[key] = None if out[key] is None else list(out[key])
        return out


def tpr_at_low_fpr(member_scores: Any, non_member_scores: Any, fpr: float, *, confidence: float = DEFAULT_CONFIDENCE) -> LowFprTpr:
    """TPR at ``fpr`` (``tpr_at_fpr``'s threshold) with Clopper-Pearson intervals, if enough non-members."""
    from fedtune.audit_stats import clopper_pearson, non_members_needed

    pos = _as_scores(member_scores, "member scores")
    neg = _as_scores(non_member_scores, "non-member scores")
    needed = non_members_needed(fpr)
    if neg.size < needed:
        return LowFprTpr(fpr=fpr, non_members_needed=needed, reported=False)
    threshold = _fpr_threshold(neg, fpr)
    tp, fp = int(np.sum(pos > threshold)), int(np.sum(neg > threshold))
    t_ci, f_ci = clopper_pearson(tp, pos.size, confidence=confidence), clopper_pearson(fp, neg.size, confidence=confidence)
    return LowFprTpr(fpr=fpr, non_members_needed=needed, reported=True, tpr=tp / pos.size, tpr_ci=(t_ci.low, t_ci.high),
                     fpr_reached=fp / neg.size, fpr_ci=(f_ci.low, f_ci.high), true_positives=tp, false_positives=fp)


def plot_roc(member_scores: Any, non_member_scores: Any, path: Path, *, title: str = "Loss-threshold membership inference") -> Path:
    """The ROC curve on log-log axes (Carlini et al. 2022), with chance and the 0.1% and 1% FPR lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedtune.audit_stats import roc_curve
    from fedtune.common.io import atomic_write_bytes

    curve = roc_curve(member_scores, non_member_scores)
    n0 = np.asarray(non_member_scores).size
    floor = 0.5 / max(n0, 1)  # log axes cannot show 0: points at FPR 0 sit at half of the smallest rate measurable
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(np.maximum(curve.fpr, floor), np.maximum(curve.tpr, floor), drawstyle="steps-post", label="attack")
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    for fpr in DEFAULT_FPRS:
        ax.axvline(fpr, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel(f"false positive rate ({n0} non-members)")
    ax.set_ylabel(f"true positive rate ({np.asarray(member_scores).size} members)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------- the attack
@dataclass(frozen=True)
class AuditResult:
    auc: Estimate
    low_fpr: tuple[LowFprTpr, ...]
    members: int
    non_members: int
    method: str
    mean_loss_members: float
    mean_loss_non_members: float
    overlap: int
    roc_png: str | None = None
    attack: Attack = "loss"  # "rmia": fedtune/audit_rmia.py

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "auc": self.auc.to_json(),
            "tpr_at_fpr": [row.to_json() for row in self.low_fpr],
            "roc_png": self.roc_png,
            "members": self.members,
            "non_members": self.non_members,
            "method": self.method,
            "mean_loss_members": self.mean_loss_members,
            "mean_loss_non_members": self.mean_loss_non_members,
            "overlap": self.overlap,
        }


def membership_scores(
    member_losses: Any, non_member_losses: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE, overlap: int = 0, fprs: tuple[float, ...] = DEFAULT_FPRS,
    roc_png: Path | None = None,
) -> AuditResult:
    """The audit's figures from per-example losses (score = -loss); ``roc_png``: also draw the ROC there."""
    from fedtune.audit_stats import MIN_FALSE_POSITIVES

    pos = -_as_scores(member_losses, "member losses")
    neg = -_as_scores(non_member_losses, "non-member losses")
    return scored_result(pos, neg, method=METHOD.format(confidence=confidence, resamples=resamples, seed=seed, min_fp=MIN_FALSE_POSITIVES),
                         mean_losses=(float(-pos.mean()), float(-neg.mean())), resamples=resamples, seed=seed,
                         confidence=confidence, overlap=overlap, fprs=fprs, roc_png=roc_png)


def scored_result(
    pos: np.ndarray, neg: np.ndarray, *, method: str, mean_losses: tuple[float, float], resamples: int, seed: int,
    confidence: float = DEFAULT_CONFIDENCE, overlap: int = 0, fprs: tuple[float, ...] = DEFAULT_FPRS,
    roc_png: Path | None = None, attack: Attack = "loss", roc_title: str = "Loss-threshold membership inference",
) -> AuditResult:
    """Any attack's figures from its member and non-member scores (higher: more likely a member):
    bootstrap AUC, TPR at each of ``fprs`` with exact intervals, and the ROC drawn at ``roc_png``."""
    return AuditResult(
        auc=bootstrap_ci(auc, pos, neg, resamples=resamples, confidence=confidence, seed=seed),
        low_fpr=tuple(tpr_at_low_fpr(pos, neg, fpr, confidence=confidence) for fpr in fprs),
        members=int(pos.size),
        non_members=int(neg.size),
        method=method,
        mean_loss_members=mean_losses[0],
        mean_loss_non_members=mean_losses[1],
        overlap=overlap,
        roc_png=str(plot_roc(pos, neg, roc_png, title=roc_title)) if roc_png is not None else None,
        attack=attack,
    )


def per_example_losses(model: Any, dataset: Any, *, batch_size: int = 64) -> np.ndarray:
    """Cross-entropy loss of each example under ``model`` (eval mode, no gradients)."""
    from fedtune.common.tasks import score_examples

    return score_examples(model, dataset, batch_size=batch_size).losses


def _flagged(flag: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a DataError gets the flag it came from in front, so the user knows which file."""
    try:
        return fn()
    except DataError as err:
        raise DataError(f"{flag}: {err}") from None


def _subsample(table: Any, max_examples: int | None, seed: int) -> tuple[list[str], list[str]]:
    texts, labels = list(table.texts), list(table.labels)
    if max_examples is not None and len(texts) > max_examples:
        # A seeded sample, not the first N: files are often sorted by label or by source.
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_examples))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def run_audit(
    run_dir: Path,
    *,
    members: Path,
    non_members: Path,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    base_model: str | None = None,
    roc_png: Path | None = None,
) -> AuditResult:
    """Load ``RUN_DIR/adapter``, compute per-example losses on both sets, and score the attack.

    ``roc_png``: where to draw the log-scale ROC curve (None: not drawn).

    Raises:
        ConfigError: no ``RUN_DIR/adapter`` folder (or its base model), or a bad ``max_examples``.
        DataError: a missing or empty data file, or a label outside the run's label set, named with
            its flag (``--members`` / ``--non-members``).
    """
    from fedtune.common.data import check_labels, load_table

    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {max_examples}.")
    adapter_dir = Path(run_dir) / "adapter"
    if not adapter_dir.is_dir():
        raise ConfigError(f"{adapter_dir}: no such folder; RUN_DIR must be a finished run directory holding adapter/.")
    # Data first: a wrong path or an empty file should not wait for a model to load.
    paths = {"--members": Path(members), "--non-members": Path(non_members)}
    tables = {
        flag: _flagged(flag, lambda p=path: load_table(p, text_column=text_column, label_column=label_column))
        for flag, path in paths.items()
    }
    from fedtune.common.tasks import encode  # torch: only once the data is known good
    from fedtune.inference import load_adapter

    loaded = load_adapter(adapter_dir, base_model=base_model)
    sides = {}
    for flag, table in tables.items():
        _flagged(flag, lambda t=table: check_labels(t, loaded.labels))
        sides[flag] = _subsample(table, max_examples, seed)
    (m_texts, m_labels), (n_texts, n_labels) = sides["--members"], sides["--non-members"]
    # Identical (text, label) rows on both sides make the attack look weaker than it is.
    overlap = len(set(zip(m_texts, m_labels)) & set(zip(n_texts, n_labels)))
    if overlap:
        logger.warning("%d distinct (text, label) rows appear in both --members and --non-members.", overlap)
    losses = {}
    for flag, (texts, labs) in sides.items():
        dataset = encode(loaded.tokenizer, texts, labs, loaded.labels, max_length=loaded.max_length)
        losses[flag] = per_example_losses(loaded.model, dataset)
    logger.info("audit: %d members, %d non-members", len(m_texts), len(n_texts))
    return membership_scores(losses["--members"], losses["--non-members"], resamples=resamples, seed=seed, overlap=overlap,
                             roc_png=roc_png)

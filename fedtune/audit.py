"""Membership-inference audit of a trained adapter: the loss-threshold attack.

The attack (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", arXiv:1709.01604) scores each example by ``-loss``: a model tends to
have lower loss on the examples it was trained on. Given labeled *members* (training data) and
*non-members* (data the run never saw, from the same distribution), we report

- ROC AUC of the score, rank-based (the Mann-Whitney U statistic over n1 * n0 pairs, ties count
  half), and
- TPR at 1% FPR (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
  arXiv:2112.03570): the fraction of members flagged by the strictest-enough threshold that flags
  at most 1% of non-members,

each with a 95% percentile bootstrap interval (members and non-members resampled independently,
with replacement, seeded).

Reading the figures. AUC 0.5 and TPR@1%FPR ~0.01 are what a coin flip achieves. Under
(epsilon, delta)-DP any attack satisfies TPR <= e^epsilon * FPR + delta (Kairouz et al. 2015), so a
measured TPR above that bound would contradict the guarantee. The converse does not hold: a weak
attack finding nothing is not a proof of privacy; it is a lower bound on leakage, not an upper one.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
METHOD = (
    "loss-threshold membership inference (Yeom et al. 2018): score = -cross-entropy loss of the final "
    "global adapter on each labeled example; AUC is rank-based (Mann-Whitney U, ties count half); "
    "TPR at {fpr:.0%} FPR uses the best threshold that flags at most {fpr:.0%} of non-members "
    "(Carlini et al. 2022); {confidence:.0%} intervals are percentile bootstrap with {resamples} "
    "resamples, members and non-members resampled independently, seed {seed}."
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
    # The 1e-9 keeps a product like 0.29 * 100 = 28.999999999999996 from flooring to 28.
    k = int(math.floor(fpr * neg.size + 1e-9))
    if k >= neg.size:
        return 1.0
    threshold = np.sort(neg)[::-1][k]
    return float(np.mean(pos > threshold))


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


# ------------------------------------------------------------------------------- the attack
@dataclass(frozen=True)
class AuditResult:
    auc: Estimate
    tpr_at_1pct_fpr: Estimate
    members: int
    non_members: int
    method: str
    mean_loss_members: float
    mean_loss_non_members: float
    overlap: int

    def to_json(self) -> dict[str, Any]:
        return {
            "auc": self.auc.to_json(),
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr.to_json(),
            "members": self.members,
            "non_members": self.non_members,
            "method": self.method,
            "mean_loss_members": self.mean_loss_members,
            "mean_loss_non_members": self.mean_loss_non_members,
            "overlap": self.overlap,
        }


def membership_scores(
    member_losses: Any, non_member_losses: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE, overlap: int = 0,
) -> AuditResult:
    """The audit's figures from per-example losses (score = -loss)."""
    pos = -_as_scores(member_losses, "member losses")
    neg = -_as_scores(non_member_losses, "non-member losses")
    kw = {"resamples": resamples, "confidence": confidence, "seed": seed}
    return AuditResult(
        auc=bootstrap_ci(auc, pos, neg, **kw),
        tpr_at_1pct_fpr=bootstrap_ci(lambda a, b: tpr_at_fpr(a, b, 0.01), pos, neg, **kw),
        members=int(pos.size),
        non_members=int(neg.size),
        method=METHOD.format(fpr=0.01, confidence=confidence, resamples=resamples, seed=seed),
        mean_loss_members=float(-pos.mean()),
        mean_loss_non_members=float(-neg.mean()),
        overlap=overlap,
    )


def per_example_losses(model: Any, dataset: Any, *, batch_size: int = 64) -> np.ndarray:
    """Cross-entropy loss of each example under ``model`` (eval mode, no gradients)."""
    import torch
    from torch.utils.data import DataLoader

    from fedtune.common.tasks import forward_loss

    model.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            loss, _ = forward_loss(model, batch, reduction="none")
            out.append(loss.double().numpy())
    return np.concatenate(out) if out else np.empty(0)


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
) -> AuditResult:
    """Load ``RUN_DIR/adapter``, compute per-example losses on both sets, and score the attack.

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
    return membership_scores(losses["--members"], losses["--non-members"], resamples=resamples, seed=seed, overlap=overlap)

"""ROUGE-L (Lin 2004): how much of a reference a generated text recovers, in order.

For one pair, with LCS the length of the longest common subsequence of their tokens,
recall = LCS / len(reference), precision = LCS / len(prediction), and F = 2PR / (P + R) (ROUGE's
F-measure with beta = 1). A corpus score is the mean of the per-pair scores, as Google's
``rouge-score`` aggregates them.

Tokens are as ``rouge-score``'s default tokenizer makes them (lower case, runs of letters and
digits, everything else a separator, no stemming), with one difference: letters of any script count,
where ``rouge-score`` keeps only a-z and 0-9 and so scores a German or Greek summary on its digits
alone. On ASCII text the two agree (a test checks it against ``rouge-score``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"[^\W_]+")  # letters and digits of any script; '_' is punctuation here


@dataclass(frozen=True)
class RougeScore:
    """ROUGE-L of a prediction against its reference, each in [0, 1]."""

    precision: float
    recall: float
    f: float


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence: the classic dynamic programme, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> RougeScore:
    """ROUGE-L of one prediction; an empty prediction or reference scores 0."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    common = lcs_length(pred, ref)
    precision, recall = common / len(pred), common / len(ref)
    f = 0.0 if common == 0 else 2 * precision * recall / (precision + recall)
    return RougeScore(precision, recall, f)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The mean ROUGE-L F over pairs (0 for no pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(rouge_l(p, r).f for p, r in zip(predictions, references)) / len(predictions)

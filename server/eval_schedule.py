"""When the coordinator tests the global adapter on the held-out split, and on which examples.

With 1,000 small sites and ~10 sampled per round, a round's training is short and the test on the
whole held-out split (thousands of examples through the model, every round) is most of its time.
``evaluation.every`` tests every k-th round only and ``evaluation.sample`` a fixed seeded sample;
the last round is tested on the whole split unless ``evaluation.final_full`` is false, so the
figure in summary.json is the full one by default, and marked when it is not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch.utils.data import TensorDataset

from fedtune.common.config import EvaluationConfig

from .rounds import TestScore

# A stream of its own, so the sample does not move with (or move) the split drawn from the same seed.
SAMPLE_STREAM = 0xE7A1


@dataclass(frozen=True, kw_only=True)
class EvalSchedule:
    """The test plan of one run: ``settings`` over a held-out split of ``test_size`` examples.

    ``seed``: the run's seed; the sample is drawn once from it and is the same in every round
    (round-to-round changes are then the model's, not the sample's).
    """

    settings: EvaluationConfig
    test_size: int
    num_rounds: int
    seed: int

    def tests(self, server_round: int) -> bool:
        """Whether round ``server_round`` is tested: every ``every``-th round, and always the last."""
        return server_round == self.num_rounds or server_round % self.settings.every == 0

    def sampled(self, server_round: int) -> bool:
        """Whether round ``server_round``'s test uses the sample rather than the whole split."""
        if self.settings.sample <= 0 or self.settings.sample >= self.test_size:
            return False  # a sample at least as large as the split is the split
        return not (server_round == self.num_rounds and self.settings.final_full)

    def sample_indices(self) -> np.ndarray:
        """The fixed sample: ``min(sample, test_size)`` distinct positions in the held-out split, ascending."""
        size = min(self.settings.sample, self.test_size) if self.settings.sample > 0 else self.test_size
        rng = np.random.default_rng((self.seed, SAMPLE_STREAM))
        return np.sort(rng.choice(self.test_size, size=size, replace=False))

    def describe(self) -> dict[str, Any]:
        """What summary.json states about the test figures (``final_sampled``: the summary's is a sample's).

        ``sample`` 0 and no ``sample_seed``: every tested round used the whole split, as it does when
        ``evaluation.sample`` is at least the split's size (such a sample is never drawn).
        """
        sample = self.settings.sample if 0 < self.settings.sample < self.test_size else 0
        return {
            "every": self.settings.every,
            "sample": sample,
            "test_examples": self.test_size,
            "final_full": self.settings.final_full,
            "final_sampled": self.sampled(self.num_rounds),
            "final_examples": sample if self.sampled(self.num_rounds) else self.test_size,
            "sample_seed": [self.seed, SAMPLE_STREAM] if sample else None,
        }


def subset(dataset: TensorDataset, indices: np.ndarray) -> TensorDataset:
    """The rows ``indices`` of an encoded split (classification or causal LM: both are TensorDatasets)."""
    index = torch.as_tensor(indices, dtype=torch.long)
    return TensorDataset(*(t[index] for t in dataset.tensors))


def scheduled_test(
    score: Callable[[ArrayRecord, TensorDataset], TestScore], full: TensorDataset, schedule: EvalSchedule,
) -> Callable[..., TestScore | None]:
    """``test(arrays, server_round=None)``: ``score`` on the split ``schedule`` picks for the round.

    None for a round the schedule leaves untested; a sampled round's score says ``sampled``. Called
    without a round (an adapter before any training) it scores the whole split.
    """
    # A sample at least as large as the split is never used (``sampled``): no copy of the whole split.
    sample = subset(full, schedule.sample_indices()) if 0 < schedule.settings.sample < schedule.test_size else full

    def test(arrays: ArrayRecord, server_round: int | None = None) -> TestScore | None:
        if server_round is None:
            return score(arrays, full)
        if not schedule.tests(server_round):
            return None
        if schedule.sampled(server_round):
            return dataclasses.replace(score(arrays, sample), sampled=True)
        return score(arrays, full)

    return test

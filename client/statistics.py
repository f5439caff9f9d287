"""Validation statistics a site releases: under DP, in the clear by its operator's opt-in, or not at all.

The DP release is the Gaussian mechanism (Dwork & Roth 2014, Thm A.1; accounted in RDP as
Mironov 2017, Prop. 7) on three sums over the site's validation records:

    v = (correct, count, loss_sum / L),  each example's loss clipped to [0, L].

Adding or removing one record moves each coordinate by at most 1, so v has L2 sensitivity
Delta = sqrt(3). Each coordinate gets N(0, (z_s * Delta)^2), i.e. noise multiplier z_s on the
whole vector, charged to the ledger *before* the model is evaluated, as one step at q = 1 on the
validation records (``Segment(sample_rate=1, noise_multiplier=z_s, steps=1)``). Accuracy, mean
loss and the example count are post-processing of the noisy sums.

Macro-F1 needs per-class counts (a K x K histogram, K^2 noisy cells); it is released only in the
clear. Training statistics (loss, clipped fraction, seconds) likewise.

A causal LM has no accuracy: its release is the same mechanism on two sums,

    v = (count, loss_sum / L),  each example's mean response-token loss clipped to [0, L],

so Delta = sqrt(2), each coordinate gets N(0, (z_s * Delta)^2), and the charge is the same one
step at q = 1 with noise multiplier z_s (the Gaussian mechanism's privacy depends on the ratio of
its noise to its sensitivity only). Its released loss is the mean over examples of each example's
mean response loss (in the clear too, so both modes report one quantity); exp of it is a
perplexity-like figure, not the token-weighted perplexity the coordinator's test split reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.accounting import Segment
from fedtune.common.errors import PolicyRefusal, PrivacyBudgetError
from fedtune.common.messages import RefusalCode, ValidationStats
from fedtune.common.tasks import evaluate, forward_loss

from .ledger import PrivacyLedger
from .policy import SitePolicy

SENSITIVITY = math.sqrt(3.0)
LM_SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True, kw_only=True)
class ReleaseContext:
    """Where a statistics release is charged: the site's ledger, its validation records, its guarantee."""

    ledger: PrivacyLedger
    records: list[str]  # the validation records this release is computed on
    all_records: list[str]  # every record of the site: the epsilon reported is the max over them
    run: str
    round: int
    delta: float
    budget_epsilon: float
    accountant: str


@torch.no_grad()
def validation_sums(model: torch.nn.Module, dataset: TensorDataset, *, loss_bound: float, batch_size: int = 64) -> tuple[float, int, float]:
    """(correct, count, sum of per-example losses clipped to [0, loss_bound]) over ``dataset``."""
    was_training = model.training
    model.eval()
    correct, count, loss_sum = 0.0, 0, 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        losses, logits = forward_loss(model, batch, reduction="none")
        correct += float((logits.argmax(dim=-1) == batch[2]).sum())
        count += len(batch[2])
        loss_sum += float(losses.clamp(0.0, loss_bound).sum())
    model.train(was_training)
    return correct, count, loss_sum


def noisy_validation(
    correct: float, count: int, loss_sum: float, *, noise_multiplier: float, loss_bound: float, rng: np.random.Generator
) -> ValidationStats:
    """The Gaussian mechanism on (correct, count, loss_sum / L); ``noise_std`` is the std added to each."""
    std = noise_multiplier * SENSITIVITY
    noisy_correct, noisy_count, noisy_scaled_loss = np.array([correct, count, loss_sum / loss_bound]) + rng.normal(0.0, std, size=3)
    denominator = max(float(noisy_count), 1.0)
    return ValidationStats(
        mode="dp",
        examples=float(noisy_count),
        accuracy=float(np.clip(noisy_correct / denominator, 0.0, 1.0)),
        loss=float(np.clip(noisy_scaled_loss * loss_bound / denominator, 0.0, loss_bound)),
        noise_std=std,
    )


def release_validation(
    model: torch.nn.Module,
    dataset: TensorDataset,
    num_labels: int,
    *,
    policy: SitePolicy,
    charge: ReleaseContext,
    rng: np.random.Generator,
    required: bool,
    causal_lm: bool = False,
) -> ValidationStats | None:
    """Validation statistics as ``policy.statistics`` allows (``causal_lm``: a causal LM's, without accuracy).

    ``required`` (an evaluate message): a policy of 'none' or an exhausted budget refuses the
    message. Otherwise (validation piggybacked on a train message) they are simply left out.
    """
    mode = policy.statistics
    if mode == "none":
        if required:
            raise PolicyRefusal(RefusalCode.STATISTICS, "an evaluate message asks for validation statistics; "
                                "this site's policy releases none (policy.statistics = 'none').")
        return None
    if len(dataset) == 0:
        if required:
            raise PolicyRefusal(RefusalCode.NO_VALIDATION_DATA, "this site has no validation examples ([data] val_fraction is 0).")
        return None
    if mode == "clear" and causal_lm:
        count, loss_sum = lm_validation_sums(model, dataset, loss_bound=math.inf)
        return ValidationStats(mode="clear", examples=float(count), loss=loss_sum / max(count, 1), accuracy=None)
    if mode == "clear":
        result = evaluate(model, dataset, num_labels)
        return ValidationStats(mode="clear", examples=float(result.examples), loss=result.loss, accuracy=result.accuracy,
                               macro_f1=result.macro_f1)
    z = policy.statistics_noise_multiplier
    try:
        # Charged first: once the model has looked at the records, the release counts as made.
        epsilon = charge.ledger.charge(
            charge.records, run=charge.run, round=charge.round, kind="statistics",
            segment=Segment(sample_rate=1.0, noise_multiplier=z, steps=1), clip_norm=0.0,
            delta=charge.delta, budget_epsilon=charge.budget_epsilon, accountant=charge.accountant,
        )
    except PrivacyBudgetError:
        if required:
            raise
        return None
    epsilon = max(epsilon, charge.ledger.spent_epsilon(charge.all_records, delta=charge.delta))
    if causal_lm:
        count, loss_sum = lm_validation_sums(model, dataset, loss_bound=policy.statistics_loss_bound)
        stats = noisy_lm_validation(count, loss_sum, noise_multiplier=z, loss_bound=policy.statistics_loss_bound, rng=rng)
        return dataclasses.replace(stats, epsilon=epsilon)
    correct, count, loss_sum = validation_sums(model, dataset, loss_bound=policy.statistics_loss_bound)
    stats = noisy_validation(correct, count, loss_sum, noise_multiplier=z, loss_bound=policy.statistics_loss_bound, rng=rng)
    return dataclasses.replace(stats, epsilon=epsilon)


@torch.no_grad()
def lm_validation_sums(model: torch.nn.Module, dataset: TensorDataset, *, loss_bound: float, batch_size: int = 16) -> tuple[int, float]:
    """(count, sum of per-example mean response losses clipped to [0, loss_bound]) over ``dataset``."""
    from fedtune.common.causal_lm import lm_loss

    was_training = model.training
    model.eval()
    count, loss_sum = 0, 0.0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            losses = lm_loss(model, batch, reduction="none")
            count += len(losses)
            loss_sum += float(losses.clamp(0.0, loss_bound).sum())
    finally:
        model.train(was_training)
    return count, loss_sum


def noisy_lm_validation(count: int, loss_sum: float, *, noise_multiplier: float, loss_bound: float, rng: np.random.Generator) -> ValidationStats:
    """The Gaussian mechanism on (count, loss_sum / L): a causal LM's release (no accuracy)."""
    std = noise_multiplier * LM_SENSITIVITY
    noisy_count, noisy_scaled_loss = np.array([count, loss_sum / loss_bound]) + rng.normal(0.0, std, size=2)
    denominator = max(float(noisy_count), 1.0)
    return ValidationStats(
        mode="dp",
        examples=float(noisy_count),
        accuracy=None,
        loss=float(np.clip(noisy_scaled_loss * loss_bound / denominator, 0.0, loss_bound)),
        noise_std=std,
    )


def noise_generator(seed: int | None) -> np.random.Generator:
    """Seeded in simulation (reproducible); from the OS's CSPRNG on a deployed site."""
    if seed is None:
        import secrets

        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng(seed)

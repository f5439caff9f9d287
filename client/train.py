"""Local training at a site: DP-SGD with Opacus (Abadi et al. 2016, arXiv:1607.00133).

Each logical step draws a Poisson sample (every example independently with probability q),
clips each example's gradient to norm C, adds Gaussian noise of std z*C to the sum, and divides
by the expected batch size q*n. Logical batches are processed in bounded physical batches
(Opacus's BatchMemoryManager), so a large, DP-friendly q does not cost memory.

The privacy *accounting* does not live here: the site's persistent ledger records every step
(see ``ledger.py``); a per-round PrivacyEngine would restart its epsilon at zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.common.config import TrainConfig
from fedtune.common.errors import ConfigError
from fedtune.common.tasks import forward_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """How many logical steps to take and at what Poisson rate: q = batch_size / n, T = epochs / q."""

    sample_rate: float
    steps: int

    @classmethod
    def for_dataset(cls, n: int, train: TrainConfig) -> "StepPlan":
        q = min(1.0, train.batch_size / n)
        return cls(sample_rate=q, steps=max(1, round(train.local_epochs / q)))


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """The DP-SGD mechanism: noise multiplier z and clip norm C."""

    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    loss: float
    steps: int
    examples_seen: int
    clipped_fraction: float
    seconds: float


def _poisson_batches(n: int, plan: StepPlan, generator: torch.Generator):  # type: ignore[no-untyped-def]
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return UniformWithReplacementSampler(
        num_samples=n, sample_rate=plan.sample_rate, generator=generator, steps=plan.steps
    )


def train_local(
    model: torch.nn.Module,
    dataset: TensorDataset,
    *,
    train: TrainConfig,
    plan: StepPlan,
    dp: DPSettings | None,
    seed: int | None,
    learning_rate: float | None = None,
) -> TrainResult:
    """Run ``plan.steps`` logical steps on ``dataset``; with ``dp`` they are DP-SGD steps.

    Both paths draw the same Poisson batches from ``seed`` and normalise by the expected batch
    size q*n, so DP with z=0 and a clip norm that never binds equals plain training.

    ``seed=None`` is production mode (deployed sites): every generator (Poisson sampling, noise,
    dropout) is seeded from the operating system's CSPRNG (``secrets``) for this call, and Opacus's
    ``secure_mode`` sums 2n Gaussian draws per coordinate against floating-point attacks (Holohan
    et al. 2021, arXiv:2107.10138). The generators themselves are PyTorch's Mersenne Twister, not
    a CSPRNG (torchcsprng does not build for current PyTorch): an attacker would have to recover
    an unobserved 19937-bit state from noised outputs. Simulations pass a seed, for reproducibility.
    """
    secure = seed is None
    if seed is None:
        import secrets

        seed = secrets.randbits(62)
    torch.manual_seed(seed)  # dropout
    sampler_rng = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = learning_rate or train.learning_rate
    if lr <= 0:
        raise ConfigError(f"train.learning_rate must be > 0 here, got {lr}.")
    optimizer: torch.optim.Optimizer
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    expected_batch = max(1, round(plan.sample_rate * len(dataset)))
    model.train()
    start = time.perf_counter()
    if dp is None:
        loss, seen = _train_plain(model, dataset, optimizer, plan, sampler_rng, train.physical_batch_size, expected_batch)
        clipped = 0.0
    else:
        loss, seen, clipped = _train_dp(
            model, dataset, optimizer, plan, sampler_rng, train.physical_batch_size, expected_batch, dp, seed, secure
        )
    return TrainResult(
        loss=loss, steps=plan.steps, examples_seen=seen, clipped_fraction=clipped, seconds=time.perf_counter() - start
    )


def _train_plain(model, dataset, optimizer, plan, rng, physical, expected_batch):  # type: ignore[no-untyped-def]
    total_loss, seen = 0.0, 0
    for indices in _poisson_batches(len(dataset), plan, rng):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(indices), physical):
            chunk = indices[start : start + physical]
            batch = dataset[chunk]
            loss_sum, _ = forward_loss(model, batch, reduction="sum")
            (loss_sum / expected_batch).backward()
            total_loss += float(loss_sum.detach())
            seen += len(chunk)
        optimizer.step()
    return total_loss / max(seen, 1), seen


def _train_dp(model, dataset, optimizer, plan, rng, physical, expected_batch, dp, seed, secure):  # type: ignore[no-untyped-def]
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    gs_model = GradSampleModule(model, loss_reduction="mean")
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed + 1),
        secure_mode=secure,
    )
    loader = DataLoader(dataset, batch_sampler=_poisson_batches(len(dataset), plan, rng))
    total_loss, seen, clipped = 0.0, 0, 0
    try:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=dp_optimizer) as batches:
            for batch in batches:
                dp_optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch (probability (1-q)^n, ~0 for real sites) still takes the
                # step: Opacus then applies no update, and the step is still counted as spent.
                if len(batch[2]) > 0:
                    loss, _ = forward_loss(gs_model, batch)
                    loss.backward()
                    total_loss += float(loss.detach()) * len(batch[2])
                    seen += len(batch[2])
                    clipped += _count_clipped(dp_optimizer, dp.clip_norm)
                dp_optimizer.step()
    finally:
        gs_model.to_standard_module()  # removes Opacus's hooks and per-example grads
    return total_loss / max(seen, 1), seen, clipped / max(seen, 1)


def _count_clipped(optimizer, clip_norm: float) -> int:  # type: ignore[no-untyped-def]
    """Examples whose full per-example gradient norm exceeds C in the current physical batch."""
    per_param = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=1) for p in optimizer.params if p.grad_sample is not None]
    if not per_param:
        return 0
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    return int((norms > clip_norm).sum())

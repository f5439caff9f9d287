"""Local training at a site: DP-SGD with Opacus (Abadi et al. 2016, arXiv:1607.00133).

Each logical step draws a Poisson sample (every example independently with probability q),
clips each example's gradient to norm C, adds Gaussian noise of std z*C to the sum, and divides
by the expected batch size q*n. Logical batches are processed in bounded physical batches (the
DPOptimizer's skip-step signals, as Opacus's BatchMemoryManager sends them), so a large,
DP-friendly q does not cost memory. An empty Poisson sample is still a step: noise only, as
Opacus's DPDataLoader makes it (opacus #806); the analysis assumes every one of the T steps
releases a noised sum, whichever examples it drew.

The privacy *accounting* does not live here: the site's persistent ledger records every step
(see ``ledger.py``); a per-round PrivacyEngine would restart its epsilon at zero.

FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127):
with ``train.proximal_mu`` = mu > 0 each example's loss becomes l_i(w) + (mu/2) ||w - w_g||^2,
over the trainable parameters, w_g the adapter received this round. Its gradient mu (w - w_g) is
the same for every example, and Opacus computes per-example gradients from hooks on the
per-example loss, where a parameter-only term never appears; so the DP path adds mu (w - w_g) to
every example's ``grad_sample`` after backward and before the DPOptimizer clips, once per example
per logical step: what is clipped to C is the whole per-example gradient g_i + mu (w - w_g). The
plain path adds (mu/2) ||w - w_g||^2 once per example to the summed loss, so both normalise by
q*n alike and DP with z = 0 and a clip that never binds still equals plain training. Privacy: the
term depends on no example (w_g came from the coordinator, w is the DP-SGD iterate, already a
post-processing of noised releases), each clipped per-example gradient still has norm <= C, so
the sensitivity, the noise and the ledger's charge are unchanged; it changes what is clipped (a
large mu (w - w_g) takes part of every example's budget C). An empty Poisson sample has no
examples and so no proximal term, in both paths.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from fedtune.common.config import TrainConfig
from fedtune.common.errors import ConfigError
from fedtune.common.tasks import LossFn, classification_loss

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


# Called after each logical step with its number (from 0) and its Poisson sample's example indices.
StepHook = Callable[[int, torch.Tensor], None]


def proximal_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """FedProx's w_g: a copy of the trainable parameters as they are now, by parameter name.

    Take it right after loading the adapter received this round, before any training.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# (parameter, its w_g) pairs in the optimizer's parameter order, and mu.
_Proximal = tuple[list[tuple[torch.nn.Parameter, torch.Tensor]], float]


def _proximal(model: torch.nn.Module, mu: float, reference: Mapping[str, torch.Tensor] | None) -> _Proximal | None:
    if mu == 0:
        return None
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if reference is None:
        raise ConfigError(f"train.proximal_mu = {mu:g} needs the reference weights w_g (the adapter received this round); none were given.")
    names = {name for name, _ in trainable}
    if set(reference) != names:
        missing, extra = sorted(names - set(reference)), sorted(set(reference) - names)
        raise ConfigError(f"FedProx reference weights must name the {len(names)} trainable parameters; "
                          f"missing: {missing[:5]}; unexpected: {extra[:5]}")
    pairs = []
    for name, p in trainable:
        ref = reference[name]
        if tuple(ref.shape) != tuple(p.shape):
            raise ConfigError(f"FedProx reference {name} has shape {tuple(ref.shape)}, the parameter {tuple(p.shape)}")
        pairs.append((p, ref.detach().to(device=p.device, dtype=p.dtype)))
    return pairs, mu


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    # The mean task loss of the examples seen (FedProx's proximal term not included).
    loss: float
    steps: int
    examples_seen: int
    clipped_fraction: float
    seconds: float


def _poisson_batches(n: int, plan: StepPlan, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``plan.steps`` Poisson samples of ``range(n)`` at rate q (Opacus's sampler), as index tensors."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    for indices in UniformWithReplacementSampler(num_samples=n, sample_rate=plan.sample_rate, generator=generator, steps=plan.steps):
        yield torch.as_tensor(indices, dtype=torch.long)


def _physical(indices: torch.Tensor, physical: int) -> list[torch.Tensor]:
    """A logical batch in near-equal chunks of at most ``physical`` examples (none when it is empty)."""
    if len(indices) == 0:
        return []
    return list(torch.tensor_split(indices, math.ceil(len(indices) / physical)))


def train_local(
    model: torch.nn.Module,
    dataset: TensorDataset,
    *,
    train: TrainConfig,
    plan: StepPlan,
    dp: DPSettings | None,
    seed: int | None,
    learning_rate: float | None = None,
    on_step: StepHook | None = None,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
    loss_fn: LossFn = classification_loss,
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

    ``on_step(t, indices)`` runs on the site after the update of logical step t (tests and
    diagnostics read the parameters there); nothing it sees leaves the site.

    ``proximal_reference`` is FedProx's w_g (see :func:`proximal_reference` and the module
    docstring), required when ``train.proximal_mu`` > 0 and unused when it is 0.

    ``loss_fn`` is the task's per-example loss (``common.tasks.task_loss``); sampling, clipping,
    noise and normalisation are the same for every task.
    """
    secure = seed is None
    if seed is None:
        import secrets

        seed = secrets.randbits(62)
    torch.manual_seed(seed)  # dropout
    sampler_rng = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    prox = _proximal(model, train.proximal_mu, proximal_reference)
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
        loss, seen = _train_plain(
            model, dataset, optimizer, plan, sampler_rng, train.physical_batch_size, expected_batch, on_step, prox, loss_fn
        )
        clipped = 0.0
    else:
        loss, seen, clipped = _train_dp(
            model, dataset, optimizer, plan, sampler_rng, train.physical_batch_size, expected_batch, dp, seed, secure, on_step, prox,
            loss_fn,
        )
    return TrainResult(
        loss=loss, steps=plan.steps, examples_seen=seen, clipped_fraction=clipped, seconds=time.perf_counter() - start
    )


def _train_plain(model, dataset, optimizer, plan, rng, physical, expected_batch, on_step, prox, loss_fn):  # type: ignore[no-untyped-def]
    total_loss, seen = 0.0, 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step, indices in enumerate(_poisson_batches(len(dataset), plan, rng)):
        # Zeros, not None: an empty sample still takes the optimizer's step (momentum, weight
        # decay), as the DP path does, so DP with z = 0 and no clipping equals this path.
        optimizer.zero_grad(set_to_none=False)
        for chunk in _physical(indices, physical):
            loss_sum = loss_fn(model, dataset[chunk], "sum")
            objective = loss_sum
            if prox is not None:  # (mu/2) ||w - w_g||^2 in each example's loss
                pairs, mu = prox
                objective = loss_sum + len(chunk) * (mu / 2) * sum(((p - ref) ** 2).sum() for p, ref in pairs)
            (objective / expected_batch).backward()
            total_loss += float(loss_sum.detach())
            seen += len(chunk)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        if on_step is not None:
            on_step(step, indices)
    return total_loss / max(seen, 1), seen


def _train_dp(  # type: ignore[no-untyped-def]
    model, dataset, optimizer, plan, rng, physical, expected_batch, dp, seed, secure, on_step, prox, loss_fn
):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

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
    total_loss, seen, clipped = 0.0, 0, 0
    try:
        for step, indices in enumerate(_poisson_batches(len(dataset), plan, rng)):
            chunks = _physical(indices, physical)
            if not chunks:
                # An empty Poisson sample (probability (1-q)^n) is a noise-only step: the
                # optimizer clips and sums no gradient and adds N(0, (zC)^2), as it would after
                # a backward pass over zero examples (Opacus's DPDataLoader feeds it one).
                dp_optimizer.zero_grad(set_to_none=True)
                for p in dp_optimizer.params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
                dp_optimizer.signal_skip_step(do_skip=False)
                dp_optimizer.step()
            for i, chunk in enumerate(chunks):
                dp_optimizer.zero_grad(set_to_none=True)  # keeps the logical batch's clipped sum until its last chunk
                loss = loss_fn(gs_model, dataset[chunk], "mean")
                loss.backward()
                if prox is not None:
                    _add_proximal_gradient(*prox)
                total_loss += float(loss.detach()) * len(chunk)
                seen += len(chunk)
                clipped += _count_clipped(dp_optimizer, dp.clip_norm)
                # Every chunk but the last only clips and accumulates; the last one adds the
                # noise once for the whole logical batch and updates the parameters.
                dp_optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
                dp_optimizer.step()
            if on_step is not None:
                on_step(step, indices)
    finally:
        gs_model.to_standard_module()  # removes Opacus's hooks and per-example grads
    return total_loss / max(seen, 1), seen, clipped / max(seen, 1)


@torch.no_grad()
def _add_proximal_gradient(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]], mu: float) -> None:
    """Add mu (w - w_g) to every example's per-example gradient, before the DPOptimizer clips it.

    Each example sits in exactly one physical batch of its logical step, and the parameters do not
    move between a logical step's physical batches, so every example gets the term once.
    """
    for p, ref in pairs:
        if getattr(p, "grad_sample", None) is None:
            raise RuntimeError(f"no per-example gradient for a trainable parameter of shape {tuple(p.shape)}: Opacus did not hook it")
        p.grad_sample += mu * (p - ref)  # broadcast over the batch dimension


def _count_clipped(optimizer, clip_norm: float) -> int:  # type: ignore[no-untyped-def]
    """Examples whose full per-example gradient norm exceeds C in the current physical batch."""
    per_param = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=1) for p in optimizer.params if p.grad_sample is not None]
    if not per_param:
        return 0
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    return int((norms > clip_norm).sum())

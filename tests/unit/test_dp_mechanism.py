"""DP-SGD's mechanism, checked directly on the real path (``train_local`` with real Opacus).

Each logical step t must update with g~_t = (sum over the Poisson sample B_t of clip_C(g_i) + N_t) / (q n),
N_t ~ N(0, (z C)^2 I) fresh at every step (Abadi et al. 2016, arXiv:1607.00133, Algorithm 1).

The model is one linear layer under cross-entropy, so every example's gradient has a closed form,
computed here in float64 without Opacus or autograd: dl/dW = (p - e_y) x^T, dl/db = p - e_y with
p = softmax(W x + b). ``on_step`` hands the test each step's Poisson sample and lets it read the
parameters after the update; the optimizer is ``train.optimizer = "sgd"`` (PyTorch SGD, momentum
0.9, no dampening, no weight decay), inverted exactly: with b_t = (theta_{t-1} - theta_t) / lr,
g~_1 = b_1 and g~_t = b_t - 0.9 b_{t-1}.

The residual r_t = g~_t - (sum of clipped gradients) / (q n) must then be N(0, sigma^2) per
coordinate with sigma = z C / (q n), independent across steps. Checks, each at false-failure rate
ALPHA = 1e-6 over D = 6004 coordinates:
  - variance: D s^2 / sigma^2 inside the two-sided chi-square(D) interval;
  - mean: |mean(r)| below the normal quantile times sigma / sqrt(D);
  - fresh noise: for each pair of steps, sum(r_t r_t') / (sigma^2 sqrt(D)) inside the normal
    interval (a repeated draw gives sqrt(D) = 77).
With T = 6 steps that is 6 + 6 + 15 = 27 checks, so by the union bound a correct mechanism fails
one run of a parametrisation with probability below 2.7e-5 (the seeded case is
deterministic: it either always passes or always fails; the production case draws fresh noise).
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from fedtune.client.train import DPSettings, StepPlan, train_local
from fedtune.common.config import TrainConfig

D_IN, K = 1500, 4
D = D_IN * K + K  # coordinates of the residual
N, Q, STEPS = 200, 0.12, 6  # expected batch q n = 24 exactly
EXPECTED_BATCH = N * Q
LR = 0.01
MOMENTUM = 0.9  # TrainConfig.optimizer = "sgd"
ALPHA = 1e-6
TRAIN = TrainConfig(batch_size=24, physical_batch_size=7, learning_rate=LR, optimizer="sgd", weight_decay=0.0)


class LinearClassifier(torch.nn.Module):
    """Logits = W x + b behind the Hugging Face call signature ``forward_loss`` uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(D_IN, K)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.fc(input_ids))


def _data(seed: int, *, small_fraction: float = 0.0) -> TensorDataset:
    """Features N(0, 1): every gradient norm is about 0.75 * sqrt(D_IN) ~ 29 > C, so clipping binds;
    ``small_fraction`` of the examples are shrunk so that their norms fall below C."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=gen)
    x[: int(small_fraction * N)] *= 0.01
    y = torch.randint(0, K, (N,), generator=gen)
    return TensorDataset(x, torch.ones(N, D_IN, dtype=torch.long), y)


def _flat(model: LinearClassifier) -> np.ndarray:
    return np.concatenate([model.fc.weight.detach().double().numpy().ravel(), model.fc.bias.detach().double().numpy()])


def _per_example_gradients(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form cross-entropy gradients of a linear layer, one row per example, laid out as _flat."""
    w, b = theta[: D_IN * K].reshape(K, D_IN), theta[D_IN * K :]
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    err = p - np.eye(K)[y]
    return np.concatenate([(err[:, :, None] * x[:, None, :]).reshape(len(x), -1), err], axis=1)


def _run(dataset: TensorDataset, *, dp: DPSettings | None, seed: int | None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Train for STEPS steps; per step: the noisy gradient g~_t, the parameters before it, its sample."""
    torch.manual_seed(0)
    model = LinearClassifier()
    thetas = [_flat(model)]
    samples: list[np.ndarray] = []

    def record(step: int, indices: torch.Tensor) -> None:
        assert step == len(samples)
        thetas.append(_flat(model))
        samples.append(indices.numpy().copy())

    result = train_local(model, dataset, train=TRAIN, plan=StepPlan(sample_rate=Q, steps=STEPS), dp=dp, seed=seed, on_step=record)
    assert result.steps == STEPS and len(samples) == STEPS
    velocities = [(before - after) / LR for before, after in zip(thetas, thetas[1:])]
    grads = [velocities[0]] + [v - MOMENTUM * prev for prev, v in zip(velocities, velocities[1:])]
    return grads, thetas[:-1], samples


def _clipped_sum(theta: np.ndarray, dataset: TensorDataset, sample: np.ndarray, clip: float | None) -> tuple[np.ndarray, np.ndarray]:
    x = dataset.tensors[0][sample].double().numpy()
    y = dataset.tensors[2][sample].numpy()
    g = _per_example_gradients(theta, x, y)
    norms = np.linalg.norm(g, axis=1)
    if clip is not None:
        g = g * np.minimum(1.0, clip / norms)[:, None]
    return g.sum(axis=0), norms


@pytest.mark.parametrize("seed", [1234, None], ids=["seeded", "production"])
def test_each_step_adds_fresh_gaussian_noise_of_std_z_c_over_the_expected_batch(seed: int | None) -> None:
    z, clip = 1.3, 1.0
    dataset = _data(5)
    grads, thetas, samples = _run(dataset, dp=DPSettings(noise_multiplier=z, clip_norm=clip), seed=seed)

    sigma = z * clip / EXPECTED_BATCH
    lo, hi = stats.chi2.ppf(ALPHA / 2, D), stats.chi2.ppf(1 - ALPHA / 2, D)
    zq = stats.norm.ppf(1 - ALPHA / 2)
    residuals = []
    for t, (g, theta, sample) in enumerate(zip(grads, thetas, samples)):
        clipped, norms = _clipped_sum(theta, dataset, sample, clip)
        assert len(sample) > 0 and norms.min() > 5 * clip, "every example is clipped: the test sees C, not the data"
        r = g - clipped / EXPECTED_BATCH
        assert lo <= D * np.mean(r**2) / sigma**2 <= hi, (
            f"step {t}: noise std {np.sqrt(np.mean(r**2)):.5g}, expected z C / (q n) = {sigma:.5g} "
            f"(batch of {len(sample)}; z C / batch would be {z * clip / len(sample):.5g})"
        )
        assert abs(r.mean()) <= zq * sigma / np.sqrt(D), f"step {t}: noise mean {r.mean():.3g}"
        residuals.append(r)
    for s in range(STEPS):
        for t in range(s + 1, STEPS):
            overlap = float(residuals[s] @ residuals[t]) / (sigma**2 * np.sqrt(D))
            assert abs(overlap) <= zq, f"steps {s} and {t} share their noise (normalised overlap {overlap:.1f})"


def test_without_noise_the_step_is_the_mean_of_per_example_gradients_clipped_to_c() -> None:
    clip = 1.0
    dataset = _data(6, small_fraction=0.5)  # half the examples below C (kept as they are), half above (scaled to C)
    grads, thetas, samples = _run(dataset, dp=DPSettings(noise_multiplier=0.0, clip_norm=clip), seed=3)

    below = above = 0
    for t, (g, theta, sample) in enumerate(zip(grads, thetas, samples)):
        clipped, norms = _clipped_sum(theta, dataset, sample, clip)
        below, above = below + int((norms < clip).sum()), above + int((norms > clip).sum())
        expected = clipped / EXPECTED_BATCH
        # float32 per-example gradients and parameters against a float64 oracle; Opacus divides by
        # (norm + 1e-6), a relative 3e-8 at these norms.
        assert np.linalg.norm(g - expected) <= 1e-4 * np.linalg.norm(expected), f"step {t}"
        unclipped, _ = _clipped_sum(theta, dataset, sample, None)
        assert np.linalg.norm(g - unclipped / EXPECTED_BATCH) > 0.5 * np.linalg.norm(unclipped / EXPECTED_BATCH)
    assert below > 10 and above > 10, "both sides of C were exercised"


def test_without_dp_the_step_is_the_exact_unclipped_mean_over_the_expected_batch() -> None:
    dataset = _data(7)
    grads, thetas, samples = _run(dataset, dp=None, seed=3)

    for t, (g, theta, sample) in enumerate(zip(grads, thetas, samples)):
        unclipped, norms = _clipped_sum(theta, dataset, sample, None)
        expected = unclipped / EXPECTED_BATCH
        assert norms.min() > 1.0, "gradients above any usual C: a hidden clip would show"
        assert np.linalg.norm(g - expected) <= 1e-4 * np.linalg.norm(expected), f"step {t}: plain training is not the exact mean"


def test_lora_per_example_gradients_are_clipped_to_c_as_plain_autograd_computes_them(tiny_model_dir: Path) -> None:
    """The real model path (PEFT LoRA inside Opacus's per-sample hooks) against one autograd pass per example."""
    from fedtune.common.config import LoraSettings, ModelConfig
    from fedtune.common.model import build_model, load_tokenizer
    from fedtune.common.tasks import encode, forward_loss

    labels = ["a", "b", "c"]
    tok = load_tokenizer(ModelConfig(base_model=str(tiny_model_dir)))
    texts = [f"note {i}: {['fever', 'cough and fever', 'rash on the left arm'][i % 3]} since {i % 7} days" for i in range(30)]
    data = encode(tok, texts, [labels[i % 3] for i in range(30)], labels, max_length=20)
    model = build_model(ModelConfig(base_model=str(tiny_model_dir)), LoraSettings(rank=4), len(labels), seed=1).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-identity init: a zero B hides update bugs
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    reference = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().double().ravel() for p in params])

    # Plain autograd, one example at a time, on an untouched copy.
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    per_example = []
    for i in range(len(data)):
        reference.zero_grad(set_to_none=True)
        loss, _ = forward_loss(reference, data[i : i + 1], reduction="sum")
        loss.backward()
        per_example.append(torch.cat([p.grad.double().ravel() for p in ref_params]))
    g = torch.stack(per_example)
    norms = g.norm(dim=1)
    clip = float(norms.median())  # half the examples clipped, half kept
    samples: list[torch.Tensor] = []
    train = TrainConfig(batch_size=9, physical_batch_size=4, learning_rate=1e-3, optimizer="sgd", weight_decay=0.0)
    train_local(model, data, train=train, plan=StepPlan(sample_rate=0.3, steps=1), dp=DPSettings(noise_multiplier=0.0, clip_norm=clip),
                seed=11, on_step=lambda step, idx: samples.append(idx.clone()))

    step = (before - torch.cat([p.detach().double().ravel() for p in params])) / 1e-3  # first SGD step: momentum plays no part
    chosen = samples[0]
    assert len(chosen) > 4, "a sample spanning several physical batches"
    clipped = g[chosen] * torch.clamp(clip / norms[chosen], max=1.0)[:, None]
    expected = clipped.sum(dim=0) / round(0.3 * len(data))
    assert (norms[chosen] > clip).any() and (norms[chosen] < clip).any()
    # float32 parameters differenced at lr = 1e-3 against a float64 oracle: 4e-5 measured.
    assert float((step - expected).norm()) <= 1e-3 * float(expected.norm())

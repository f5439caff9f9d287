"""Local DP-SGD training with Opacus on a PEFT LoRA model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.client.train import DPSettings, StepPlan, train_local
from fedtune.common.config import ModelConfig, TrainConfig
from fedtune.common.model import adapter_state, load_tokenizer
from fedtune.common.tasks import encode

from .lora_models import lora_model

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(ModelConfig(base_model=str(tiny_model_dir)))
    texts = [f"patient {i} reports {['chest pain', 'headache', 'nausea'][i % 3]} for {i % 5} days" for i in range(120)]
    labels = [LABELS[i % 3] for i in range(120)]
    return encode(tok, texts, labels, LABELS, max_length=24)


def _model(tiny_model_dir: Path) -> torch.nn.Module:
    return lora_model(tiny_model_dir, len(LABELS))


TRAIN = TrainConfig(batch_size=24, physical_batch_size=7, learning_rate=1e-2)
PLAN = StepPlan(sample_rate=0.2, steps=40)


def test_dp_with_zero_noise_and_nonbinding_clip_equals_plain_training_over_many_steps(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    plain, dp = _model(tiny_model_dir), _model(tiny_model_dir)
    start = adapter_state(plain)

    train_local(plain, dataset, train=TRAIN, plan=PLAN, dp=None, seed=3)
    train_local(dp, dataset, train=TRAIN, plan=PLAN, dp=DPSettings(noise_multiplier=0.0, clip_norm=1e6), seed=3)

    a, b = adapter_state(plain), adapter_state(dp)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-2, "training must move the adapter for the comparison to mean anything"
    assert diff < 1e-4 * max(1.0, moved), f"DP(z=0, C=inf) drifted from plain training by {diff}"
    # LoRA A and B both moved (a PEFT/Opacus mismatch would freeze or corrupt one of them).
    for kind in ("lora_A", "lora_B", "classifier"):
        assert any(float((a[k] - start[k]).abs().max()) > 1e-4 for k in a if kind in k), kind


def test_noise_changes_the_update(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    quiet, noisy = _model(tiny_model_dir), _model(tiny_model_dir)
    train_local(quiet, dataset, train=TRAIN, plan=PLAN, dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0), seed=3)
    train_local(noisy, dataset, train=TRAIN, plan=PLAN, dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0), seed=3)
    a, b = adapter_state(quiet), adapter_state(noisy)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


def test_small_clip_norm_clips_every_example_and_changes_the_update(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    loose, tight = _model(tiny_model_dir), _model(tiny_model_dir)
    r_loose = train_local(loose, dataset, train=TRAIN, plan=PLAN, dp=DPSettings(noise_multiplier=0.0, clip_norm=1e6), seed=3)
    r_tight = train_local(tight, dataset, train=TRAIN, plan=PLAN, dp=DPSettings(noise_multiplier=0.0, clip_norm=1e-4), seed=3)
    assert r_loose.clipped_fraction == 0.0
    assert r_tight.clipped_fraction == 1.0
    a, b = adapter_state(loose), adapter_state(tight)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


def test_training_leaves_a_plain_model_behind(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    model = _model(tiny_model_dir)
    train_local(model, dataset, train=TRAIN, plan=StepPlan(sample_rate=0.2, steps=2), dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0), seed=0)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    # A second DP round on the same model object (a warm site process) works.
    result = train_local(model, dataset, train=TRAIN, plan=StepPlan(sample_rate=0.2, steps=2), dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0), seed=1)
    assert result.steps == 2


def test_step_plan_uses_poisson_rate_batch_over_n() -> None:
    plan = StepPlan.for_dataset(400, TrainConfig(batch_size=64, local_epochs=2.0))
    assert plan.sample_rate == pytest.approx(0.16)
    assert plan.steps == round(2.0 / 0.16)
    assert StepPlan.for_dataset(10, TrainConfig(batch_size=64)).sample_rate == 1.0


def test_production_mode_draws_fresh_noise_each_time(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    first, second = _model(tiny_model_dir), _model(tiny_model_dir)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0)
    train_local(first, dataset, train=TRAIN, plan=StepPlan(sample_rate=0.2, steps=3), dp=dp, seed=None)
    train_local(second, dataset, train=TRAIN, plan=StepPlan(sample_rate=0.2, steps=3), dp=dp, seed=None)
    a, b = adapter_state(first), adapter_state(second)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4, "unseeded (production) runs must not repeat their noise"


def _trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().ravel() for p in model.parameters() if p.requires_grad])


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    """An empty sample (here q n = 1.2e-4, so all three are empty) once crashed collation with an
    IndexError; it must still add N(0, (zC)^2) / expected_batch and count as a step (opacus #806).

    SGD with momentum 0.9 is inverted exactly (g_1 = v_1, g_t = v_t - 0.9 v_{t-1}, v_t the
    parameter change over -lr). Each step's D noise coordinates: D s^2 / sigma^2 inside the
    chi-square(D) interval at 1e-6 per step, and two steps' noise nearly orthogonal (normalised
    overlap inside the normal interval at 1e-6 per pair): false-failure rate below 6e-6 (seeded,
    so deterministic).
    """
    from scipy import stats

    z, clip, lr = 1.5, 0.5, 1e-3
    train = TrainConfig(batch_size=24, physical_batch_size=7, learning_rate=lr, optimizer="sgd", weight_decay=0.0)
    model = _model(tiny_model_dir)
    thetas, samples = [_trainable(model)], []

    def record(step: int, indices: torch.Tensor) -> None:
        thetas.append(_trainable(model))
        samples.append(len(indices))

    result = train_local(model, dataset, train=train, plan=StepPlan(sample_rate=1e-6, steps=3), dp=DPSettings(noise_multiplier=z, clip_norm=clip),
                         seed=5, on_step=record)

    assert samples == [0, 0, 0] and result.steps == 3 and result.examples_seen == 0
    velocities = [(a - b) / lr for a, b in zip(thetas, thetas[1:])]
    noise = [velocities[0]] + [v - 0.9 * prev for prev, v in zip(velocities, velocities[1:])]
    sigma = z * clip / max(1, round(1e-6 * len(dataset)))  # expected batch: train.py's max(1, round(q n))
    d = len(noise[0])
    lo, hi = stats.chi2.ppf(5e-7, d), stats.chi2.ppf(1 - 5e-7, d)
    for t, g in enumerate(noise):
        assert lo <= d * float((g**2).mean()) / sigma**2 <= hi, f"step {t}: noise std {float(g.std()):.4g}, expected {sigma:.4g}"
    bound = stats.norm.ppf(1 - 5e-7)
    for s, t in ((0, 1), (0, 2), (1, 2)):
        assert abs(float(noise[s] @ noise[t])) / (sigma**2 * d**0.5) <= bound, f"steps {s} and {t} repeat their noise"


def test_an_empty_poisson_batch_without_dp_is_a_zero_gradient_step(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    model = _model(tiny_model_dir)
    before = adapter_state(model)
    result = train_local(model, dataset, train=TRAIN, plan=StepPlan(sample_rate=1e-6, steps=2), dp=None, seed=5)
    after = adapter_state(model)
    assert result.steps == 2 and result.examples_seen == 0
    assert all(torch.equal(before[k], after[k]) for k in before)

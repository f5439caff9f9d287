"""Local DP-SGD training with Opacus on a PEFT LoRA model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.client.train import DPSettings, StepPlan, train_local
from fedtune.common.config import LoraSettings, ModelConfig, TrainConfig
from fedtune.common.model import adapter_state, build_model, load_tokenizer
from fedtune.common.tasks import encode

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(ModelConfig(base_model=str(tiny_model_dir)))
    texts = [f"patient {i} reports {['chest pain', 'headache', 'nausea'][i % 3]} for {i % 5} days" for i in range(120)]
    labels = [LABELS[i % 3] for i in range(120)]
    return encode(tok, texts, labels, LABELS, max_length=24)


def _model(tiny_model_dir: Path) -> torch.nn.Module:
    """A LoRA model with non-identity init (B != 0: a zero B hides update bugs) and no dropout."""
    model = build_model(ModelConfig(base_model=str(tiny_model_dir)), LoraSettings(rank=4), len(LABELS), seed=1).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


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

"""FedProx (Li et al. 2020) at the site: the proximal term (mu/2) ||w - w_g||^2 inside DP-SGD.

Real PEFT LoRA on a tiny BERT, real Opacus. The per-example oracle is one plain autograd pass per
example on an untouched copy of the model, plus mu (w - w_g) written here, clipped here.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtune.client.train import DPSettings, StepPlan, proximal_reference, train_local
from fedtune.common.config import ModelConfig, TrainConfig
from fedtune.common.errors import ConfigError
from fedtune.common.model import adapter_state, build_model, load_tokenizer
from fedtune.common.tasks import encode, forward_loss

from .lora_models import lora_model

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(ModelConfig(base_model=str(tiny_model_dir)))
    texts = [f"note {i}: {['fever', 'cough and fever', 'rash on the left arm'][i % 3]} since {i % 7} days" for i in range(60)]
    return encode(tok, texts, [LABELS[i % 3] for i in range(60)], LABELS, max_length=20)


def _model(tiny_model_dir: Path) -> torch.nn.Module:
    return lora_model(tiny_model_dir, len(LABELS))


def _away(model: torch.nn.Module, scale: float, seed: int = 3) -> dict[str, torch.Tensor]:
    """A w_g away from the model's weights, so that the proximal pull acts from the first step."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in proximal_reference(model).items()}


def _trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().ravel() for p in model.parameters() if p.requires_grad])


def _flat(reference: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """w_g flattened in the model's parameter order."""
    return torch.cat([reference[n].double().ravel() for n, p in model.named_parameters() if p.requires_grad])


SGD = TrainConfig(batch_size=12, physical_batch_size=5, learning_rate=1e-2, optimizer="sgd", weight_decay=0.0, proximal_mu=2.0)


def test_dp_with_zero_noise_and_nonbinding_clip_equals_plain_training_with_the_proximal_term(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, dataset
) -> None:
    # Prepare: three copies of one model, one w_g away from it
    plain, dp, free = _model(tiny_model_dir), _model(tiny_model_dir), _model(tiny_model_dir)
    ref = _away(plain, 0.05)
    start, target = _trainable(plain), _flat(ref, plain)
    plan = StepPlan(sample_rate=0.2, steps=12)

    # Execute
    train_local(plain, dataset, train=SGD, plan=plan, dp=None, seed=3, proximal_reference=ref)
    train_local(dp, dataset, train=SGD, plan=plan, dp=DPSettings(noise_multiplier=0.0, clip_norm=1e6), seed=3, proximal_reference=ref)
    train_local(free, dataset, train=dataclasses.replace(SGD, proximal_mu=0.0), plan=plan, dp=None, seed=3)

    # Assert: DP equals plain; the term changed training, towards w_g
    a, b, c = _trainable(plain), _trainable(dp), _trainable(free)
    pull = float((a - c).norm())
    assert float((a - start).norm()) > 1e-2, "training must move the adapter for the comparison to mean anything"
    assert pull > 1e-3, "the proximal term must change the result"
    # float32 training, 12 SGD steps with momentum: 4e-8 measured
    assert float((a - b).norm()) <= 1e-6 * float(a.norm()), f"DP(z=0, C=inf) with FedProx drifted from plain by {float((a - b).norm())}"
    assert float((a - target).norm()) < float((c - target).norm()), "FedProx must end nearer w_g than plain training"


def test_each_clipped_per_example_gradient_includes_the_proximal_term(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, dataset
) -> None:
    # Prepare: an untouched copy for the oracle; w_g away from w, mu chosen so that |mu (w - w_g)|
    # is the median per-example gradient norm, and C the lower quartile of the full norms
    model = _model(tiny_model_dir)
    oracle_model = copy.deepcopy(model)
    ref = _away(model, 0.05)
    w, w_g = _trainable(model), _flat(ref, model)
    params = [p for p in oracle_model.parameters() if p.requires_grad]
    per_example = []
    for i in range(len(dataset)):
        oracle_model.zero_grad(set_to_none=True)
        loss, _ = forward_loss(oracle_model, dataset[i : i + 1], reduction="sum")
        loss.backward()
        per_example.append(torch.cat([p.grad.double().ravel() for p in params]))
    g = torch.stack(per_example)
    mu = float(g.norm(dim=1).median()) / float((w - w_g).norm())
    full = g + mu * (w - w_g)  # each example's gradient of l_i + (mu/2) ||w - w_g||^2
    norms = full.norm(dim=1)
    clip = float(norms.quantile(0.25))
    lr, q = 1e-3, 0.3
    train = TrainConfig(batch_size=18, physical_batch_size=4, learning_rate=lr, optimizer="sgd", weight_decay=0.0, proximal_mu=mu)
    samples: list[torch.Tensor] = []

    # Execute: one DP step, no noise
    result = train_local(model, dataset, train=train, plan=StepPlan(sample_rate=q, steps=1),
                         dp=DPSettings(noise_multiplier=0.0, clip_norm=clip), seed=11,
                         on_step=lambda step, idx: samples.append(idx.clone()), proximal_reference=ref)

    # Assert: the step is sum_i clip_C(g_i + mu (w - w_g)) / (q n)
    step = (w - _trainable(model)) / lr  # the first SGD step: momentum plays no part
    chosen = samples[0]
    expected_batch = round(q * len(dataset))
    assert len(chosen) > 4, "a sample spanning several physical batches"
    assert (norms[chosen] > clip).any() and (norms[chosen] < clip).any()
    expected = (full[chosen] * torch.clamp(clip / norms[chosen], max=1.0)[:, None]).sum(dim=0) / expected_batch
    # float32 parameters differenced at lr = 1e-3 against a float64 oracle: 3e-5 measured
    assert float((step - expected).norm()) <= 2e-4 * float(expected.norm())
    # ...and not the term added after clipping (what a loss-only implementation under Opacus would give)
    g_norms = g[chosen].norm(dim=1)
    outside = ((g[chosen] * torch.clamp(clip / g_norms, max=1.0)[:, None]).sum(dim=0) + len(chosen) * mu * (w - w_g)) / expected_batch
    # (6e-2 measured: 100 times the tolerance above)
    assert float((step - outside).norm()) > 100 * 2e-4 * float(expected.norm())
    # The clipped fraction counts the whole per-example gradient.
    assert result.clipped_fraction == pytest.approx(float((norms[chosen] > clip).double().mean()))


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, clip_norm=0.5)], ids=["plain", "dp"])
def test_mu_zero_leaves_seeded_training_bit_identical(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, dataset, dp: DPSettings | None
) -> None:
    # Prepare: with mu = 0 a reference, even a far one, must change nothing
    without, with_ref = _model(tiny_model_dir), _model(tiny_model_dir)
    train = TrainConfig(batch_size=12, physical_batch_size=5, learning_rate=1e-2, proximal_mu=0.0)
    plan = StepPlan(sample_rate=0.2, steps=6)

    # Execute
    train_local(without, dataset, train=train, plan=plan, dp=dp, seed=3)
    train_local(with_ref, dataset, train=train, plan=plan, dp=dp, seed=3, proximal_reference=_away(with_ref, 1.0))

    # Assert
    a, b = adapter_state(without), adapter_state(with_ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mu_without_reference_weights_is_refused_naming_the_setting(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    model = _model(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"train.proximal_mu = 2 needs the reference weights"):
        train_local(model, dataset, train=SGD, plan=StepPlan(sample_rate=0.2, steps=1), dp=None, seed=0)
    partial = dict(list(proximal_reference(model).items())[1:])
    with pytest.raises(ConfigError, match=r"missing: \["):
        train_local(model, dataset, train=SGD, plan=StepPlan(sample_rate=0.2, steps=1), dp=None, seed=0, proximal_reference=partial)


def test_the_site_takes_the_received_adapter_as_w_g(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole train request of a simulated site (real data, ledger, Opacus); a spy around
    train_local records w_g and delegates."""
    from fedtune.client import handlers, local
    from fedtune.client.site_request import SiteRequest
    from fedtune.common.config import from_dict
    from fedtune.common.messages import RoundInstructions

    run = from_dict({"simulation": True, "model": {"base_model": str(tiny_model_dir), "max_length": 24},
                     "federation": {"sites": 2, "rounds": 1}, "privacy": {"noise_multiplier": 1.0},
                     "train": {"proximal_mu": 0.5, "local_epochs": 0.25, "batch_size": 16, "learning_rate": 1e-2}})
    from fedtune.common.sitedata import load_config_table, run_labels

    labels = run_labels(run.data, load_config_table(run.data))
    # The received adapter: the model's own start moved, so a w_g taken before loading would differ.
    start = adapter_state(build_model(run.model, run.lora, len(labels), seed=run.seed).model)
    gen = torch.Generator().manual_seed(5)
    received = OrderedDict((k, (v + 0.05 * torch.randn(v.shape, generator=gen)).numpy()) for k, v in start.items())
    seen: dict[str, Any] = {}
    real_train_local = local.train_local

    def spy(model, dataset, **kwargs):  # type: ignore[no-untyped-def]
        seen["reference"] = {k: v.clone() for k, v in kwargs["proximal_reference"].items()}
        return real_train_local(model, dataset, **kwargs)

    monkeypatch.setattr(local, "train_local", spy)
    config = RoundInstructions(server_round=1, num_rounds=1, labels=tuple(labels), run_dir=str(tmp_path)).to_config()

    reply = handlers.handle(SiteRequest(kind="train", run_config=run.to_flat(), node_config={"partition-id": 0, "num-partitions": 2},
                                        run_id=1, config=config, arrays=received))

    # Every trainable tensor of w_g is one of the received tensors, exactly, and all of them are there.
    reference = seen["reference"]
    assert len(reference) == len(received)
    pool = [np.asarray(v) for v in received.values()]
    for name, tensor in reference.items():
        assert any(arr.shape == tuple(tensor.shape) and np.array_equal(arr, tensor.numpy()) for arr in pool), name
    assert reply.arrays is not None
    assert any(not np.array_equal(reply.arrays[k], received[k]) for k in received), "the site trained"

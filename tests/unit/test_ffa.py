"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seed-derived value, only B and the head exchanged.

Real PEFT modules of the tiny BERT, real Opacus DP-SGD, real Flower messages through the
coordinator's screening and strategy; the oracle of every average is ``np.average``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.client.train import DPSettings, StepPlan, train_local
from fedtune.common.config import RunConfig, TrainConfig, from_dict
from fedtune.common.errors import UpdateError
from fedtune.common.messages import PrivacyParams, TrainReply
from fedtune.common.model import (
    ADAPTER_NAME,
    adapter_state,
    build_model,
    load_adapter_state,
    load_classifier,
    load_tokenizer,
    save_adapter,
    uses_ffa,
)
from fedtune.common.tasks import encode

LABELS = ["a", "b", "c"]


def _run(tiny_model_dir: Path, aggregation: str = "ffa", seed: int = 3, **lora: object) -> RunConfig:
    return from_dict({"model": {"base_model": str(tiny_model_dir), "max_length": 24}, "lora": {"rank": 4, **lora},
                      "federation": {"aggregation": aggregation}, "seed": seed})


def _model(run: RunConfig) -> torch.nn.Module:
    """The model a site or the coordinator builds from the run config, without dropout."""
    model = build_model(run.model, run.lora, len(LABELS), seed=run.seed, ffa=uses_ffa(run)).model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def _random_state(model: torch.nn.Module, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """The model's exchanged tensors with random non-zero values (B = 0 would hide a wrong product)."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(v.shape, generator=gen) * 0.1) for k, v in adapter_state(model).items())


def _delta_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """What each LoRA module adds to its base weight, as PEFT computes it: (alpha / r) B A."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight(ADAPTER_NAME).detach().numpy().astype(np.float64)
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _reply(state: dict[str, torch.Tensor], *, site: str, n: int) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    privacy = PrivacyParams(dp=True, epsilon=1.0, budget_epsilon=8.0, delta=1e-5, noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, steps=5)
    metrics = MetricRecord(TrainReply(site=site, weight=n, privacy=privacy).to_metrics())
    arrays = ArrayRecord(OrderedDict(state))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": site})}), reply_to=request)


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("aggregation", ["ffa", "fedavg"])
def test_ffa_average_of_b_gives_exactly_the_average_of_the_products_and_plain_lora_does_not(tiny_model_dir: Path, aggregation: str) -> None:
    from fedtune.server.app import make_strategy
    from fedtune.server.screening import screen_train_replies

    run = _run(tiny_model_dir, aggregation)
    model = _model(run)
    initial = ArrayRecord(adapter_state(model))
    weights = [12, 30, 58]
    replies, deltas = [], []
    for i, n in enumerate(weights):
        # Under plain LoRA every site's A moved too (a random A_i); under FFA a site sends no A.
        state = _random_state(model, seed=100 + i)
        load_adapter_state(model, state)
        deltas.append(_delta_weights(model))
        replies.append(_reply(state, site=f"site-{i}", n=n))

    accepted, rejected = screen_train_replies(replies, initial)
    arrays, _ = make_strategy(run).aggregate_train(1, [m for m, _ in accepted])
    assert not rejected and arrays is not None
    load_adapter_state(model, arrays.to_torch_state_dict())
    got = _delta_weights(model)

    errors = []
    for name, value in got.items():
        oracle = np.average(np.stack([d[name] for d in deltas]), axis=0, weights=weights)
        errors.append(float(np.abs(value - oracle).max() / np.abs(oracle).max()))
    if aggregation == "ffa":
        assert max(errors) < 1e-5, f"FFA: the product of the averaged B with A is off the average of the products by {max(errors):.2e}"
    else:
        # mean(B_i A_i) != mean(B_i) mean(A_i): what FFA-LoRA removes (documented, not a bug of FedAvg).
        assert min(errors) > 1e-2, f"plain LoRA's factor average came out exact ({min(errors):.2e}): the test cannot tell the schemes apart"


def test_only_lora_b_and_the_head_are_exchanged_at_half_the_lora_bytes(tiny_model_dir: Path) -> None:
    ffa_state = adapter_state(_model(_run(tiny_model_dir)))
    plain_state = adapter_state(_model(_run(tiny_model_dir, "fedavg")))

    assert list(ffa_state) == [k for k in plain_state if ".lora_A." not in k]
    assert all(".lora_B." in k or "classifier" in k for k in ffa_state)
    assert any(".lora_B." in k for k in ffa_state) and any("classifier" in k for k in ffa_state)

    def nbytes(state: dict[str, torch.Tensor], lora_only: bool) -> int:
        return sum(t.numel() * t.element_size() for k, t in state.items() if not lora_only or ".lora_" in k)

    # query and value are square (d x d), so A (r x d) and B (d x r) weigh the same.
    assert nbytes(ffa_state, lora_only=True) * 2 == nbytes(plain_state, lora_only=True)
    assert nbytes(ffa_state, lora_only=False) < 0.6 * nbytes(plain_state, lora_only=False)


def test_a_state_carrying_lora_a_is_refused_by_the_site_and_by_the_coordinator(tiny_model_dir: Path, flower_task_identity: None) -> None:
    from fedtune.server.screening import screen_train_replies

    model = _model(_run(tiny_model_dir))
    before = _lora_a(model)
    planted = adapter_state(_model(_run(tiny_model_dir, "fedavg")))  # the same names, plus every A
    planted = OrderedDict((k, v + 1.0 if ".lora_A." in k else v) for k, v in planted.items())

    with pytest.raises(UpdateError, match=r"unexpected: \[.*lora_A"):
        load_adapter_state(model, planted)
    accepted, rejected = screen_train_replies([_reply(planted, site="site-x", n=10)], ArrayRecord(adapter_state(model)))

    assert all(torch.equal(before[k], v) for k, v in _lora_a(model).items())
    assert not accepted and rejected[0].site == "site-x" and "lora_A" in rejected[0].reason


_BUILD_ELSEWHERE = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from fedtune.common.config import from_dict
    from fedtune.common.model import build_model, uses_ffa

    source, own, out, seed, global_seed = sys.argv[1:6]
    shutil.copytree(source, own)  # the site's own copy of the base model, in its own folder
    torch.manual_seed(int(global_seed))
    torch.rand(1000)  # a global generator in another state than the coordinator's
    run = from_dict({"model": {"base_model": own, "max_length": 24}, "lora": {"rank": 4, "top_layers": 1},
                     "federation": {"aggregation": "ffa"}, "seed": int(seed)})
    model = build_model(run.model, run.lora, 3, seed=run.seed, ffa=uses_ffa(run)).model
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if ".lora_A." in n}, out)
    """
)


def test_lora_a_is_bit_identical_in_another_process_with_another_global_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "a.safetensors"
    subprocess.run([sys.executable, "-c", _BUILD_ELSEWHERE, str(tiny_model_dir), str(tmp_path / "site-model"), str(out), "3", "12345"],
                   check=True, timeout=300, capture_output=True)
    elsewhere = load_file(str(out))
    # Here all layers are adapted (top_layers=2), there only the top one: a matrix's A depends on
    # its name and the seed, not on which other matrices were built before it.
    here = _lora_a(_model(_run(tiny_model_dir, seed=3, top_layers=2)))
    other_seed = _lora_a(_model(_run(tiny_model_dir, seed=4, top_layers=2)))

    assert elsewhere and set(elsewhere) < set(here)
    for name, value in elsewhere.items():
        assert torch.equal(value, here[name]), name
        assert not torch.equal(value, other_seed[name]), f"{name}: the run's seed must change A"
    # PEFT's default LoRA A distribution (Kaiming-uniform, a = sqrt(5)): U(-1/sqrt(d), 1/sqrt(d)).
    bound = 1 / np.sqrt(32)
    assert all(0.9 * bound < float(v.abs().max()) <= bound for v in here.values())


@pytest.fixture(scope="module")
def dataset(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(_run(tiny_model_dir).model)
    texts = [f"patient {i} reports {['chest pain', 'headache', 'nausea'][i % 3]} for {i % 5} days" for i in range(90)]
    return encode(tok, texts, [LABELS[i % 3] for i in range(90)], LABELS, max_length=24)


def test_lora_a_stays_bit_identical_through_rounds_of_dp_training_while_b_and_the_head_move(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    run = _run(tiny_model_dir)
    reference = _lora_a(_model(run))  # what the coordinator derives
    sites = [_model(run), _model(run)]
    global_state = adapter_state(sites[0])
    train = TrainConfig(batch_size=18, physical_batch_size=7, learning_rate=5e-2)
    for rnd in range(3):
        states = []
        for i, site in enumerate(sites):
            load_adapter_state(site, global_state)
            train_local(site, dataset, train=train, plan=StepPlan(sample_rate=0.2, steps=4),
                        dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0), seed=10 * rnd + i)
            states.append(adapter_state(site))
            for name, value in _lora_a(site).items():
                assert torch.equal(value, reference[name]), f"round {rnd + 1}, site {i}: {name} changed"
        new_state = OrderedDict((k, torch.from_numpy(np.average(np.stack([s[k].numpy() for s in states]), axis=0).astype(np.float32)))
                                for k in global_state)
        moved = {k for k in new_state if not torch.allclose(new_state[k], global_state[k])}
        assert any(".lora_B." in k for k in moved) and any("classifier" in k for k in moved), f"round {rnd + 1}: training moved nothing"
        global_state = new_state


def test_a_saved_ffa_adapter_holds_a_and_predicts_with_plain_peft_as_in_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    run = _run(tiny_model_dir)
    model = _model(run)
    load_adapter_state(model, _random_state(model, seed=9))
    save_adapter(model, tmp_path / "adapter", metadata={"labels": LABELS, "max_length": 24, "base_model": str(tiny_model_dir)})

    base = load_classifier(tiny_model_dir, len(LABELS), pooling=run.model.pooling)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask, _ = encode(load_tokenizer(run.model), ["chest pain since noon", "a mild headache", "nausea"], ["a", "b", "c"],
                          LABELS, max_length=24).tensors
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits

    frozen = _lora_a(model)
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in loaded.named_parameters() if ".lora_A." in n)
    assert torch.allclose(got, expected, atol=1e-6), f"max difference {float((got - expected).abs().max()):.2e}"


def test_a_site_process_rebuilds_its_model_when_the_mode_or_the_ffa_seed_changes(tiny_model_dir: Path) -> None:
    from fedtune.client.handlers import _model as site_model

    plain = site_model(_run(tiny_model_dir, "fedavg"), len(LABELS)).model
    ffa = site_model(_run(tiny_model_dir, seed=3), len(LABELS)).model
    ffa_again = site_model(_run(tiny_model_dir, seed=3), len(LABELS)).model
    other_seed = site_model(_run(tiny_model_dir, seed=4), len(LABELS)).model

    assert ffa is not plain and ffa_again is ffa and other_seed is not ffa
    assert all(not p.requires_grad for n, p in other_seed.named_parameters() if ".lora_A." in n)
    expected = _lora_a(_model(_run(tiny_model_dir, seed=4)))
    assert expected.keys() == _lora_a(other_seed).keys()
    assert all(torch.equal(v, expected[k]) for k, v in _lora_a(other_seed).items())


def test_dp_sgd_clips_the_per_example_gradients_of_b_and_the_head_as_autograd_computes_them(tiny_model_dir: Path, dataset) -> None:  # type: ignore[no-untyped-def]
    """With A frozen, no LoRA input needs a gradient (Opacus's hooks then see only output gradients):
    its per-example gradients of B and the head must still be exact, checked against one plain
    autograd pass per example and one SGD step with half the examples clipped."""
    import copy

    from fedtune.common.tasks import forward_loss

    model = _model(_run(tiny_model_dir))
    load_adapter_state(model, _random_state(model, seed=5))
    reference = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    assert len(params) == len(adapter_state(model)), "DP-SGD trains exactly the exchanged tensors"
    before = torch.cat([p.detach().double().ravel() for p in params])
    per_example = []
    for i in range(len(dataset)):
        reference.zero_grad(set_to_none=True)
        loss, _ = forward_loss(reference, dataset[i : i + 1], reduction="sum")
        loss.backward()
        per_example.append(torch.cat([p.grad.double().ravel() for p in ref_params]))
    g = torch.stack(per_example)
    norms = g.norm(dim=1)
    clip = float(norms.median())
    samples: list[torch.Tensor] = []
    train = TrainConfig(batch_size=27, physical_batch_size=8, learning_rate=1e-3, optimizer="sgd", weight_decay=0.0)

    train_local(model, dataset, train=train, plan=StepPlan(sample_rate=0.3, steps=1), dp=DPSettings(noise_multiplier=0.0, clip_norm=clip),
                seed=11, on_step=lambda step, idx: samples.append(idx.clone()))

    step = (before - torch.cat([p.detach().double().ravel() for p in params])) / 1e-3  # first SGD step: no momentum yet
    chosen = samples[0]
    clipped = g[chosen] * torch.clamp(clip / norms[chosen], max=1.0)[:, None]
    expected = clipped.sum(dim=0) / round(0.3 * len(dataset))
    assert len(chosen) > 8 and (norms[chosen] > clip).any() and (norms[chosen] < clip).any()
    # float32 parameters differenced at lr = 1e-3 against a float64 oracle.
    assert float((step - expected).norm()) <= 1e-3 * float(expected.norm())

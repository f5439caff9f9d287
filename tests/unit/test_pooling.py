"""The mean-pooling task head: what it computes, PEFT save/load, and Opacus per-example gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.common.config import LoraSettings, ModelConfig, RunConfig
from fedtune.common.errors import ConfigError
from fedtune.common.model import (
    MeanPoolingClassifier,
    build_model,
    load_tokenizer,
    mean_pool,
    pooling_of,
    save_adapter,
)
from fedtune.common.tasks import encode

LABELS = ["a", "b", "c"]
TEXTS = ["chest pain since this morning", "mild headache", "nausea and vomiting after a meal for two days", "rash"]


def _model(tiny_model_dir: Path, pooling: str = "mean") -> torch.nn.Module:
    """LoRA + head with non-identity init (B != 0 and a non-zero head bias), without dropout."""
    model = build_model(ModelConfig(base_model=str(tiny_model_dir), pooling=pooling), LoraSettings(rank=4), len(LABELS), seed=1).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # so train mode (which Opacus needs to record activations) is deterministic
    return model.eval()


def _batch(tiny_model_dir: Path, texts: list[str] = TEXTS, max_length: int = 16):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(ModelConfig(base_model=str(tiny_model_dir)))
    return encode(tok, texts, [LABELS[i % 3] for i in range(len(texts))], LABELS, max_length=max_length).tensors


def test_mean_pool_averages_only_the_unmasked_tokens() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.stack([(hidden[0, 0] + hidden[0, 1]) / 2, hidden[1, 0]])
    assert torch.equal(mean_pool(hidden, mask), expected)


def test_head_reads_the_masked_mean_of_the_last_hidden_state(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    ids, mask, _ = _batch(tiny_model_dir)
    base = model.get_base_model()
    assert isinstance(base, MeanPoolingClassifier)

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = base.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = []
        for i in range(len(ids)):  # by hand: the mean over this example's real tokens
            kept = hidden[i, mask[i].bool()]
            rows.append(base.classifier(kept.sum(dim=0) / len(kept)))
    assert mask.sum(dim=1).min() < mask.shape[1], "the batch must contain padding for the test to mean anything"
    torch.testing.assert_close(logits, torch.stack(rows))


def test_padding_does_not_change_the_prediction(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    ids, mask, _ = _batch(tiny_model_dir)
    pad = torch.zeros(len(ids), 9, dtype=ids.dtype)  # nine more [PAD] columns (id 0), masked out
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=mask).logits
        long = model(input_ids=torch.cat([ids, pad], 1), attention_mask=torch.cat([mask, pad], 1)).logits
    torch.testing.assert_close(short, long)


def test_only_lora_and_the_head_are_trained_and_exchanged(tiny_model_dir: Path) -> None:
    bundle = build_model(ModelConfig(base_model=str(tiny_model_dir), pooling="mean"), LoraSettings(rank=4), len(LABELS))
    trained = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    assert any("classifier" in n for n in trained)
    assert any("classifier" in k for k in bundle.exchanged)
    assert all("lora_" in k or "classifier" in k for k in bundle.exchanged)


def test_saved_adapter_loads_back_with_its_pooling_and_identical_predictions(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.inference import load_adapter

    model = _model(tiny_model_dir)
    ids, mask, _ = _batch(tiny_model_dir)
    save_adapter(model, tmp_path / "adapter", metadata={"labels": LABELS, "max_length": 16, "base_model": str(tiny_model_dir)})

    loaded = load_adapter(tmp_path / "adapter")

    assert json.loads((tmp_path / "adapter" / "fedtune.json").read_text())["pooling"] == "mean"
    assert pooling_of(loaded.model) == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_adapter_without_pooling_in_its_metadata_loads_the_cls_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.inference import load_adapter

    model = _model(tiny_model_dir, pooling="cls")
    ids, mask, _ = _batch(tiny_model_dir)
    save_adapter(model, tmp_path / "adapter", metadata={"labels": LABELS, "max_length": 16, "base_model": str(tiny_model_dir)})
    meta_path = tmp_path / "adapter" / "fedtune.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("pooling") == "cls"
    meta_path.write_text(json.dumps(meta))  # as written before the setting existed

    loaded = load_adapter(tmp_path / "adapter")

    assert pooling_of(loaded.model) == "cls"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_opacus_per_example_gradients_equal_each_examples_own_gradient(tiny_model_dir: Path) -> None:
    from opacus import GradSampleModule

    model = _model(tiny_model_dir).train()
    ids, mask, y = _batch(tiny_model_dir)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for i in range(len(ids)):  # the oracle: one backward pass per example
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        torch.nn.functional.cross_entropy(logits, y[i : i + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)

    gs = GradSampleModule(model, loss_reduction="mean")
    try:
        loss = torch.nn.functional.cross_entropy(gs(input_ids=ids, attention_mask=mask).logits, y)
        loss.backward()
        got = {n: p.grad_sample.clone() for n, p in params.items()}
    finally:
        gs.to_standard_module()

    assert any("classifier" in n for n in got) and any("lora_A" in n for n in got)
    for name, samples in got.items():
        assert samples.shape[0] == len(ids), name
        for i in range(len(ids)):
            torch.testing.assert_close(samples[i], expected[i][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_pooling_is_a_config_error_naming_the_value() -> None:
    with pytest.raises(ConfigError, match="model.pooling must be one of .*'max'"):
        RunConfig(model=ModelConfig(pooling="max"))


def test_a_relative_base_model_folder_resolves_to_an_absolute_one(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The folder lands in the adapter's fedtune.json and the summary, read later from another directory.
    from fedtune.common.model import resolve_base_model

    monkeypatch.chdir(tiny_model_dir.parent)
    resolved = resolve_base_model(ModelConfig(base_model=tiny_model_dir.name))
    assert resolved.is_absolute() and resolved == tiny_model_dir.resolve()

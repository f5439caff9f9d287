"""The causal-LM task core: encoding, response-only per-example loss, per-example gradients under
Opacus (tiny Llama and tiny GPT-2 built from a config), LoRA targets, DP-SGD through train_local,
greedy generation and perplexity.

Oracles are independent of the code under test: token ids come from the word-level vocabulary,
gradients from plain autograd on each example alone and unpadded, losses from log_softmax by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.client.train import DPSettings, StepPlan, train_local
from fedtune.common.causal_lm import (
    IGNORE,
    LMDataSettings,
    build_causal_lm,
    encode_lm,
    evaluate_lm,
    generate,
    lm_loss,
    lm_record_digests,
    lm_target_modules,
    load_lm_table,
    load_lm_tokenizer,
)
from fedtune.common.config import LoraSettings, TrainConfig
from fedtune.common.errors import ConfigError, DataError
from fedtune.common.tasks import task_loss

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = ("the a patient reports pain fever cough for days what is capital of france paris answer summary note bank card "
         "lost how do i reset my pin call us visit branch yes no please thanks one two three four five six").split()
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tokenizer(*, bos: bool, chat: bool):  # type: ignore[no-untyped-def]
    """A word-level tokenizer built in code: one id per word, so expected ids are read off VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    if bos:  # a Llama-style tokenizer that starts every text with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:], chat_template=CHAT if chat else None,
    )


def _save_tiny(folder: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if kind == "llama":
        config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
        tokenizer = _tokenizer(bos=True, chat=True)
    else:
        config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                            bos_token_id=2, eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        tokenizer = _tokenizer(bos=False, chat=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lm")
    return {kind: _save_tiny(root / kind, kind) for kind in ("llama", "gpt2")}


def _lora_model(path: Path, *, seed: int = 1, double: bool = False) -> torch.nn.Module:
    """LoRA with a non-zero B (a zero B hides update bugs), no dropout."""
    model = build_causal_lm(path, LoraSettings(rank=4, alpha=8.0, dropout=0.0, top_layers=0), seed=seed).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.double() if double else model


def _write_jsonl(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PAIRS = [
    ("what is the capital of france", "paris"),
    ("patient reports pain for three days", "pain summary note"),
    ("how do i reset my pin", "call us or visit a branch please"),
    ("bank card lost", "call us"),
    ("patient reports fever and cough", "fever cough summary"),
    ("what is my pin", "no"),
    ("yes", "thanks one two three four five six"),
    ("the note", "the patient reports pain for two days"),
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("lm-data") / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])


def _ids(text: str) -> list[int]:
    return [VOCAB.get(w, VOCAB["<unk>"]) for w in text.split()]


# --- encoding ---------------------------------------------------------------------------------


def test_plain_encoding_trains_only_on_the_response_and_its_eos(tiny_lms, pairs_file) -> None:  # type: ignore[no-untyped-def]
    tok = load_lm_tokenizer(tiny_lms["llama"])  # starts texts with <s>
    enc = encode_lm(tok, load_lm_table(pairs_file), max_length=32, template="plain")

    ids, mask, labels = enc.dataset.tensors
    assert enc.examples == len(PAIRS) and enc.truncated == 0 and enc.dropped_rows == ()
    for i, (prompt, response) in enumerate(PAIRS):
        expected = [VOCAB["<s>"]] + _ids(prompt) + _ids(response) + [VOCAB["</s>"]]
        n, p = len(expected), 1 + len(_ids(prompt))
        assert ids[i, :n].tolist() == expected
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert labels[i].tolist() == [IGNORE] * p + expected[p:] + [IGNORE] * (ids.shape[1] - n)


def test_chat_messages_render_with_the_template_and_train_on_the_final_answer_only(tiny_lms, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chat = [{"role": "system", "content": "bank"}, {"role": "user", "content": "card lost"},
            {"role": "assistant", "content": "call us"}, {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "yes"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    tok = load_lm_tokenizer(tiny_lms["llama"])

    enc = encode_lm(tok, load_lm_table(path, LMDataSettings(messages_column="messages")), max_length=64)

    ids, _, labels = enc.dataset.tensors
    expected = _ids("<|system|> bank </s> <|user|> card lost </s> <|assistant|> call us </s> <|user|> thanks </s> <|assistant|> yes </s>")
    assert ids[0].tolist() == expected  # the template writes its special tokens; no extra <s>
    trained = [t for t in labels[0].tolist() if t != IGNORE]
    assert trained == _ids("yes </s>")  # the earlier assistant turn is context, not a target


def test_prompt_response_pairs_use_the_chat_template_when_the_tokenizer_has_one(tiny_lms, pairs_file) -> None:  # type: ignore[no-untyped-def]
    tok = load_lm_tokenizer(tiny_lms["llama"])
    ids, _, labels = encode_lm(tok, load_lm_table(pairs_file), max_length=32).dataset.tensors  # template auto
    prompt, response = PAIRS[0]
    expected = _ids(f"<|user|> {prompt} </s> <|assistant|> {response} </s>")
    assert ids[0, : len(expected)].tolist() == expected
    assert [t for t in labels[0].tolist() if t != IGNORE] == _ids(f"{response} </s>")


def test_truncation_cuts_the_response_end_and_drops_examples_whose_prompt_fills_max_length(tiny_lms, pairs_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = load_lm_tokenizer(tiny_lms["gpt2"])  # plain, no <s>: tokens = words (+ </s> after the response)
    max_length = 5
    enc = encode_lm(tok, load_lm_table(pairs_file), max_length=max_length)

    prompt_lens = [len(_ids(p)) for p, _ in PAIRS]
    total_lens = [len(_ids(p)) + len(_ids(r)) + 1 for p, r in PAIRS]
    dropped = tuple(row for row, n in enumerate(prompt_lens, start=1) if n >= max_length)
    assert dropped == enc.dropped_rows and dropped  # rows 1, 2, 3, 5 here
    assert enc.truncated == sum(1 for p, t in zip(prompt_lens, total_lens) if p < max_length < t)
    assert enc.examples == len(PAIRS) - len(dropped)
    assert enc.lengths == tuple(total_lens)  # every row's untruncated tokens, dropped rows included (site check's figures)
    ids, mask, labels = enc.dataset.tensors
    assert ids.shape[1] <= max_length
    assert bool(((labels != IGNORE).sum(dim=1) >= 1).all())  # every kept example keeps a response token

    long_prompts = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS[:4]])
    with pytest.raises(DataError, match=r"long.jsonl: every example's prompt fills model.max_length = 3 tokens \(longest prompt: 6\)"):
        encode_lm(tok, load_lm_table(long_prompts), max_length=3)


def test_chats_need_a_chat_template(tiny_lms, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ConfigError, match="no chat template"):
        encode_lm(load_lm_tokenizer(tiny_lms["gpt2"]), load_lm_table(path, LMDataSettings(messages_column="messages")), max_length=16)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yes"}], r"row 2 \(line 2\): column 'messages' message 2: role must be one of \['system', 'user', 'assistant'\], got \{'role': 'bot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"row 2 \(line 2\): column 'messages' message 2: content must be non-blank text"),
        ([{"role": "user", "content": "hi"}], r"row 2 \(line 2\): column 'messages': the last message .* must be the assistant's, got role 'user'"),
        ([], r"row 2 \(line 2\): column 'messages' must be a non-empty list"),
        ("nope", r"row 2 \(line 2\): column 'messages' is not a JSON list of messages"),
    ],
)
def test_a_bad_chat_is_refused_naming_file_row_column_and_value(tmp_path: Path, messages, message) -> None:  # type: ignore[no-untyped-def]
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    path = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": good}, {"messages": messages}])
    with pytest.raises(DataError, match=r"chats.jsonl " + message):
        load_lm_table(path, LMDataSettings(messages_column="messages"))


def test_collecting_mode_names_every_bad_chat_by_row_and_reason_without_quoting_it(tmp_path: Path) -> None:
    from fedtune.common.data import RowProblem

    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    bad = [[{"role": "user", "content": "zebra"}, {"role": "bot", "content": "quokka"}],
           [{"role": "user", "content": "zebra"}, {"role": "assistant", "content": "  "}],
           [{"role": "user", "content": "zebra"}], [{"role": "system", "content": "zebra"}, {"role": "assistant", "content": "quokka"}],
           [], "zebra quokka"]
    path = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in [good, *bad, good]])
    problems: list[RowProblem] = []

    table = load_lm_table(path, LMDataSettings(messages_column="messages"), problems=problems)

    assert len(table) == 2 and table.conversations[0] == table.conversations[1]
    assert [(p.where, p.column, p.reason) for p in problems] == [
        (f"{path} row {row} (line {row})", "messages", reason) for row, reason in [
            (2, "message 2: role must be one of ['system', 'user', 'assistant']"), (3, "message 2: content must be non-blank text"),
            (4, "must end with the assistant's answer, after a user message"),
            (5, "must end with the assistant's answer, after a user message"),
            (6, "is not a non-empty list of {role, content} messages"), (7, "is not a JSON list of messages")]]
    assert "zebra" not in repr(problems) and "quokka" not in repr(problems)


def test_collecting_mode_names_rows_that_encode_to_no_tokens_and_leaves_them_out(tiny_lms) -> None:  # type: ignore[no-untyped-def]
    from fedtune.common.causal_lm import ChatMessage, LMTable
    from fedtune.common.data import RowProblem

    tok = load_lm_tokenizer(tiny_lms["gpt2"])  # plain, no <s>: an empty prompt has no token
    pair = (ChatMessage("user", "bank card lost"), ChatMessage("assistant", "call us"))
    empty = (ChatMessage("user", ""), ChatMessage("assistant", "call us"))
    table = LMTable(conversations=[pair, empty, pair], source="mem", from_messages=False)
    problems: list[RowProblem] = []

    enc = encode_lm(tok, table, max_length=32, template="plain", problems=problems)

    assert problems == [RowProblem("mem row 2", "prompt", "encodes to no tokens")]
    assert enc.examples == 2 and enc.lengths == (6, 3, 6)  # 3 + 2 words + </s>; the empty prompt's 0 + 2 + </s>
    # The ledger's keys stay aligned with the dataset: the refused row is not among them.
    from fedtune.common.causal_lm import lm_record_digests
    from fedtune.common.lm_site import kept_digests

    distinct = LMTable(conversations=[pair, empty, (ChatMessage("user", "card stolen"), ChatMessage("assistant", "call us"))],
                       source="mem", from_messages=False)
    enc = encode_lm(tok, distinct, max_length=32, template="plain", problems=[])
    assert enc.refused_rows == (2,) and kept_digests(distinct, enc) == [lm_record_digests(distinct)[i] for i in (0, 2)]
    with pytest.raises(DataError, match="mem row 2: the prompt encodes to no tokens"):
        encode_lm(tok, table, max_length=32, template="plain")
    only_empty = LMTable(conversations=[empty], source="mem", from_messages=False)
    assert encode_lm(tok, only_empty, max_length=32, template="plain", problems=[]).examples == 0  # reported, not raised


def test_prompt_response_columns_are_configurable_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhow do i reset my pin,call us\nbank card lost,\n", encoding="utf-8")
    settings = LMDataSettings(prompt_column="question", response_column="answer")
    with pytest.raises(DataError, match=r"qa.csv row 2 \(line 3\): missing value in column 'answer'"):
        load_lm_table(path, settings)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt', 'response'\]; columns found: \['question', 'answer'\]"):
        load_lm_table(path)


def test_record_digests_key_a_pair_as_a_text_label_row(pairs_file: Path) -> None:
    from fedtune.common.data import record_digests

    table = load_lm_table(pairs_file)
    assert lm_record_digests(table) == record_digests([p for p, _ in PAIRS], [r for _, r in PAIRS])


# --- loss and per-example gradients ---------------------------------------------------------


def _oracle_loss(model: torch.nn.Module, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Mean of -log p(token_t | tokens_<t) over the response positions, one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -torch.stack([logp[t - 1, ids[t]] for t in range(prompt_len, len(ids))]).mean()


def _examples(enc) -> list[tuple[list[int], int]]:  # type: ignore[no-untyped-def]
    ids, mask, labels = enc.dataset.tensors
    out = []
    for i in range(len(ids)):
        n = int(mask[i].sum())
        out.append((ids[i, :n].tolist(), int((labels[i, :n] == IGNORE).sum())))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_is_the_mean_over_each_examples_response_tokens_then_over_examples(tiny_lms, pairs_file, kind) -> None:  # type: ignore[no-untyped-def]
    model = _lora_model(tiny_lms[kind], double=True).eval()
    enc = encode_lm(load_lm_tokenizer(tiny_lms[kind]), load_lm_table(pairs_file), max_length=32)
    batch = enc.dataset.tensors

    with torch.no_grad():
        per_example = lm_loss(model, batch, "none")
        oracle = torch.stack([_oracle_loss(model, ids, p) for ids, p in _examples(enc)])
        all_tokens = torch.stack([_oracle_loss(model, ids, 1) for ids, _ in _examples(enc)])
        mean, total = float(lm_loss(model, batch)), float(lm_loss(model, batch, "sum"))

    assert torch.allclose(per_example, oracle, atol=1e-10)
    assert mean == pytest.approx(float(oracle.mean()), abs=1e-10)
    assert total == pytest.approx(float(oracle.sum()), abs=1e-10)
    # Counting the prompt tokens would give another loss: the check above can fail.
    assert float((all_tokens - oracle).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_lm_head_runs_only_from_the_batchs_first_response_position(tiny_lms, pairs_file, kind) -> None:  # type: ignore[no-untyped-def]
    from opacus import GradSampleModule

    model = _lora_model(tiny_lms[kind], double=True).eval()
    ids, mask, labels = encode_lm(load_lm_tokenizer(tiny_lms[kind]), load_lm_table(pairs_file), max_length=32).dataset.tensors
    long_prompts = [i for i in range(len(ids)) if int((labels[i] != IGNORE).nonzero()[0]) >= 3]
    assert len(long_prompts) >= 2
    ids, mask, labels = ids[long_prompts], mask[long_prompts], labels[long_prompts]
    width = int(mask.sum(dim=1).max())
    first_target = int((labels[:, 1:] != IGNORE).any(dim=0).nonzero()[0])  # logits at t predict the token at t + 1
    assert first_target > 0, "the fixture's prompts must be long enough for this test to mean anything"
    head = model.get_output_embeddings()
    seen: list[int] = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            lm_loss(model, (ids, mask, labels))
            lm_loss(GradSampleModule(model), (ids, mask, labels))  # through Opacus's wrapper as in DP-SGD
    finally:
        handle.remove()
    assert seen == [width - first_target] * 2


def test_padding_ids_never_change_any_examples_loss(tiny_lms, pairs_file) -> None:  # type: ignore[no-untyped-def]
    model = _lora_model(tiny_lms["llama"], double=True).eval()
    ids, mask, labels = encode_lm(load_lm_tokenizer(tiny_lms["llama"]), load_lm_table(pairs_file), max_length=32).dataset.tensors
    junk = torch.randint(0, len(VOCAB), ids.shape, generator=torch.Generator().manual_seed(3))
    wide = torch.randint(0, len(VOCAB), (len(ids), 7), generator=torch.Generator().manual_seed(4))
    noisy_ids = torch.cat([torch.where(mask.bool(), ids, junk), wide], dim=1)
    noisy = (noisy_ids, torch.cat([mask, torch.zeros_like(wide)], 1), torch.cat([labels, torch.full_like(wide, IGNORE)], 1))
    with torch.no_grad():
        assert torch.allclose(lm_loss(model, (ids, mask, labels), "none"), lm_loss(model, noisy, "none"), atol=1e-12)


def _own_gradient(model: torch.nn.Module, ids: list[int], prompt_len: int) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(_oracle_loss(model, ids, prompt_len), list(params.values()))
    return dict(zip(params, grads))


def _padded(examples: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in examples])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in examples])
    labels = torch.tensor([[IGNORE] * p + x[p:] + [IGNORE] * (width - len(x)) for x, p in examples])
    return ids, mask, labels


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_opacus_per_example_gradients_equal_each_examples_own_gradient_whatever_its_neighbours(tiny_lms, pairs_file, kind) -> None:  # type: ignore[no-untyped-def]
    from opacus import GradSampleModule

    model = _lora_model(tiny_lms[kind], double=True)
    examples = _examples(encode_lm(load_lm_tokenizer(tiny_lms[kind]), load_lm_table(pairs_file), max_length=32))
    longest = max(examples, key=lambda e: len(e[0]))
    shortest = min(examples, key=lambda e: len(e[0]))
    # Padded when batched with the longest, the longer one when batched with the shortest.
    target = next(e for e in examples if len(shortest[0]) < len(e[0]) < len(longest[0]))
    assert len(longest[0]) > len(target[0]) > len(shortest[0])
    own = _own_gradient(model, *target)
    own_long = _own_gradient(model, *longest)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # embeddings and LM head stay frozen

    scale = max(float(g.abs().max()) for g in own.values())
    gs = GradSampleModule(model, loss_reduction="mean")
    try:
        for batch, checks in (([target, longest], {0: own, 1: own_long}), ([shortest, target], {1: own}), ([target, target, longest], {0: own, 1: own})):
            gs.zero_grad(set_to_none=True)
            for p in gs.parameters():
                p.grad_sample = None
            lm_loss(gs, _padded(batch, pad=0)).backward()
            named = dict(gs.named_parameters())
            for row, expected in checks.items():
                for name, grad in expected.items():
                    sample = named[f"_module.{name}"].grad_sample[row]
                    # Llama's RMSNorm computes in float32 even in a float64 model, so the 1/3 of a
                    # batch of 3 costs float32 rounding (~1e-7 relative); leakage would be O(1).
                    assert float((sample - grad).abs().max()) <= 1e-6 * scale, f"{kind} {name} row {row}"
        assert scale > 1e-4  # the gradients compared are not all zero
    finally:
        gs.to_standard_module()


# --- LoRA targets and the model ----------------------------------------------------------------


def _tiny(model_type: str) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2),
        "bloom": lambda: transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[model_type]())


@pytest.mark.parametrize(
    ("model_type", "attention", "mlp", "expected", "adapted_per_layer"),
    [
        ("llama", "qv", False, ("q_proj", "v_proj"), 2),
        ("llama", "all", True, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 7),
        ("mistral", "qv", True, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), 5),
        ("qwen2", "all", False, ("q_proj", "k_proj", "v_proj", "o_proj"), 4),
        ("qwen3", "qv", False, ("q_proj", "v_proj"), 2),
        ("gpt2", "qv", False, ("c_attn",), 1),
        ("gpt2", "all", True, ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"), 4),
        ("bloom", "qv", False, ("query_key_value",), 1),  # PEFT's own default
    ],
)
def test_lora_targets_are_inferred_per_architecture_and_fit_the_model(model_type, attention, mlp, expected, adapted_per_layer) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = _tiny(model_type)
    targets = lm_target_modules(base, attention=attention, mlp=mlp)
    assert targets == expected
    model = get_peft_model(base, LoraConfig(r=2, target_modules=list(targets), fan_in_fan_out=model_type == "gpt2"))
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 2 * adapted_per_layer


def test_an_unknown_architecture_is_refused_listing_its_linear_layers() -> None:
    class Mystery(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery"})()
            self.mix = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 8)

    with pytest.raises(ConfigError, match=r"model type 'mystery' .* set lora.target_modules to some of its linear layers: \['mix'\]"):
        lm_target_modules(Mystery())
    with pytest.raises(ConfigError, match="no LoRA targets known for model type 'bloom'"):
        lm_target_modules(_tiny("bloom"), mlp=True)  # PEFT's default has no MLP variant


def test_gpt2_conv1d_attention_is_adapted_with_its_transposed_layout(tiny_lms) -> None:  # type: ignore[no-untyped-def]
    model = build_causal_lm(tiny_lms["gpt2"], LoraSettings(rank=2, top_layers=0)).model
    layer = model.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out
    # PEFT's merged weight (Conv1D stores W transposed) gives the same outputs as the adapter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        x = torch.randn(1, 3, 32)
        before = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), before, atol=1e-5)


def test_top_layers_and_ffa_apply_to_causal_lms(tiny_lms) -> None:  # type: ignore[no-untyped-def]
    bundle = build_causal_lm(tiny_lms["llama"], LoraSettings(rank=4, top_layers=1), ffa=True, seed=5)
    assert bundle.exchanged and all(".layers.1." in k and "lora_B" in k for k in bundle.exchanged)
    with pytest.raises(ConfigError, match="lora.top_layers must be <= 2"):
        build_causal_lm(tiny_lms["llama"], LoraSettings(rank=4, top_layers=3))
    with pytest.raises(ConfigError, match=r"lora.target_modules \['nope'\] do not fit .*\(its linear layers: \['down_proj'"):
        build_causal_lm(tiny_lms["llama"], LoraSettings(rank=4, top_layers=0), target_modules=["nope"])


# --- DP-SGD through train_local ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dataset(tiny_lms, pairs_file):  # type: ignore[no-untyped-def]
    return encode_lm(load_lm_tokenizer(tiny_lms["llama"]), load_lm_table(pairs_file), max_length=32).dataset


def _trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().ravel() for p in model.parameters() if p.requires_grad])


def test_dp_with_zero_noise_and_a_clip_that_never_binds_equals_plain_training_over_many_steps(tiny_lms, lm_dataset) -> None:  # type: ignore[no-untyped-def]
    train = TrainConfig(batch_size=4, physical_batch_size=3, learning_rate=1e-2)
    plan = StepPlan(sample_rate=0.5, steps=12)
    plain, dp = _lora_model(tiny_lms["llama"]), _lora_model(tiny_lms["llama"])
    start = _trainable(plain)

    r_plain = train_local(plain, lm_dataset, train=train, plan=plan, dp=None, seed=3, loss_fn=task_loss("causal-lm"))
    r_dp = train_local(dp, lm_dataset, train=train, plan=plan, dp=DPSettings(noise_multiplier=0.0, clip_norm=1e6), seed=3, loss_fn=lm_loss)

    moved = float((_trainable(plain) - start).abs().max())
    assert moved > 1e-2
    assert float((_trainable(plain) - _trainable(dp)).abs().max()) < 1e-4 * max(1.0, moved)
    assert r_plain.loss == pytest.approx(r_dp.loss, rel=1e-4) and r_dp.clipped_fraction == 0.0


def _one_dp_step(model: torch.nn.Module, dataset, *, z: float, clip: float, lr: float, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The update direction of one DP-SGD step with q = 1 (every example), SGD: theta moves by -lr g."""
    train = TrainConfig(batch_size=len(dataset), physical_batch_size=3, learning_rate=lr, optimizer="sgd", weight_decay=0.0)
    before = _trainable(model)
    train_local(model, dataset, train=train, plan=StepPlan(sample_rate=1.0, steps=1), dp=DPSettings(noise_multiplier=z, clip_norm=clip),
                seed=seed, loss_fn=lm_loss)
    return (before - _trainable(model)) / lr


def _clipped_mean_oracle(model: torch.nn.Module, dataset, clip: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """sum_i g_i min(1, C / ||g_i||) / n, each g_i by autograd on example i alone, unpadded."""
    ids, mask, labels = dataset.tensors
    total = None
    for i in range(len(ids)):
        n = int(mask[i].sum())
        grads = _own_gradient(model, ids[i, :n].tolist(), int((labels[i, :n] == IGNORE).sum()))
        g = torch.cat([grads[name].double().ravel() for name, p in model.named_parameters() if p.requires_grad])
        g = g * min(1.0, clip / float(g.norm()))
        total = g if total is None else total + g
    assert total is not None
    return total / len(ids)


def test_dp_step_clips_each_examples_response_loss_gradient_to_c_and_averages_over_q_n(tiny_lms, lm_dataset) -> None:  # type: ignore[no-untyped-def]
    model = _lora_model(tiny_lms["llama"], double=True)  # float64: the step is read back from the weights
    clip = 0.05  # below every example's gradient norm: all are clipped
    expected = _clipped_mean_oracle(model, lm_dataset, clip)
    step = _one_dp_step(model, lm_dataset, z=0.0, clip=clip, lr=1.0, seed=1)
    # float32 rounding inside Llama's RMSNorm (see the Opacus test) bounds the agreement.
    assert float((step - expected).abs().max()) <= 1e-6 * clip
    unclipped = _clipped_mean_oracle(_lora_model(tiny_lms["llama"], double=True), lm_dataset, 1e9)
    assert float((unclipped - expected).abs().max()) > 1e-3  # clipping changed the update, so the check can fail


def test_dp_step_adds_gaussian_noise_of_std_z_c_over_q_n(tiny_lms, lm_dataset) -> None:  # type: ignore[no-untyped-def]
    """noise = step - clipped mean (the oracle above); its D coordinates have std z C / (q n).

    D s^2 / sigma^2 lies in the chi-square(D) interval at 1e-6 and the noise's mean in the normal
    interval at 1e-6: false-failure rate below 3e-6 (seeded, so deterministic).
    """
    from scipy import stats

    z, clip = 1.3, 0.05
    model = _lora_model(tiny_lms["llama"], double=True)
    clipped = _clipped_mean_oracle(model, lm_dataset, clip)
    noise = _one_dp_step(model, lm_dataset, z=z, clip=clip, lr=1.0, seed=2) - clipped
    sigma, d = z * clip / len(lm_dataset), len(noise)
    assert stats.chi2.ppf(5e-7, d) <= d * float((noise**2).mean()) / sigma**2 <= stats.chi2.ppf(1 - 5e-7, d)
    assert abs(float(noise.mean())) <= stats.norm.ppf(1 - 5e-7) * sigma / math.sqrt(d)


# --- generation and perplexity ----------------------------------------------------------------


def _greedy_oracle(model: torch.nn.Module, prompt_ids: list[int], steps: int, eos: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def test_greedy_generation_matches_a_token_by_token_argmax_whatever_the_batch(tiny_lms) -> None:  # type: ignore[no-untyped-def]
    model = _lora_model(tiny_lms["llama"]).eval()
    tok = load_lm_tokenizer(tiny_lms["llama"])
    prompts = ["what is the capital of france", "bank card lost", "yes", "patient reports pain for three days please"]

    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]

    with torch.no_grad():
        oracle = [_greedy_oracle(model, _ids(f"<|user|> {p} </s> <|assistant|>"), 6, VOCAB["</s>"]) for p in prompts]
    assert batched == single == [tok.decode(o, skip_special_tokens=True) for o in oracle]
    assert any(batched)


def test_perplexity_is_exp_of_the_token_weighted_response_loss(tiny_lms, pairs_file) -> None:  # type: ignore[no-untyped-def]
    model = _lora_model(tiny_lms["gpt2"], double=True)
    enc = encode_lm(load_lm_tokenizer(tiny_lms["gpt2"]), load_lm_table(pairs_file), max_length=32)

    result = evaluate_lm(model, enc.dataset, batch_size=3)

    with torch.no_grad():
        token_losses = []
        for ids, p in _examples(enc):
            token_losses.append(_oracle_loss(model, ids, p) * (len(ids) - p))
        tokens = sum(len(ids) - p for ids, p in _examples(enc))
    loss = float(sum(token_losses)) / tokens
    assert result.tokens == tokens and result.examples == len(PAIRS)
    assert result.loss == pytest.approx(loss, abs=1e-9)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-9)
    with torch.no_grad():
        example_weighted = float(lm_loss(model, enc.dataset.tensors))
    assert result.loss != pytest.approx(example_weighted, abs=1e-4)  # so the token weighting is what was checked


def test_task_loss_dispatches_by_task() -> None:
    from fedtune.common.tasks import classification_loss

    assert task_loss("causal-lm") is lm_loss and task_loss("classification") is classification_loss
    with pytest.raises(ConfigError, match=r"task must be one of \['classification', 'causal-lm'\], got 'regression'"):
        task_loss("regression")

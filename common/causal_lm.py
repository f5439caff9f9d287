"""The causal-LM task: prompt/response data -> tensors, the per-example loss DP-SGD clips, LoRA
targets per architecture, greedy generation and perplexity.

Loss. Each example's loss is the mean cross-entropy over its *response* tokens (labels -100 on the
prompt and on padding), and a batch's loss is the mean over examples. So every example weighs the
same in a DP-SGD step whatever its length (the sensitivity argument clips per example, not per
token), and no example's loss or gradient depends on its neighbours: with right padding and a
causal mask a real token never attends to a padded one, and padded positions are dropped before
the softmax, so their logits get an exactly zero gradient (tests check this under Opacus).
Evaluation reports the token-weighted mean (the usual definition of perplexity).

Truncation. An example is prompt tokens, then response tokens (+ EOS in the plain format), cut to
``max_length`` by dropping the end of the response: the prompt is kept whole, since it is what the
model conditions on. An example whose prompt alone fills ``max_length`` (no response token left)
is dropped and counted, not an error: one over-long record must not refuse a site's whole round.
:class:`EncodedLM` reports both counts and the dropped rows (numbers, never text).

Formats. ``template = "chat"`` renders a prompt as one user turn with the tokenizer's chat
template (a ``messages`` column: every turn but the last, which must be the assistant's answer
and is the only one trained on); ``"plain"`` feeds the prompt text as is; ``"auto"`` is chat when
the tokenizer has a template. Generation renders prompts the same way, so it conditions on what
training did.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .config import LoraSettings
from .data import RowProblem, load_table, read_records, record_digests
from .errors import ConfigError, DataError
from .lora_rank import site_lora_alpha
from .model import ADAPTER_NAME, ModelBundle, top_layer_indices, adapter_state, freeze_lora_a

logger = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that is not trained on (PyTorch's cross_entropy default)
TEMPLATES = ("auto", "chat", "plain")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, kw_only=True)
class LMDataSettings:
    """Where a causal-LM file keeps its examples and how they are rendered.

    Attributes:
        prompt_column: Column of the prompt (the input the model conditions on).
        response_column: Column of the response (the only tokens trained on).
        messages_column: If set, the file holds chats in this column instead: a list of
            {role, content} objects (roles system/user/assistant) ending with the assistant's
            answer; the prompt and response columns are then not read.
        template: 'chat', 'plain' or 'auto' (chat when the tokenizer has a chat template).
    """

    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = ""
    template: str = "auto"

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.template not in TEMPLATES:
            p.append(f"data.template must be one of {list(TEMPLATES)}, got {self.template!r}.")
        if not self.messages_column and self.prompt_column == self.response_column:
            p.append(f"data.prompt_column and data.response_column must differ, both are {self.prompt_column!r}.")
        return p


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


# One example: every turn but the last is the prompt, the last (the assistant's) the response.
Conversation = tuple[ChatMessage, ...]


@dataclass(frozen=True)
class LMTable:
    """Examples as loaded from one file, in file order (row k is ``conversations[k - 1]``)."""

    conversations: list[Conversation]
    source: str
    from_messages: bool

    def __len__(self) -> int:
        return len(self.conversations)


def load_lm_table(path: str | Path, settings: LMDataSettings = LMDataSettings(), *,
                  problems: list[RowProblem] | None = None) -> LMTable:
    """Load causal-LM examples from CSV, JSON Lines or Parquet (see :class:`LMDataSettings`).

    ``problems``: if given, every bad row is appended to it (``common.data.RowProblem``: where and why,
    never the value) and left out of the table, instead of raising on the first; a prompt/response
    row's blank prompt or response has ``blank`` set. What makes the whole file unreadable still raises.

    Raises:
        DataError: naming the file, row, column and value, for everything ``common.data.load_table``
            refuses, and for a chat that is not a list of {role, content} ending with an assistant turn.
    """
    config_problems = settings.problems()
    if config_problems:
        raise ConfigError(config_problems)
    if not settings.messages_column:
        table = load_table(path, text_column=settings.prompt_column, label_column=settings.response_column, problems=problems)
        convs = [(ChatMessage("user", p), ChatMessage("assistant", r)) for p, r in zip(table.texts, table.labels)]
        return LMTable(conversations=convs, source=table.source, from_messages=False)
    column = settings.messages_column
    convs, refused = [], 0
    for where, values in read_records(path, [column]):
        chat = read_chat(values[column])
        if isinstance(chat, ChatFault):
            if problems is None:
                raise DataError(f"{where}: column {column!r}{chat.message}.")
            problems.append(RowProblem(where, column, chat.reason))
            refused += 1
        else:
            convs.append(chat)
    if not convs and not refused:
        raise DataError(f"{path}: no data rows; expected one chat per row in column {column!r}.")
    return LMTable(conversations=convs, source=str(path), from_messages=True)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ChatFault:
    """Why a messages cell is not a chat, in two wordings of one rule.

    Attributes:
        reason: Never quoting the cell (``fedtune site check`` prints it, and it must not print data).
        message: The training path's words after "column 'x'", quoting the cell (the site's own log).
    """

    reason: str
    message: str


_ENDS = "must end with the assistant's answer, after a user message"


def read_chat(value: Any) -> Conversation | ChatFault:
    """The chat in one messages cell (a list of {role, content}, or a JSON string of one), or why it is not one."""
    if isinstance(value, str):  # a CSV cell holding the JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            return ChatFault("is not a JSON list of messages", f" is not a JSON list of messages ({err.msg}): {_short(value)}")
    if not isinstance(value, list) or not value:
        return ChatFault("is not a non-empty list of {role, content} messages",
                         f" must be a non-empty list of {{role, content}} messages, got {_short(value)}")
    messages = []
    for i, item in enumerate(value, start=1):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if role not in ROLES:
            why = f"message {i}: role must be one of {list(ROLES)}"
            return ChatFault(why, f" {why}, got {_short(item)}")
        if not isinstance(content, str) or not content.strip():
            why = f"message {i}: content must be non-blank text"
            return ChatFault(why, f" {why}, got {_short(item)}")
        messages.append(ChatMessage(role, content))
    if messages[-1].role != "assistant":
        return ChatFault(_ENDS, f": the last message is the response trained on and must be the assistant's, "
                                f"got role {messages[-1].role!r}")
    if not any(m.role == "user" for m in messages[:-1]):
        return ChatFault(_ENDS, ": no user message before the assistant's answer")
    return tuple(messages)


def lm_record_digests(table: LMTable) -> list[str]:
    """The privacy ledger's key per example (``common.data.record_digests``): a prompt/response row is
    keyed as a (text, label) row would be; a chat by its turns before the answer, and the answer."""
    prompts, responses = [], []
    for conv in table.conversations:
        if table.from_messages:
            prompts.append(json.dumps([[m.role, m.content] for m in conv[:-1]], ensure_ascii=False))
        else:
            prompts.append(conv[0].content)
        responses.append(conv[-1].content)
    return record_digests(prompts, responses)


def use_chat(tokenizer: Any, template: str, *, needed: bool = False) -> bool:
    if template not in TEMPLATES:
        raise ConfigError(f"data.template must be one of {list(TEMPLATES)}, got {template!r}.")
    has = bool(getattr(tokenizer, "chat_template", None))
    if (template == "chat" or needed) and not has:
        why = "chats (a messages column) are rendered with it" if needed else "data.template = 'chat'"
        raise ConfigError(f"the base model's tokenizer has no chat template, and {why}; use data.template = 'plain' "
                          "with prompt/response columns, or a model folder that has one.")
    return template == "chat" or (template == "auto" and has) or needed


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # Special tokens are in the rendered text (the chat template writes them) or added by hand.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer starts a text with it (Llama-2/3 do, GPT-2 and SmolLM2 do not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and list(tokenizer("", add_special_tokens=True)["input_ids"])[:1] == [bos] else []


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage], chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=True)
        return _tokens(tokenizer, text)
    return _bos(tokenizer) + _tokens(tokenizer, messages[-1].content)


def example_ids(tokenizer: Any, conv: Conversation, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example, tokenized apart so generation sees the same prompt."""
    prompt = _prompt_ids(tokenizer, conv[:-1], chat)
    if chat:
        head = tokenizer.apply_chat_template(_as_dicts(conv[:-1]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(_as_dicts(conv), tokenize=False)
        if not full.startswith(head):
            raise ConfigError("the tokenizer's chat template renders a chat's first turns differently once the answer is "
                              "added, so the response cannot be told apart; use data.template = 'plain'.")
        return prompt, _tokens(tokenizer, full[len(head):])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt, _tokens(tokenizer, conv[-1].content) + eos


@dataclass(frozen=True)
class EncodedLM:
    """Encoded examples: ``dataset`` holds (input ids, attention mask, labels), right-padded.

    Attributes:
        truncated: Examples kept with the end of their response cut at max_length.
        dropped_rows: 1-based rows left out because their prompt alone fills max_length.
        lengths: Every row's tokens (prompt + response) before truncation, in table order, dropped rows
            included: what ``fedtune site check`` reports against max_length.
        refused_rows: 1-based rows left out, in collecting mode only, because their prompt or response
            encodes to no tokens (``problems``); like ``dropped_rows``, not in ``dataset``.
    """

    dataset: TensorDataset
    truncated: int
    dropped_rows: tuple[int, ...] = field(default=())
    lengths: tuple[int, ...] = field(default=())
    refused_rows: tuple[int, ...] = field(default=())

    @property
    def examples(self) -> int:
        return len(self.dataset)


def encode_lm(tokenizer: Any, table: LMTable, *, max_length: int, template: str = "auto",
              problems: list[RowProblem] | None = None) -> EncodedLM:
    """Tokenize ``table`` for training and evaluation (see the module docstring for the rules).

    ``problems``: if given, a row whose prompt or response encodes to no tokens is appended to it
    (a ``RowProblem`` naming the row, never its text) and left out, instead of raising; and when
    such rows leave no example, the result has an empty dataset rather than raising. They are
    listed in ``refused_rows``, not ``dropped_rows``: such a result is for reports, not for training.

    Raises:
        DataError: if a row encodes to no tokens (without ``problems``), or no example keeps a response
            token (naming the file, max_length, the longest prompt).
        ConfigError: if chats need a chat template the tokenizer lacks, or ``max_length`` < 2.
    """
    if max_length < 2:
        raise ConfigError(f"model.max_length must be >= 2 for a causal LM (a prompt and a response token), got {max_length}.")
    chat = use_chat(tokenizer, template, needed=table.from_messages)
    rows: list[tuple[list[int], int]] = []  # (ids, prompt length)
    truncated, dropped, longest_prompt, lengths, refused = 0, [], 0, [], []
    for row, conv in enumerate(table.conversations, start=1):
        prompt, response = example_ids(tokenizer, conv, chat)
        longest_prompt = max(longest_prompt, len(prompt))
        lengths.append(len(prompt) + len(response))
        if not prompt or not response:
            part = "prompt" if not prompt else "response"
            if problems is None:
                raise DataError(f"{table.source} row {row}: the {part} encodes to no tokens.")
            problems.append(RowProblem(f"{table.source} row {row}", part, "encodes to no tokens"))
            refused.append(row)
            continue
        if len(prompt) >= max_length:
            dropped.append(row)
            continue
        ids = prompt + response
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        rows.append((ids, len(prompt)))
    if not rows and not refused:
        raise DataError(f"{table.source}: every example's prompt fills model.max_length = {max_length} tokens "
                        f"(longest prompt: {longest_prompt}); raise model.max_length.")
    if truncated or dropped:
        logger.warning("%s: %d of %d examples truncated to %d tokens, %d dropped (prompt alone fills it; rows %s)",
                       table.source, truncated, len(table), max_length, len(dropped), dropped[:10])
    width = max((len(ids) for ids, _ in rows), default=1)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return EncodedLM(dataset=TensorDataset(input_ids, mask, labels), truncated=truncated, dropped_rows=tuple(dropped),
                     lengths=tuple(lengths), refused_rows=tuple(refused))


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model under any Opacus/PEFT wrappers takes transformers' ``logits_to_keep`` (most causal
    LMs of transformers 5 do); one that does not computes every position's logits, as before."""
    inner = getattr(model, "_module", model)  # Opacus's GradSampleModule
    get_base = getattr(inner, "get_base_model", None)  # PEFT
    base = get_base() if callable(get_base) else inner
    return _forward_takes(type(base), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def response_token_losses(model: torch.nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of its response tokens' cross-entropy, and how many there are."""
    input_ids, attention_mask, labels = batch
    if attention_mask.numel():  # drop padding columns no example of this batch uses (right padding)
        width = max(1, int(attention_mask.sum(dim=1).max()))
        input_ids, attention_mask, labels = input_ids[:, :width], attention_mask[:, :width], labels[:, :width]
    targets = labels[:, 1:]  # the token at t is predicted from the logits at t - 1
    # The LM head (hidden x vocabulary, a fifth of SmolLM2's forward pass) and its softmax are needed only
    # where a response token is predicted: keep the batch's last positions from its earliest such one.
    # Exact: the kept logits are the same numbers, the dropped ones never reached the loss.
    wanted = (targets != IGNORE).any(dim=0).nonzero()
    first = int(wanted[0]) if len(wanted) else targets.shape[1]
    kwargs: dict[str, Any] = {}
    if first > 0 and _keeps_logits(model):
        kwargs["logits_to_keep"] = input_ids.shape[1] - first
        targets = targets[:, first:]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    keep = targets != IGNORE
    # Selecting the kept positions before the softmax gives every other logit an exactly zero
    # gradient (a masked multiply would not, were a padded logit ever inf or NaN).
    kept = logits[:, :-1][keep]
    kept = kept.to(torch.promote_types(kept.dtype, torch.float32))  # a half-precision softmax loses the loss
    token_loss = torch.nn.functional.cross_entropy(kept, targets[keep], reduction="none")
    rows = keep.nonzero(as_tuple=True)[0]
    sums = token_loss.new_zeros(len(input_ids)).index_add(0, rows, token_loss)
    return sums, keep.sum(dim=1)


def lm_loss(model: torch.nn.Module, batch: Sequence[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Each example's mean response-token loss; their mean ('mean'), sum ('sum') or each ('none').

    The ``LossFn`` of ``--task causal-lm`` (``common.tasks``): 'mean' is what Opacus's
    per-example gradients assume (``loss_reduction="mean"``).
    """
    sums, counts = response_token_losses(model, batch)
    per_example = sums / counts.clamp(min=1)
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@dataclass(frozen=True)
class LMEvalResult:
    """Held-out fit: ``loss`` is the mean over all response tokens, ``perplexity`` = exp(loss)."""

    loss: float
    perplexity: float
    tokens: int
    examples: int


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, dataset: TensorDataset, *, batch_size: int = 16) -> LMEvalResult:
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            sums, counts = response_token_losses(model, batch)
            total += float(sums.double().sum())
            tokens += int(counts.sum())
    finally:
        model.train(was_training)
    loss = total / max(tokens, 1)
    return LMEvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, examples=len(dataset))


# LoRA targets per model type: attention ("qv": query and value; "all": every attention projection)
# and the MLP. GPT-2's c_attn is one Conv1D computing q, k and v together.
_LLAMA_LIKE = {"qv": ("q_proj", "v_proj"), "all": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj")}
TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gpt2": {"qv": ("c_attn",), "all": ("c_attn", "attn.c_proj"), "mlp": ("c_fc", "mlp.c_proj")},
}
ATTENTION = ("qv", "all")


def _linear_names(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names - {"lm_head"})


def lm_target_modules(model: torch.nn.Module, *, attention: str = "qv", mlp: bool = False) -> tuple[str, ...]:
    """The LoRA target modules of a causal LM, by its ``config.model_type`` (see ``TARGETS``).

    An architecture not in ``TARGETS`` gets PEFT's own default (attention only) when PEFT has one;
    otherwise ConfigError lists the model's linear layers, to name in ``lora.target_modules``.
    """
    if attention not in ATTENTION:
        raise ConfigError(f"lora attention targets must be one of {list(ATTENTION)}, got {attention!r}.")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = TARGETS.get(str(model_type))
    if known is not None:
        return known[attention] + (known["mlp"] if mlp else ())
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    default = PEFT_DEFAULTS.get(str(model_type))
    if isinstance(default, list) and attention == "qv" and not mlp:
        return tuple(default)
    raise ConfigError(f"no LoRA targets known for model type {model_type!r} (known: {sorted(TARGETS)}); set "
                      f"lora.target_modules to some of its linear layers: {_linear_names(model)}.")


def load_lm_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def build_causal_lm(
    path: Path, lora: LoraSettings, *, target_modules: Sequence[str] | None = None, attention: str = "qv",
    mlp: bool = False, seed: int = 0, ffa: bool = False, site_rank: int | None = None,
) -> ModelBundle:
    """Load the causal LM in ``path`` (float32) and wrap it with LoRA; only LoRA matrices train.

    ``target_modules`` None infers them (:func:`lm_target_modules` with ``attention`` and ``mlp``);
    ``lora.target_modules`` and ``lora.train_head`` are the classifier's and are not read here.
    Embeddings and the LM head stay frozen. ``seed``, ``ffa`` and ``site_rank`` mean what they do
    in ``common.model.build_model``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    rank = lora.rank if site_rank is None else site_rank
    if not 1 <= rank <= lora.rank:
        raise ConfigError(f"a site's LoRA rank must be in [1, lora.rank = {lora.rank}], got {rank}.")
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    targets = tuple(target_modules) if target_modules else lm_target_modules(base, attention=attention, mlp=mlp)
    hit = [m for n, m in base.named_modules() if any(n == t or n.endswith(f".{t}") for t in targets)]
    conv1d = {isinstance(m, Conv1D) for m in hit}
    if len(conv1d) > 1:
        raise ConfigError(f"lora.target_modules {list(targets)} mix Conv1D and Linear layers; PEFT adapts them with "
                          "different weight layouts (fan_in_fan_out): target one kind.")
    config = LoraConfig(
        r=rank, lora_alpha=site_lora_alpha(lora.alpha, lora.rank, rank), lora_dropout=lora.dropout,
        target_modules=list(targets), layers_to_transform=top_layer_indices(base, lora.top_layers, path),
        fan_in_fan_out=conv1d == {True}, task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules {list(targets)} do not fit {path} (its linear layers: "
                          f"{_linear_names(base)}): {err}") from None
    if ffa:
        freeze_lora_a(model, seed=seed, run_rank=lora.rank)
    return ModelBundle(model=model, exchanged=tuple(adapter_state(model).keys()))


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
    template: str = "auto", batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``prompts``, each rendered as in training (one user turn or plain),
    decoded without special tokens. Batches are left-padded; the result does not depend on them."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    chat = use_chat(tokenizer, template)
    encoded = [_prompt_ids(tokenizer, (ChatMessage("user", p),), chat) for p in prompts]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            result = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in result[:, width:].tolist():
                stop = next((i for i, t in enumerate(row) if t in eos), len(row))
                out.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out

"""The coordinator's view of a causal-LM run: its held-out test split, perplexity, example generations.

In simulation the test split is the coordinator's (held out of the run's one table before it is
cut into sites). A deployed coordinator evaluates only when the run names a file of its own
(``fedtune run --task causal-lm --data FILE``, a path on the coordinator's machine; sites never
read it, they train on their own files): every row of it is the test set. Without one it
evaluates nothing here. Every figure and generation comes from held-out prompts; no site's text
is read.

Perplexity is exp of the token-weighted mean response loss (``common.causal_lm.evaluate_lm``).
ROUGE-L (``common.rouge``) scores greedy answers to the first held-out prompts against their
held-out responses, after the last round only.
The base model's is measured once with the adapter disabled (PEFT's ``disable_adapter``), so the
summary shows what fine-tuning bought on the same prompts and tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.common.causal_lm import EncodedLM, LMEvalResult, LMTable, encode_lm, evaluate_lm, generate, load_lm_tokenizer
from fedtune.common.config import RunConfig
from fedtune.common.io import atomic_write_bytes
from fedtune.common.lm_site import load_config_lm_table, prompt_texts, simulated_lm_split, subset
from fedtune.common.model import resolve_base_model
from fedtune.common.rouge import mean_rouge_l

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
GENERATION_EXAMPLES = 3
GENERATION_MAX_NEW_TOKENS = 48
# Greedy generation is the costly part of the final evaluation (ROUGE_EXAMPLES x 2 models x up to
# GENERATION_MAX_NEW_TOKENS forward passes): a fixed sample of the first held-out prompts.
ROUGE_EXAMPLES = 32


@dataclass(frozen=True)
class LMTestSet:
    """The run's held-out test split, as loaded and as encoded (``encoded.dropped_rows`` left out)."""

    table: LMTable
    encoded: EncodedLM
    tokenizer: Any
    template: str


def lm_test_set(run: RunConfig) -> LMTestSet:
    """The held-out split of a simulated causal-LM run (the same split its sites leave out), or the
    whole of a deployed run's ``data.path`` (the coordinator's own held-out file)."""
    table = load_config_lm_table(run.data)
    if run.simulation:
        split = simulated_lm_split(table, run.data, num_sites=run.federation.sites, seed=run.seed)
        test = subset(table, split.test, "held-out test split")
    else:
        test = subset(table, range(len(table)), "the coordinator's held-out file")
    tokenizer = load_lm_tokenizer(resolve_base_model(run.model, run.task))
    encoded = encode_lm(tokenizer, test, max_length=run.max_length, template=run.data.template)
    return LMTestSet(table=test, encoded=encoded, tokenizer=tokenizer, template=run.data.template)


def evaluate_base(model: torch.nn.Module, test: LMTestSet) -> LMEvalResult:
    """The base model's fit on the test split: the PEFT model with its adapter disabled."""
    with model.disable_adapter():  # type: ignore[operator]
        return evaluate_lm(model, test.encoded.dataset)


@dataclass(frozen=True)
class GenerationScore:
    """ROUGE-L F (mean over the scored held-out prompts) of the tuned and the base model's greedy answers."""

    tuned_rouge_l: float
    base_rouge_l: float
    examples: int


def score_generations(model: torch.nn.Module, test: LMTestSet, run_dir: Path, *, examples: int = ROUGE_EXAMPLES,
                      written: int = GENERATION_EXAMPLES, max_new_tokens: int = GENERATION_MAX_NEW_TOKENS) -> GenerationScore:
    """Greedy answers of the tuned and the base model to the first ``examples`` held-out prompts, scored
    with ROUGE-L against the held-out responses; the first ``written`` go to ``generations.jsonl``, one
    JSON object per line: prompt, reference, tuned, base."""
    count = min(examples, len(test.table.conversations))
    rows = test.table.conversations[:count]
    prompts = prompt_texts(subset(test.table, range(count), "generation prompts"))
    references = [conv[-1].content for conv in rows]
    tuned = generate(model, test.tokenizer, prompts, max_new_tokens=max_new_tokens, template=test.template)
    with model.disable_adapter():  # type: ignore[operator]
        base = generate(model, test.tokenizer, prompts, max_new_tokens=max_new_tokens, template=test.template)
    lines = [json.dumps({"prompt": p, "reference": r, "tuned": t, "base": b}, ensure_ascii=False)
             for p, r, t, b in list(zip(prompts, references, tuned, base))[:written]]
    atomic_write_bytes(run_dir / GENERATIONS_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
    return GenerationScore(tuned_rouge_l=mean_rouge_l(tuned, references), base_rouge_l=mean_rouge_l(base, references),
                           examples=count)

"""Load a model folder written by ``fedtune export`` with plain torch, transformers and PEFT.

fedtune is NOT needed: this file imports nothing of it and is copied into every export. It exists
because fedtune's classification head reads the attention-mask-weighted MEAN of the encoder's last
hidden state (sentence encoders such as all-MiniLM-L6-v2 are trained to be read that way), which no
transformers ``*ForSequenceClassification`` class does: a plain ``AutoModelForSequenceClassification``
load would pool the [CLS] token and silently give other predictions. The class below rebuilds the
same module tree (``encoder``, ``dropout``, ``classifier``), so the adapter's tensor names fit.

Command line (run from anywhere; labels and scores, or greedy generations, one per line)::

    python load_fedtune_export.py EXPORT_DIR "some text" "another text"
    python load_fedtune_export.py EXPORT_DIR --max-new-tokens 64 "a prompt"          # causal LM
    python load_fedtune_export.py EXPORT_DIR --base-model LOCAL_COPY_OF_BASE "text"  # adapter exports, offline

Python::

    import sys
    sys.path.insert(0, "EXPORT_DIR")
    from load_fedtune_export import load_export
    exported = load_export("EXPORT_DIR")                 # .model, .tokenizer, .labels, .task
    exported.predict(["some text"])                      # [("label", 0.93)]
    exported.generate(["a prompt"], max_new_tokens=64)   # causal LM: greedy, rendered as in training

An adapter export (``mode: adapter`` in ``fedtune.json``) names its base model by a portable id in
``adapter_config.json``; pass ``base_model=`` (a local folder) to load it without the Hugging Face
hub. A local folder is checked against the base's config fingerprint (sha256 of its
``config.json``, first 16 hex digits) recorded at export as ``base_model_id``.
"""

# No ``from __future__ import annotations``: the dataclass below must also work when this file is
# loaded with importlib without being registered in sys.modules.
import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "fedtune.json"
HEAD_FILE = "mean_pooling_head.safetensors"


class MeanPoolingClassifier(torch.nn.Module):
    """A linear head over the attention-mask-weighted mean of ``encoder``'s last hidden state."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # PEFT reads the base model's config
        dropout = getattr(encoder.config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(encoder.config, "hidden_dropout_prob", 0.0)
        self.dropout = torch.nn.Dropout(dropout)  # inactive in eval(); kept so the module tree matches training
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):  # type: ignore[no-untyped-def]
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def config_fingerprint(folder: str | Path) -> str:
    """The first 16 hex digits of the sha256 of ``folder/config.json`` (how fedtune names a base model)."""
    return hashlib.sha256((Path(folder) / "config.json").read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Export:
    """A loaded export: the model in eval mode, its tokenizer, and what ``fedtune.json`` says of it."""

    model: torch.nn.Module
    tokenizer: Any
    task: str
    labels: list[str]
    max_length: int
    template: str

    @torch.no_grad()
    def predict_proba(self, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities, one row per text (tokenized as in training: truncated at ``max_length``)."""
        self._need("classification")
        rows = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=self.max_length,
                                 padding="longest", return_tensors="pt")
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            rows.append(torch.softmax(logits, dim=-1))
        return torch.cat(rows)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """The most probable label of each text and its probability."""
        probs = self.predict_proba(texts)
        return [(self.labels[int(p.argmax())], float(p.max())) for p in probs]

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
        """Greedy continuations, each prompt rendered as training rendered it (one user turn of the
        chat template, or the plain text), cut at the first end-of-sequence token."""
        from transformers import GenerationConfig

        self._need("causal-lm")
        tok = self.tokenizer
        chat = self.template == "chat" or (self.template == "auto" and bool(getattr(tok, "chat_template", None)))
        encoded = []
        for prompt in prompts:
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                encoded.append(list(tok(text, add_special_tokens=False)["input_ids"]))
            else:  # BOS only where the tokenizer itself starts a text with it
                bos = [tok.bos_token_id] if tok.bos_token_id is not None and list(tok("")["input_ids"])[:1] == [tok.bos_token_id] else []
                encoded.append(bos + list(tok(prompt, add_special_tokens=False)["input_ids"]))
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        model_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                                  eos_token_id=sorted(eos) or None)
        out = []
        for start in range(0, len(encoded), batch_size):  # left-padded batches
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            result = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in result[:, width:].tolist():
                stop = next((i for i, t in enumerate(row) if t in eos), len(row))
                out.append(tok.decode(row[:stop], skip_special_tokens=True))
        return out

    def _need(self, task: str) -> None:
        if self.task != task:
            raise ValueError(f"this export is a {self.task} model; {task} models have this method.")


def load_export(folder: str | Path, *, base_model: str | None = None, check_base: bool = True) -> Export:
    """Load an export folder (either mode, either task).

    Args:
        folder: the folder ``fedtune export`` wrote.
        base_model: adapter exports only: a local folder (or hub id) of the base model, instead of
            the id in ``adapter_config.json``.
        check_base: refuse a local ``base_model`` folder whose config fingerprint is not the one
            recorded at export (another model: the adapter would load and predict nonsense).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    export = meta["export"]
    task, mode, pooling = meta.get("task", "classification"), export["mode"], meta.get("pooling", "cls")
    labels = list(meta.get("labels") or [])
    if mode == "merged":
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        elif pooling == "mean":
            from safetensors.torch import load_file

            model = MeanPoolingClassifier(AutoModel.from_pretrained(str(folder)), len(labels))
            model.classifier.load_state_dict(load_file(str(folder / HEAD_FILE)))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    elif mode == "adapter":
        from peft import PeftModel

        base = base_model or json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        # base_model_id: the key fedtune's own loader checks (common.model.model_fingerprint, computed alike).
        if check_base and Path(base).is_dir() and config_fingerprint(base) != meta["base_model_id"]:
            raise ValueError(f"{base} is not the base model this adapter was trained on: its config fingerprint is "
                             f"{config_fingerprint(base)}, the export records {meta['base_model_id']} "
                             f"({meta['base_model']}). Pass a copy of that model, or check_base=False.")
        label_map = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        elif pooling == "mean":
            model = MeanPoolingClassifier(AutoModel.from_pretrained(str(base)), len(labels))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(labels), **label_map)
        model = PeftModel.from_pretrained(model, str(folder))
    else:
        raise ValueError(f"{folder / MANIFEST}: export.mode must be 'adapter' or 'merged', got {mode!r}.")
    model.eval()
    return Export(model=model, tokenizer=AutoTokenizer.from_pretrained(str(folder)), task=task, labels=labels,
                  max_length=int(meta["max_length"]), template=str(meta.get("template", "auto")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Predict (classification) or generate (causal LM) with a fedtune export.")
    parser.add_argument("folder", help="the export folder")
    parser.add_argument("inputs", nargs="+", help="texts to classify, or prompts to continue")
    parser.add_argument("--base-model", help="adapter exports: a local copy (or hub id) of the base model")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: tokens to generate per prompt")
    args = parser.parse_args(argv)
    exported = load_export(args.folder, base_model=args.base_model)
    if exported.task == "causal-lm":
        for text in exported.generate(args.inputs, max_new_tokens=args.max_new_tokens):
            print(text.replace("\n", " ").strip())
    else:
        for text, (label, score) in zip(args.inputs, exported.predict(args.inputs)):
            print(f"{label}\t{score:.3f}\t{text}")


if __name__ == "__main__":
    sys.exit(main())

"""The model card (README.md) of a ``fedtune export`` folder: portable, and loadable without fedtune.

It keeps the original card's privacy guarantee and lineage (``server/report.py`` wrote them) with the
base model's path replaced by its portable reference, and replaces the card's "How to load", which
uses fedtune, by a code block that needs only torch, transformers and PEFT. That block's first lines
(``folder = ``, ``base = ``, ``texts = ``/``prompts = ``, ``max_new_tokens = ``) are the reader's to
change, and the export test runs it, so the card's code is known to give fedtune's predictions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.load_fedtune_export import HEAD_FILE

if TYPE_CHECKING:
    from fedtune.export import BaseReference

CARD_FILE = "README.md"


def original_card(adapter: Path) -> str | None:
    """The adapter's fedtune model card (``server/report.py``), or None for PEFT's template or none."""
    path = adapter / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if "\n## Privacy\n" in text and "- fedtune\n" in text else None


_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def export_card(original: str | None, manifest: dict[str, Any], *, tokenizer: Any, base_paths: list[str], ref: BaseReference) -> str:
    """The export's README.md: ``original``'s privacy guarantee and lineage, its base's path replaced
    by ``ref.name``, its "How to load" replaced by one that needs no fedtune."""
    export = manifest["export"]
    mode, task = export["mode"], manifest["task"]
    merged = mode == "merged"
    body = ""
    tags = ["lora", "fedtune", "federated-learning", "causal-lm" if task == "causal-lm" else "sequence-classification"]
    if original is not None:
        text = original
        for path in base_paths:  # longest first: a folder before its parent
            text = text.replace(path, ref.name)
        front = _FRONT.match(text)
        if front:
            tags = [line[2:].strip() for line in front.group(1).splitlines() if line.startswith("- ")] or tags
            text = text[front.end():]
        text = text.split("\n## How to load\n", 1)[0].rstrip() + "\n"
        lines = text.lstrip("\n").splitlines()
        body = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip("\n")
    else:
        body = ("No fedtune model card came with this adapter folder (a checkpoint's folder has PEFT's template, or none). "
                "Its privacy guarantee is the one of the run it came from, which counts every round each site trained: see "
                "that run's `privacy.json` and the model card of its final adapter.")
        if task != "causal-lm":
            body += "\n\n## Labels\n\n" + "\n".join(f"{i}. `{name}`" for i, name in enumerate(manifest["labels"]))
    if merged:
        tags = [t for t in tags if t != "lora"] + ["merged-lora"]
    what = "causal language model" if task == "causal-lm" else "text classifier"
    title = (f"# {what.capitalize()} with a LoRA adapter merged into `{ref.name}`, trained federated with fedtune" if merged
             else f"# LoRA adapter for a {what} on `{ref.name}`, trained federated with fedtune")
    lines = ["---", f"base_model: {ref.name}", f"library_name: {'transformers' if merged else 'peft'}", "tags:",
             *[f"- {t}" for t in tags], "---", "", title, "", body, "", "## This export", ""]
    lines += _export_lines(manifest, ref)
    lines += ["", "## How to load", "", *_load_lines(manifest, ref, tokenizer), ""]
    return "\n".join(lines)


def _export_lines(manifest: dict[str, Any], ref: BaseReference) -> list[str]:
    export = manifest["export"]
    if export["mode"] == "merged":
        what = ("The LoRA adapter is merged into the base model's weights (PEFT `merge_and_unload`): this folder is a "
                "complete model and needs no base model and no PEFT.")
    else:
        what = ("The LoRA adapter as trained (PEFT format); the base model's tokenizer is included, its weights are not: "
                f"`adapter_config.json` names the base `{ref.name}`.")
    lines = [f"Written by `fedtune export` (fedtune {export['fedtune_version']}). {what}", "",
             f"- Base model: {ref.note}"]
    if manifest["task"] == "causal-lm":
        lines.append(f"- Prompt template: `{manifest['template']}` (how training rendered a prompt); maximum length "
                     f"{manifest['max_length']} tokens.")
    else:
        lines.append(f"- Labels: {manifest['labels']} (in `fedtune.json`"
                     + (", and as `id2label`/`label2id` in `config.json`" if export["mode"] == "merged" else "")
                     + f"); maximum length {manifest['max_length']} tokens.")
        if manifest["pooling"] == "mean":
            lines.append("- Head: a linear layer over the attention-mask-weighted **mean** of the last hidden state, which no "
                         "transformers class computes: a plain `AutoModelForSequenceClassification` load would read the "
                         "[CLS] token and predict wrongly. Load it as below, or with `load_fedtune_export.py`."
                         + (f" The head's weights are in `{HEAD_FILE}`." if export["mode"] == "merged" else ""))
    lines.append("- `load_fedtune_export.py`: a small loader (torch, transformers, PEFT; no fedtune) with `predict` / "
                 "`generate` as fedtune computes them; run `python load_fedtune_export.py THIS_FOLDER \"text\"`.")
    return lines


def _load_lines(manifest: dict[str, Any], ref: BaseReference, tokenizer: Any) -> list[str]:
    """A code block that loads this export with no fedtune, ending with ``predictions`` [(label, score)]
    for a classifier or ``answers`` [str] for a causal LM. Its first lines (``folder = ``, ``base = ``,
    ``texts = ``/``prompts = ``, ``max_new_tokens = ``) are the reader's to change."""
    merged = manifest["export"]["mode"] == "merged"
    base_line = [] if merged else [f'base = "{ref.name}"  # the base model: {"its hub id, or " if ref.hub else ""}a local copy of it']
    head = ["```python", "import torch"]
    if manifest["task"] == "causal-lm":
        head += ([] if merged else ["from peft import PeftModel"]) + ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 'folder = "path/to/this/folder"', *base_line, 'prompts = ["a prompt"]', "max_new_tokens = 64", "",
                 "tokenizer = AutoTokenizer.from_pretrained(folder)"]
        if merged:
            head.append("model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()")
        else:
            head.append("model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder).eval()")
        chat = manifest["template"] == "chat" or (manifest["template"] == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        if chat:
            render = ['    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)',
                      "    ids = tokenizer(text, add_special_tokens=False)[\"input_ids\"]"]
        else:
            bos = tokenizer.bos_token_id is not None and list(tokenizer("")["input_ids"])[:1] == [tokenizer.bos_token_id]
            render = ["    ids = " + ("[tokenizer.bos_token_id] + " if bos else "") + "tokenizer(prompt, add_special_tokens=False)[\"input_ids\"]"]
        return head + [
            "answers = []",
            "for prompt in prompts:  # rendered as in training; greedy",
            *render,
            "    with torch.no_grad():",
            "        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),",
            "                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)",
            "    answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))",
            "```",
        ]
    tokenize = ['enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")']
    common = ['folder = "path/to/this/folder"', *base_line, 'texts = ["some text"]', f"max_length = {manifest['max_length']}", ""]
    if manifest["pooling"] == "mean" and not merged:
        return ["```python", "import sys", "", *common,
                "sys.path.insert(0, folder)  # the loader beside the weights: it defines the mean-pooling head, imports no fedtune",
                "from load_fedtune_export import load_export", "",
                "exported = load_export(folder, base_model=base)",
                "predictions = exported.predict(texts)  # [(label, probability)]", "```"]
    if manifest["pooling"] == "mean":
        return head + ["from safetensors.torch import load_file", "from transformers import AutoModel, AutoTokenizer", "", *common,
                       "encoder = AutoModel.from_pretrained(folder).eval()",
                       "tokenizer = AutoTokenizer.from_pretrained(folder)",
                       f'head = load_file(f"{{folder}}/{HEAD_FILE}")  # weight, bias of the linear head', *tokenize,
                       "with torch.no_grad():",
                       '    hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state',
                       '    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
                       "    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # the mean over real tokens",
                       '    probs = torch.softmax(pooled @ head["weight"].T + head["bias"], dim=-1)',
                       "predictions = [(encoder.config.id2label[int(p.argmax())], float(p.max())) for p in probs]", "```"]
    if merged:
        load = ["model = AutoModelForSequenceClassification.from_pretrained(folder).eval()"]
        imports = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer"]
    else:
        labels = manifest["labels"]
        imports = ["from peft import PeftModel", "from transformers import AutoModelForSequenceClassification, AutoTokenizer"]
        load = [f"labels = {labels!r}",
                "model = AutoModelForSequenceClassification.from_pretrained(",
                "    base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})",
                "model = PeftModel.from_pretrained(model, folder).eval()"]
    return head + imports + ["", *common, *load, "tokenizer = AutoTokenizer.from_pretrained(folder)", *tokenize,
                             "with torch.no_grad():",
                             '    probs = torch.softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, dim=-1)',
                             "predictions = [(model.config.id2label[int(p.argmax())], float(p.max())) for p in probs]", "```"]

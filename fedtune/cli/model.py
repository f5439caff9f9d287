"""Using a trained adapter: `fedtune evaluate`, `predict`, `generate` and `export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fedtune.cli.root import main, offline_env
from fedtune.serve_defaults import DEFAULT_NEW_TOKENS


def _load_adapter(adapter: str, base_model: str | None):  # type: ignore[no-untyped-def]
    from fedtune.inference import load_adapter

    return load_adapter(Path(adapter), base_model=base_model)


@main.command("evaluate")
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="Adapter folder (a run's adapter/ or checkpoints/round-N/).")
@click.option("--data", required=True, help="CSV, JSONL or Parquet with text and label columns (causal-lm: prompt and response).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--prompt-column", default="prompt", show_default=True, help="causal-lm adapters.")
@click.option("--response-column", default="response", show_default=True, help="causal-lm adapters.")
@click.option("--messages-column", default="", help="causal-lm adapters: a column of chats instead of prompt and response.")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
@click.option("--confusion", type=click.Path(dir_okay=False), metavar="PNG",
              help="Write the confusion matrix as a PNG [next to --json as NAME.confusion.png when --json is given].")
@click.option("--errors", "errors_out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the misclassified rows (text, true label, predicted label, score) to FILE (.csv or .jsonl), "
                   "readable by you only, for the site's domain experts.")
def evaluate_cmd(adapter: str, data: str, text_column: str, label_column: str, prompt_column: str, response_column: str,
                 messages_column: str, base_model: str | None, json_out: str | None, confusion: str | None,
                 errors_out: str | None) -> None:
    """Accuracy, macro-F1 and a per-class report of a trained adapter on labeled data; a causal-lm adapter's perplexity.

    Everything is computed and written on this machine: the report, the confusion matrix and the
    misclassified rows (the site's own text) are never sent anywhere.
    """
    offline_env()
    from fedtune.common.data import check_labels, load_table
    from fedtune.common.errors import ConfigError, LabelsMismatchError
    from fedtune.inference import adapter_task

    if adapter_task(Path(adapter)) == "causal-lm":
        if confusion or errors_out:
            flag = "--confusion" if confusion else "--errors"
            raise ConfigError(f"{flag} is for classification adapters; --adapter {adapter} is a causal-lm adapter (it has no labels).")
        out = _evaluate_lm(adapter, data, prompt_column, response_column, messages_column, base_model)
        click.echo(f"examples {out['examples']}  perplexity {out['perplexity']:.4f}  loss {out['loss']:.4f}")
        click.echo(json.dumps(out))
        if json_out:
            Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
        return
    from rich.console import Console

    from fedtune.evaluate_report import check_errors_path, confusion_path_beside, report_table, review, write_confusion_png, write_errors

    if errors_out:
        check_errors_path(Path(errors_out))  # before minutes of inference, not after
    loaded = _load_adapter(adapter, base_model)
    table = load_table(data, text_column=text_column, label_column=label_column)
    try:
        check_labels(table, loaded.labels)
    except LabelsMismatchError as err:
        raise LabelsMismatchError(f"--adapter {adapter} was trained on the labels {loaded.labels}; --data {err}") from None
    result = review(loaded, table)
    out = result.to_json()
    report = result.report
    click.echo(f"examples {report.examples}  accuracy {report.accuracy:.4f}  macro-F1 {out['macro_f1']:.4f}  loss {result.loss:.4f}")
    Console(soft_wrap=True).print(report_table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
    png = Path(confusion) if confusion else confusion_path_beside(Path(json_out)) if json_out else None
    if png is not None:
        click.echo(f"confusion matrix: {write_confusion_png(png, report)}")
    if errors_out:
        written = write_errors(Path(errors_out), result.errors)
        click.echo(f"misclassified rows: {len(result.errors)} written to {written} (the site's own text: keep it on premises)")
    click.echo(json.dumps(out))


def _evaluate_lm(adapter: str, data: str, prompt_column: str, response_column: str, messages_column: str,
                 base_model: str | None) -> dict[str, Any]:
    from fedtune.common.causal_lm import LMDataSettings, encode_lm, evaluate_lm, load_lm_table
    from fedtune.inference import load_lm_adapter

    loaded = load_lm_adapter(Path(adapter), base_model=base_model)
    settings = LMDataSettings(prompt_column=prompt_column, response_column=response_column, messages_column=messages_column,
                              template=loaded.template)
    encoded = encode_lm(loaded.tokenizer, load_lm_table(data, settings), max_length=loaded.max_length, template=loaded.template)
    result = evaluate_lm(loaded.model, encoded.dataset)
    return {"examples": result.examples, "tokens": result.tokens, "perplexity": result.perplexity, "loss": result.loss,
            "truncated": encoded.truncated, "dropped": len(encoded.dropped_rows)}


@main.command()
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="Adapter folder (a run's adapter/).")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.argument("texts", nargs=-1, required=True)
def predict(adapter: str, base_model: str | None, texts: tuple[str, ...]) -> None:
    """Label and probability for each TEXT."""
    offline_env()
    from fedtune.common.tasks import encode, predict_proba

    loaded = _load_adapter(adapter, base_model)
    dataset = encode(loaded.tokenizer, list(texts), [loaded.labels[0]] * len(texts), loaded.labels, max_length=loaded.max_length)
    probs = predict_proba(loaded.model, dataset)
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        click.echo(f"{loaded.labels[k]}\t{p[k]:.3f}\t{text}")


@main.command()
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="A causal-lm adapter folder (a run's adapter/).")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_NEW_TOKENS, show_default=True,
              help="Tokens to generate per prompt (serve's /generate has the same default).")
@click.argument("prompts", nargs=-1, required=True)
def generate(adapter: str, base_model: str | None, max_new_tokens: int, prompts: tuple[str, ...]) -> None:
    """Greedy continuation of each PROMPT by a causal-lm adapter (rendered as in training), one per line."""
    offline_env()
    from fedtune.common.causal_lm import generate as greedy
    from fedtune.inference import load_lm_adapter

    loaded = load_lm_adapter(Path(adapter), base_model=base_model)
    for text in greedy(loaded.model, loaded.tokenizer, list(prompts), max_new_tokens=max_new_tokens, template=loaded.template):
        click.echo(text.replace("\n", " ").strip())


@main.command("export")
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="Adapter folder (a run's adapter/ or checkpoints/round-N/).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create (an existing one must be empty).")
@click.option("--merge", is_flag=True, help="Merge LoRA into the base weights: a plain transformers model, no PEFT or base model needed.")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is not empty.")
def export_cmd(adapter: str, out: str, merge: bool, base_model: str | None, overwrite: bool) -> None:
    """A self-contained folder that plain transformers/PEFT load with no fedtune installed.

    The adapter (its base named by a portable id, the base's tokenizer beside it) or, with --merge,
    the merged model; the model card with the run's privacy guarantee; load_fedtune_export.py,
    which rebuilds fedtune's mean-pooling head (see the folder's README.md).
    """
    offline_env()
    from fedtune.export import export_adapter

    result = export_adapter(Path(adapter), Path(out), merge=merge, base_model=base_model, overwrite=overwrite)
    click.echo(f"exported {result.task} model ({result.mode}, base {result.base.name}) to {result.out}: {', '.join(result.files)}")


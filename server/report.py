"""The privacy report and model card of a finished run, built from its run directory alone.

Reads ``summary.json`` (per-site privacy as each site last reported it), ``metrics.jsonl`` (epsilon
per site after each round) and, where the summary lacks the accountant, ``config.toml``. Writes

```
RUN_DIR/privacy.json       per-site (epsilon, delta) and the knobs behind it, the max, epsilon per round
RUN_DIR/privacy.png        epsilon spent per site per round, each site's budget as a dashed line
RUN_DIR/adapter/README.md  the model card (replaces PEFT's generic template)
```

Figures are per site and their maximum, never a mean (a mean would hide the least protected site).
A run without DP reports ``epsilon_spent: null`` and says plainly that there is no guarantee:
0 would read as perfect privacy.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError
from fedtune.common.io import atomic_write_bytes, atomic_write_json, read_toml
from fedtune.server.records import read_metrics

logger = logging.getLogger(__name__)

REPORT_FILE = "privacy.json"
PLOT_FILE = "privacy.png"
CARD_FILE = "README.md"

ACCOUNTANT_NAMES = {
    "rdp": "RDP (Renyi DP, Mironov 2017; converted to (epsilon, delta) as in Balle et al. 2020)",
    "prv": "PRV (privacy random variables, Gopi, Lee, Wutschitz 2021)",
}
NO_DP_WARNING = (
    "This run trained WITHOUT differential privacy: there is no privacy guarantee for any site's data. "
    "The adapter may memorise and reveal training examples; use it as a baseline only."
)
_SITE_KEYS = ("site", "examples", "epsilon", "budget_epsilon", "delta", "noise_multiplier", "clip_norm",
              "sample_rate", "steps", "rounds")


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; RUN_DIR must be a finished run directory (it holds summary.json).")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}.") from None
    problems = [f"{path}: missing key {k!r}" for k in ("dp", "sites") if k not in summary]
    for i, site in enumerate(summary.get("sites") or []):
        missing = [k for k in _SITE_KEYS if k not in site]
        if missing:
            problems.append(f"{path}: sites[{i}] ({site.get('site', '?')}) lacks {missing}")
    if problems:
        raise ConfigError(problems)
    return summary


def _config_accountant(run_dir: Path) -> str | None:
    path = run_dir / "config.toml"
    if not path.is_file():
        return None
    try:
        return read_toml(path, what="run config").get("privacy", {}).get("accountant")
    except ConfigError as err:
        # Only a fallback: the summary is the record; a broken config must not hide the report.
        logger.warning("%s; accountant taken from summary.json only.", err)
        return None


def epsilon_upper(value: float) -> str:
    """``value`` rounded *up* to 2 decimals, so a stated bound is never below the accounted epsilon."""
    return f"{math.ceil(value * 100 - 1e-9) / 100:.2f}"


def build_privacy_report(run_dir: Path) -> dict[str, Any]:
    """The privacy report of the run in ``run_dir`` as a JSON-ready dict.

    Keys: ``dp``; ``level``; ``guarantee`` (one plain sentence); ``accountant``; ``delta`` and
    ``target_epsilon`` (the run's settings; null without DP); ``sites`` (one dict per site:
    site, examples, epsilon_spent, budget_epsilon, delta, noise_multiplier (z), clip_norm (C),
    sample_rate (q), steps, rounds, accountant); ``max_epsilon`` and ``max_epsilon_site``;
    ``epsilon_by_round`` ({site: [{round, epsilon}]}, only the rounds the site took part in);
    ``resumes`` (each resume after a coordinator crash: the checkpoint continued from, the round
    redone); ``warnings`` (inconsistencies found between the files, or a site over its budget).

    Raises:
        ConfigError: ``summary.json`` missing, unreadable, or lacking a required key.
    """
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    metrics = read_metrics(run_dir)
    dp = bool(summary["dp"])
    privacy = summary.get("privacy") or {}
    accountant = (privacy.get("accountant") or _config_accountant(run_dir)) if dp else None
    warnings: list[str] = []

    sites = []
    for s in sorted(summary["sites"], key=lambda s: s["site"]):
        sites.append({
            "site": s["site"],
            "examples": int(s["examples"]),
            # Without DP a site's "epsilon" is a placeholder 0; null says "unbounded", 0 would say "perfect".
            "epsilon_spent": float(s["epsilon"]) if dp else None,
            "budget_epsilon": float(s["budget_epsilon"]) if dp else None,
            "delta": float(s["delta"]) if dp else None,
            "noise_multiplier": float(s["noise_multiplier"]) if dp else None,
            "clip_norm": float(s["clip_norm"]) if dp else None,
            "sample_rate": float(s["sample_rate"]),
            "steps": int(s["steps"]),
            "rounds": int(s["rounds"]),
            "accountant": s.get("accountant", accountant) if dp else None,
        })

    epsilon_by_round: dict[str, list[dict[str, float]]] = {s["site"]: [] for s in sites}
    for line in sorted(metrics, key=lambda m: m.get("round", 0)):
        for site, eps in (line.get("epsilon_by_site") or {}).items():
            epsilon_by_round.setdefault(site, []).append({"round": int(line["round"]), "epsilon": float(eps)})

    max_epsilon: float | None = None
    max_site: str | None = None
    if dp and sites:
        top = max(sites, key=lambda s: s["epsilon_spent"])
        max_epsilon, max_site = top["epsilon_spent"], top["site"]
        for s in sites:
            if s["epsilon_spent"] > s["budget_epsilon"] * (1 + 1e-9):
                warnings.append(f"{s['site']} reports epsilon {s['epsilon_spent']:.4f} above its budget {s['budget_epsilon']:g}.")
            per_round = epsilon_by_round.get(s["site"]) or []
            if per_round and abs(per_round[-1]["epsilon"] - s["epsilon_spent"]) > 1e-9 * max(1.0, s["epsilon_spent"]):
                warnings.append(
                    f"{s['site']}: summary.json says epsilon {s['epsilon_spent']:.6f}, the last metrics.jsonl "
                    f"round says {per_round[-1]['epsilon']:.6f}."
                )
        deltas = {s["delta"] for s in sites}
        if len(deltas) > 1:
            warnings.append(f"sites use different delta values {sorted(deltas)}; compare their epsilons with care.")
    if dp and not sites:
        warnings.append("summary.json lists no sites: no site finished a round, so nothing was trained or spent.")
    missing = sorted(set(epsilon_by_round) - {s["site"] for s in sites})
    if missing:
        warnings.append(f"metrics.jsonl names sites {missing} that summary.json does not list.")

    return {
        "run_dir": str(run_dir),
        "dp": dp,
        "level": privacy.get("level", "sample-level DP-SGD at each site" if dp else "NONE: trained without differential privacy"),
        "guarantee": _guarantee(dp, max_epsilon, sites, accountant),
        "accountant": accountant,
        "target_epsilon": privacy.get("target_epsilon") if dp else None,
        "delta": privacy.get("delta") if dp else None,
        "rounds": summary.get("rounds"),
        "sites": sites,
        "max_epsilon": max_epsilon,
        "max_epsilon_site": max_site,
        "epsilon_by_round": epsilon_by_round,
        "client_level": summary.get("client_level"),
        "secure_aggregation": summary.get("secure_aggregation"),
        # Resumes after a coordinator crash: a round lost to the crash was charged by the sites that trained in it,
        # and their epsilon above includes it (their ledgers count every round noise was drawn for).
        "resumes": summary.get("resumes") or [],
        "warnings": warnings,
    }


SECURE_AGG_SENTENCE = (
    "Secure aggregation (Flower's SecAgg+) was on: in every round the coordinator saw only masked site "
    "updates and their example-weighted mean, never one site's adapter. It hides updates from the "
    "coordinator; it adds no differential privacy of its own."
)


def _guarantee(dp: bool, max_epsilon: float | None, sites: list[dict[str, Any]], accountant: str | None) -> str:
    if not dp:
        return NO_DP_WARNING
    if max_epsilon is None:
        return "No site trained, so no site's data was used."
    deltas = sorted({s["delta"] for s in sites})
    delta = f"{deltas[0]:g}" if len(deltas) == 1 else "each site's own delta (" + ", ".join(f"{d:g}" for d in deltas) + ")"
    name = ACCOUNTANT_NAMES.get(accountant or "", accountant or "an unnamed accountant")
    return (
        f"Each site's training data is protected by sample-level (epsilon, delta)-differential privacy with "
        f"epsilon <= {epsilon_upper(max_epsilon)} at delta = {delta}, from DP-SGD run at the site and accounted with {name}. "
        "The coordinator received adapter updates, each round's DP parameters and record counts rounded to two "
        "significant digits; the guarantee covers the adapter updates, the adapter and any validation statistics "
        "released under DP (charged to the same ledgers). The record counts are not covered (DP-SGD treats its "
        "sampling rate as public)." + _clear_sentence(sites)
    )


def _clear_sentence(sites: list[dict[str, Any]]) -> str:
    clear = sorted(s["site"] for s in sites if s.get("statistics") == "clear")
    if not clear:
        return ""
    return (f" Sites {', '.join(clear)} released exact training and validation statistics by their operator's opt-in; "
            "those are computed without noise and are not covered.")


def plot_privacy(report: dict[str, Any], path: Path) -> Path:
    """Epsilon spent per site per round, each distinct budget as a dashed line, to ``path`` (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if report["dp"]:
        for site, points in sorted(report["epsilon_by_round"].items()):
            if points:
                ax.plot([p["round"] for p in points], [p["epsilon"] for p in points], marker="o", label=site)
        budgets = sorted({s["budget_epsilon"] for s in report["sites"]})
        for b in budgets:
            ax.axhline(b, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"budget {b:g}", (0.01, b), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel="epsilon spent (cumulative)", ylim=(0, max([*budgets, report["max_epsilon"] or 0, 1e-9]) * 1.1))
        title = "Privacy spent per site"
        if report["max_epsilon"] is not None:
            title += f" (max {report['max_epsilon']:.3f} at delta {report['delta'] if report['delta'] is not None else '?'})"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if any(report["epsilon_by_round"].values()):
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "trained WITHOUT differential privacy:\nno privacy guarantee", ha="center", va="center",
                fontsize=12, color="darkred")
        ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_privacy_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/privacy.json`` (atomically) and ``RUN_DIR/privacy.png``; returns the JSON's path."""
    run_dir = Path(run_dir)
    report = build_privacy_report(run_dir)
    path = run_dir / REPORT_FILE
    atomic_write_json(path, report)
    plot_privacy(report, run_dir / PLOT_FILE)
    for warning in report["warnings"]:
        logger.warning("privacy report: %s", warning)
    return path


def model_card(summary: dict[str, Any], *, accountant: str | None = None, pooling: str = "cls",
               base_info: dict[str, Any] | None = None, lineage: list[dict[str, Any]] | None = None) -> str:
    """A README.md for the adapter folder: what it is, who trained it on how much, its privacy, how to load it.

    ``pooling`` is the head's (the adapter's ``fedtune.json``): a mean-pooling head is not a
    transformers class, so its card loads the adapter through fedtune. ``base_info`` is a causal
    base model's ``fedtune-base.json`` (``common/base_models.py``): where its weights came from.
    ``lineage`` is the ``fedtune.json`` list of the runs the adapter descends from (``--init-adapter``).
    """
    dp = bool(summary.get("dp"))
    privacy = summary.get("privacy") or {}
    accountant = privacy.get("accountant") or accountant
    base = summary.get("base_model", "UNKNOWN")
    task = summary.get("task", "sequence-classification")
    labels = list(summary.get("labels") or [])
    sites = sorted(summary.get("sites") or [], key=lambda s: s["site"])
    report_sites = [
        {**s, "epsilon_spent": float(s["epsilon"]) if dp else None, "delta": float(s["delta"]) if dp else None}
        for s in sites
    ]
    max_eps = max((s["epsilon_spent"] for s in report_sites), default=None) if dp else None
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags:",
        "- lora",
        "- fedtune",
        "- federated-learning",
        *(["- differential-privacy"] if dp else []),
        f"- {task}",
        "---",
        "",
        f"# LoRA adapter for {task}, trained federated with fedtune",
        "",
        (f"A LoRA adapter for the causal language model `{base}` (on its projection layers; its embeddings "
         "and LM head stay frozen), trained with federated learning " if task == "causal-lm" else
         f"A LoRA adapter (plus classification head) on top of `{base}`, trained with federated learning ")
        + f"(Flower, FedAvg) over {len(sites)} site(s) in {summary.get('rounds', '?')} round(s). "
        "No site's text left its premises; each site sent only adapter tensors and scalar metrics.",
        "",
        "## Privacy",
        "",
    ]
    if dp:
        lines += [_guarantee(True, max_eps, report_sites, accountant), ""]
        lines += ["| site | training examples (approx.) | epsilon spent | budget | delta | noise z | clip C | sample rate q | steps | statistics released |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in sites:
            lines.append(
                f"| {s['site']} | {s['examples']} | {s['epsilon']:.3f} | {s['budget_epsilon']:g} | {s['delta']:g} | "
                f"{s['noise_multiplier']:.3f} | {s['clip_norm']:g} | {s['sample_rate']:.2g} | {s['steps']} | {_statistics_text(s)} |"
            )
        lines += [
            "",
            "Sample-level means: one example (one row of a site's data) is protected. A person with many rows "
            "at a site, or rows at several sites, is protected with a weaker epsilon. Epsilon is per site, "
            "on that site's own data; the figure above is the largest across sites, not an average. "
            "It covers the records a site trained on and those its released validation statistics were computed on.",
            "",
            "Example counts are the sites' FedAvg weights, rounded to two significant digits: a site discloses its "
            "record count only at that precision.",
        ]
        clear = [s["site"] for s in sites if s.get("statistics") == "clear"]
        if clear:
            lines += ["", f"**Sites that released exact (not differentially private) statistics by their operator's opt-in: "
                      f"{', '.join(clear)}.** Those statistics are not covered by the epsilon above."]
    else:
        lines += [f"**WARNING: {NO_DP_WARNING}**"]
        lines += ["", "| site | training examples |", "|---|---:|"]
        lines += [f"| {s['site']} | {s['examples']} |" for s in sites]
    if summary.get("secure_aggregation"):
        lines += ["", SECURE_AGG_SENTENCE]
    lines += ["", f"Total training examples (approx.): {sum(int(s['examples']) for s in sites)}."]
    lines += _lineage_lines(lineage or [])
    if task == "causal-lm":
        return "\n".join(lines + _lm_card(summary, base, base_info))
    lines += ["", "## Labels", ""]
    lines += [f"{i}. `{name}`" for i, name in enumerate(labels)] or ["(not recorded)"]
    test = summary.get("test") or {}
    if test.get("accuracy") is not None:
        lines += ["", "## Evaluation", "",
                  f"Held-out test split (never trained on): accuracy {test['accuracy']:.3f}, "
                  + (f"macro-F1 {test['macro_f1']:.3f}." if test.get("macro_f1") is not None else "macro-F1 not recorded.")]
    if pooling == "mean":
        lines += [
            "",
            "## How to load",
            "",
            "The head reads the attention-mask-weighted mean of the last hidden state (`pooling: mean` in "
            "`fedtune.json`), which no transformers class does; fedtune rebuilds it and loads the adapter with "
            "`PeftModel.from_pretrained`:",
            "",
            "```python",
            "from pathlib import Path",
            "from fedtune.inference import load_adapter",
            "",
            'loaded = load_adapter(Path("path/to/this/adapter"))  # .model, .tokenizer, .labels',
            "```",
            "",
            'Or: `fedtune predict --adapter path/to/this/adapter "some text"`.',
            "",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f"labels = {labels!r}",
        "base = AutoModelForSequenceClassification.from_pretrained(",
        f'    "{base}", num_labels=len(labels),',
        "    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})",
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
        'Or with fedtune: `fedtune predict --adapter path/to/this/adapter "some text"`. '
        "`fedtune.json` beside this file holds the label names and maximum length.",
        "",
    ]
    return "\n".join(lines)


def _lm_card(summary: dict[str, Any], base: str, base_info: dict[str, Any] | None) -> list[str]:
    """A causal-LM card's base model, evaluation and loading sections (no labels; pooling does not apply)."""
    lines = ["", "## Base model", ""]
    if base_info:
        lines.append(
            f"`{base}` is a conversion made by fedtune of `{base_info.get('gguf_file', '?')}` from {base_info.get('source', '?')} "
            f"(licence {base_info.get('licence', '?')}). **Its weights are a dequantised 4-bit export "
            f"({base_info.get('quantisation', '?')}), not the original release**: expect it to score somewhat below "
            "the full-precision model. This adapter was trained on, and must be used with, that conversion."
        )
    else:
        lines.append(f"`{base}`, a local Hugging Face causal-LM folder.")
    test, before = summary.get("test") or {}, summary.get("base") or {}
    if test.get("perplexity") is not None:
        lines += ["", "## Evaluation", "",
                  "Held-out test split (never trained on), perplexity of the response tokens given their prompts "
                  f"(lower is better): **{test['perplexity']:.2f}** with this adapter"
                  + (f", {before['perplexity']:.2f} for the base model alone." if before.get("perplexity") is not None else ".")]
        if test.get("rouge_l") is not None:
            lines += ["", f"ROUGE-L F of greedy answers to the first {test.get('rouge_l_examples', '?')} held-out prompts against "
                      f"their held-out responses (higher is better): **{test['rouge_l']:.3f}** with this adapter"
                      + (f", {before['rouge_l']:.3f} for the base model alone." if before.get("rouge_l") is not None else ".")]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
        'Or with fedtune (greedy, prompts rendered as in training): `fedtune generate --adapter path/to/this/adapter "a prompt"`. '
        "`fedtune.json` beside this file holds the maximum length and the prompt template.",
        "",
    ]
    return lines


def write_model_card(run_dir: Path) -> Path:
    """Write ``RUN_DIR/adapter/README.md`` (atomically, replacing PEFT's generic card)."""
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise ConfigError(f"{adapter} not found; RUN_DIR must be a finished run directory holding adapter/.")
    summary = _read_summary(run_dir)
    path = adapter / CARD_FILE
    meta_path = adapter / "fedtune.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    from fedtune.common.base_models import converted_info

    base_info = None
    if summary.get("task") == "causal-lm":
        base_info = converted_info(Path(str(summary.get("base_model", "")))) or None
    lineage = meta.get("lineage") if isinstance(meta.get("lineage"), list) else None
    card = model_card(summary, accountant=_config_accountant(run_dir), pooling=str(meta.get("pooling", "cls")), base_info=base_info,
                      lineage=lineage)
    atomic_write_bytes(path, card.encode("utf-8"))
    return path


def _lineage_lines(lineage: list[dict[str, Any]]) -> list[str]:
    """The card's lineage: the runs this adapter continues from (``--init-adapter``), oldest first."""
    if not lineage:
        return []
    lines = ["", "## Lineage", "",
             "This run started from an earlier adapter, not from a fresh one. It descends from these runs, oldest first, "
             "each with the largest epsilon its sites reported. A site's ledger counts every run its records were trained "
             "in, so the epsilon above already includes the spend of these runs at that site (a simulation's sites continue "
             "the earlier simulation's ledgers).",
             "", "| run | adapter it left (sha256 of adapter_model.safetensors) | max epsilon |", "|---|---|---:|"]
    for entry in lineage:
        eps = entry.get("epsilon")
        digest = str(entry.get("digest", "")).removeprefix("sha256:")
        lines.append(f"| {entry.get('run_id', '?')} | `{digest[:16]}` | {'no DP or not recorded' if eps is None else epsilon_upper(float(eps))} |")
    return lines


def _statistics_text(site: dict[str, Any]) -> str:
    mode = site.get("statistics", "none")
    return {"none": "none", "dp": "validation, under DP", "clear": "**exact (operator opt-in, not DP)**"}.get(mode, mode)

"""Privacy commands: ``fedtune report`` (what each site spent) and ``fedtune audit`` (what an attacker finds).

Heavy imports stay inside the commands so ``--help`` is instant. Each command turns fedtune's own
errors into one line on stderr (exit 2) by itself, so it behaves the same standalone and inside the
main group.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from fedtune.cli.root import offline_env
from fedtune.common.errors import FedtuneError


class _Command(click.Command):
    """One line on stderr for fedtune's errors; the traceback only with the root group's --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedtuneError as err:
            root = ctx.find_root()
            if root.obj and root.obj.get("debug"):
                raise
            click.echo(f"fedtune: error: {err}", err=True)
            sys.exit(2)


_RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))


@click.command("report", cls=_Command)
@_RUN_DIR
def report(run_dir: Path) -> None:
    """Per-site privacy of a finished run: epsilon spent and budget, delta, z, C, q, steps, accountant.

    Writes RUN_DIR/privacy.json, RUN_DIR/privacy.png (epsilon per round per site, with budgets) and
    the adapter's model card RUN_DIR/adapter/README.md. Figures are per site and their maximum,
    never a mean.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fedtune.server.report import PLOT_FILE, write_model_card, write_privacy_report
    from fedtune.server.run_format import check_run_format

    check_run_format(run_dir, action="report on it")  # before anything is written into it
    json_path = write_privacy_report(run_dir)
    rep = json.loads(json_path.read_text(encoding="utf-8"))
    card = write_model_card(run_dir) if (run_dir / "adapter").is_dir() else None
    console = Console()
    if not rep["dp"]:
        console.print(f"[bold red]{rep['guarantee']}[/]")
    table = Table(title=f"Privacy per site ({rep['level']})", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="n: training examples, z: noise multiplier, C: clip norm, q: sample rate")
    for col in ("site", "n", "epsilon", "budget", "delta", "z", "C", "q", "steps", "accountant"):
        # Fold, never truncate with an ellipsis: a hidden digit would defeat the table's purpose.
        table.add_column(col, justify="left" if col in ("site", "accountant") else "right", overflow="fold",
                         no_wrap=col in ("site", "epsilon"))

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for s in rep["sites"]:
        table.add_row(
            s["site"], str(s["examples"]), fmt(s["epsilon_spent"], ".3f"), fmt(s["budget_epsilon"], "g"),
            fmt(s["delta"], "g"), fmt(s["noise_multiplier"], ".3f"), fmt(s["clip_norm"], "g"),
            fmt(s["sample_rate"], ".3f"), str(s["steps"]), s["accountant"] or "-",
        )
    console.print(table)
    if rep["dp"]:
        if rep["max_epsilon"] is not None:
            console.print(f"max epsilon over sites: {rep['max_epsilon']:.3f} ({rep['max_epsilon_site']})")
        console.print(rep["guarantee"], soft_wrap=True)
    client = rep.get("client_level")
    if client:
        console.print(
            f"client-level DP (DP-FedAvg): each site as a whole is protected with epsilon {client['epsilon']:.3f} "
            f"at delta {client['delta']:g} (S={client['clip_norm']:g}, z={client['noise_multiplier']:.3f}, "
            f"{client['expected_sites']:g} of {client['sites']} sites per round, {client['rounds']} rounds, {client['accountant']}; "
            f"{client['sampling']})",
            soft_wrap=True,
        )
    if rep.get("secure_aggregation"):
        from fedtune.server.report import SECURE_AGG_SENTENCE

        console.print(SECURE_AGG_SENTENCE, soft_wrap=True)
    for warning in rep["warnings"]:
        console.print(f"[yellow]warning: {warning}[/]")
    click.echo(f"wrote {json_path}, {run_dir / PLOT_FILE}" + (f", {card}" if card else " (no adapter/: no model card)"))


@click.command("audit", cls=_Command)
@_RUN_DIR
@click.option("--members", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Labeled examples the run trained on (CSV, JSONL, Parquet).")
@click.option("--non-members", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Labeled examples from the same distribution the run never saw.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results to this JSON file.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--max-examples", type=click.IntRange(min=1), help="Use at most N examples of each set (a seeded sample).")
@click.option("--resamples", type=click.IntRange(min=1), default=1000, show_default=True, help="Bootstrap resamples for the 95% intervals.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsample and the bootstrap.")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
def audit(run_dir: Path, members: Path, non_members: Path, json_out: Path | None, text_column: str, label_column: str,
          max_examples: int | None, resamples: int, seed: int, base_model: str | None) -> None:
    """Membership-inference audit of RUN_DIR/adapter: the loss-threshold attack (Yeom et al. 2018).

    Scores each example by minus its loss under the final adapter and reports how well that tells
    --members (training data) from --non-members: ROC AUC and TPR at 1% FPR, with 95% bootstrap
    intervals. AUC 0.5 and TPR 0.01 are chance. A weak attack finding nothing is not a proof of
    privacy; the DP guarantee is the proof, the audit a sanity check.
    """
    from fedtune.audit import run_audit
    from fedtune.server.run_format import check_run_format

    offline_env()
    check_run_format(run_dir, action="audit it")
    result = run_audit(run_dir, members=members, non_members=non_members, text_column=text_column,
                       label_column=label_column, max_examples=max_examples, resamples=resamples, seed=seed,
                       base_model=base_model)
    out = result.to_json()
    dp_bound = _dp_tpr_bound(run_dir)
    if dp_bound is not None:
        out["dp_tpr_bound_at_1pct_fpr"] = dp_bound
    a, t = result.auc, result.tpr_at_1pct_fpr
    click.echo(f"members {result.members}, non-members {result.non_members}  "
               f"(mean loss {result.mean_loss_members:.4f} vs {result.mean_loss_non_members:.4f})")
    click.echo(f"AUC            {a.value:.4f}  95% CI [{a.ci_low:.4f}, {a.ci_high:.4f}]   (chance 0.5)")
    click.echo(f"TPR @ 1% FPR   {t.value:.4f}  95% CI [{t.ci_low:.4f}, {t.ci_high:.4f}]   (chance 0.01)")
    if dp_bound is not None:
        click.echo(f"DP bound on TPR @ 1% FPR for the least protected site: {dp_bound:.4f} (min(1, e^eps * 0.01 + delta))")
    if result.non_members < 100:
        click.secho(f"note: with {result.non_members} non-members, 1% FPR allows no false positive: the TPR is at 0 FPR.",
                    fg="yellow", err=True)
    if result.overlap:
        click.secho(f"warning: {result.overlap} (text, label) rows are in both sets; the attack cannot tell those apart.",
                    fg="yellow", err=True)
    click.echo(f"method: {result.method}")
    click.echo(json.dumps(out))
    if json_out:
        from fedtune.common.io import atomic_write_json

        atomic_write_json(json_out, out)


def _dp_tpr_bound(run_dir: Path) -> float | None:
    """min(1, e^eps * FPR + delta) at FPR 1% for the site with the largest epsilon (Kairouz et al. 2015)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    try:
        if not summary.get("dp") or not summary.get("sites"):
            return None
        top = max(summary["sites"], key=lambda s: float(s["epsilon"]))
        return min(1.0, math.exp(float(top["epsilon"])) * 0.01 + float(top["delta"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        # A summary without per-site epsilon (another fedtune's): the audit stands without the bound.
        click.secho(f"note: {path} lacks per-site epsilon and delta; no DP bound is shown.", fg="yellow", err=True)
        return None

"""Privacy commands: ``fedtune report`` (what each site spent), ``fedtune audit`` (what an attacker finds) and
``fedtune audit-canary`` (an empirical lower bound on epsilon from one training run).

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

from fedtune.cli.options import resolve_config, run_options, with_flags
from fedtune.cli.root import main, offline_env
from fedtune.common.errors import ConfigError, FedtuneError


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
@click.option("--attack", type=click.Choice(["loss", "rmia"]), default="loss", show_default=True,
              help="loss: loss threshold; rmia: RMIA offline (needs --reference and --population).")
@click.option("--reference", "references", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="RMIA: a finished run dir (adapter/) trained like RUN_DIR on other rows of the same distribution, none "
                   "of them audited or in --population. Repeatable; each costs one training run.")
@click.option("--population", type=click.Path(dir_okay=False, path_type=Path),
              help="RMIA: labeled rows z of the same distribution that no model trained on, disjoint from both sets.")
@click.option("--rmia-a", type=float, help="RMIA's offline correction a in [0, 1]: Pr(x) = ((1+a) mean_ref + 1-a) / 2 [0.3].")
@click.option("--rmia-gamma", type=float, help="RMIA's threshold gamma > 0 on LR(x, z) [1].")
def audit(run_dir: Path, members: Path, non_members: Path, json_out: Path | None, text_column: str, label_column: str,
          max_examples: int | None, resamples: int, seed: int, base_model: str | None, attack: str,
          references: tuple[Path, ...], population: Path | None, rmia_a: float | None, rmia_gamma: float | None) -> None:
    """Membership-inference audit of RUN_DIR/adapter: the loss-threshold attack (Yeom et al. 2018), or RMIA.

    Scores each example by minus its loss under the final adapter and reports how well that tells
    --members (training data) from --non-members: ROC AUC (95% bootstrap interval) and TPR at 0.1%
    and 1% FPR (exact Clopper-Pearson intervals), the latter only with at least 10 / FPR
    non-members; draws the ROC curve on log-log axes (RUN_DIR/audit-roc.png). AUC 0.5 and TPR = FPR
    are chance. A weak attack finding nothing is not a proof of privacy; the DP guarantee is the
    proof, the audit a sanity check (`fedtune audit-canary` gives an epsilon lower bound).

    --attack rmia (Zarifzadeh et al. 2024, offline): a stronger attack that asks whether the run raised
    x's probability more than that of population rows z, relative to reference models that never saw
    x: score(x) = fraction of --population rows z with (Pr(x|run)/Pr(x)) / (Pr(z|run)/Pr(z)) > gamma,
    Pr(.) from the --reference runs. Each --reference is a finished run directory trained with the
    target's settings (same base model and labels) on other rows of the same distribution that
    exclude the members, non-members and population: one full training run per reference (1 works,
    2-4 are better). ROC curve: RUN_DIR/audit-rmia-roc.png.
    """
    from fedtune.audit import ROC_FILE, run_audit
    from fedtune.server.run_format import check_run_format

    offline_env()
    check_run_format(run_dir, action="audit it")
    if attack == "rmia":
        from fedtune.audit_rmia import ROC_FILE as RMIA_ROC, RmiaSettings, run_rmia_audit

        settings = RmiaSettings(**{k: v for k, v in (("a", rmia_a), ("gamma", rmia_gamma)) if v is not None})
        for ref in references:
            check_run_format(ref, action="use it as a --reference")
        rmia = run_rmia_audit(run_dir, members=members, non_members=non_members, references=references, population=population,
                              settings=settings, text_column=text_column, label_column=label_column, max_examples=max_examples,
                              resamples=resamples, seed=seed, base_model=base_model, roc_png=run_dir / RMIA_ROC)
        result, out = rmia.result, rmia.to_json()
        click.echo(f"attack RMIA (offline): {len(references)} reference run(s), {rmia.population} population rows, "
                   f"a {settings.a:g}, gamma {settings.gamma:g}")
    else:
        given = [flag for flag, value in (("--reference", references), ("--population", population), ("--rmia-a", rmia_a),
                                          ("--rmia-gamma", rmia_gamma)) if value not in (None, ())]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --attack rmia, got --attack {attack}; add --attack rmia or drop them.")
        result = run_audit(run_dir, members=members, non_members=non_members, text_column=text_column,
                           label_column=label_column, max_examples=max_examples, resamples=resamples, seed=seed,
                           base_model=base_model, roc_png=run_dir / ROC_FILE)
        out = result.to_json()
    top = _least_protected_site(run_dir)
    if top is not None:
        out["dp_tpr_bound"] = {f"{row.fpr:g}": _dp_tpr_bound(top, row.fpr) for row in result.low_fpr}
    a = result.auc
    click.echo(f"members {result.members}, non-members {result.non_members}  "
               f"(mean loss {result.mean_loss_members:.4f} vs {result.mean_loss_non_members:.4f})")
    click.echo(f"AUC              {a.value:.4f}  95% CI [{a.ci_low:.4f}, {a.ci_high:.4f}]   (chance 0.5)")
    for row in result.low_fpr:
        name = f"TPR @ {row.fpr:.1%} FPR".replace(".0%", "%")
        if not row.reported or row.tpr_ci is None or row.fpr_ci is None:
            click.echo(f"{name:<16} n/a (needs {row.non_members_needed} non-members, have {result.non_members})")
            continue
        bound = "" if top is None else f"; DP bound {_dp_tpr_bound(top, row.fpr):.4f}"
        click.echo(f"{name:<16} {row.tpr:.4f}  95% CP [{row.tpr_ci[0]:.4f}, {row.tpr_ci[1]:.4f}]   (chance {row.fpr:g}; "
                   f"FPR reached {row.fpr_reached:.4f} [{row.fpr_ci[0]:.4f}, {row.fpr_ci[1]:.4f}]{bound})")
    if top is not None:
        click.echo(f"DP bound: min(1, e^eps * FPR + delta) for the least protected site {top[0]} (eps {top[1]:.3f}, delta {top[2]:g})")
    click.echo(f"ROC curve (log-log): {result.roc_png}")
    if result.overlap:
        click.secho(f"warning: {result.overlap} (text, label) rows are in both sets; the attack cannot tell those apart.",
                    fg="yellow", err=True)
    click.echo(f"method: {result.method}")
    click.echo(json.dumps(out))
    if json_out:
        from fedtune.common.io import atomic_write_json

        atomic_write_json(json_out, out)


@main.command("audit-canary", cls=_Command)
@run_options
@click.option("--sites", type=int, help="Number of simulated sites [3]; 1 makes the white-box audit see the site's own update.")
@click.option("--min-sites", type=int, help="Minimum sites sampled per round [2].")
@click.option("--partition", help="How sites split the data: iid | dirichlet:ALPHA | column:NAME [iid].")
@click.option("--canaries", "num_canaries", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Canaries m, each included with probability 1/2.")
@click.option("--canary-site", type=click.IntRange(min=0), default=0, show_default=True, help="The simulated site that trains on them.")
@click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95, show_default=True)
@click.option("--white-box/--black-box-only", default=True, show_default=True,
              help="Also score the per-round adapter updates (a gradient per canary per round).")
def audit_canary(config_file: str | None, num_canaries: int, canary_site: int, confidence: float, white_box: bool,
                 **flags: Any) -> None:
    """One-run privacy audit (Steinke, Nasr, Jagielski 2023): an empirical lower bound on epsilon.

    Draws --canaries random-text, random-label canaries, includes each with probability 1/2 in the
    training rows of simulated site --canary-site, trains once exactly as `fedtune simulate` does
    (same flags), then guesses the top-k scored canaries "in" and the bottom-k "out" and reports the
    largest epsilon those guesses refute at --confidence, next to the site's theoretical epsilon.
    Black-box score: the final adapter's loss on each canary; white-box: the per-round adapter
    updates projected on each canary's gradient. A DP run whose lower bound exceeds its epsilon
    fails (exit 2): the guarantee or the audit is broken. Use --no-dp for the positive control.
    """
    from fedtune.canary_audit import RESULT_FILE, check_bound, run_canary_audit
    from fedtune.common.io import check_writable
    from fedtune.simulations.simulate import preflight

    offline_env()
    run = resolve_config(config_file, "audit-canary", **flags)
    try:
        preflight(run)
    except ConfigError as err:
        raise ConfigError(with_flags(err.problems, flags)) from None
    check_writable(Path(run.out).resolve(), what="run directory (--out)")
    result = run_canary_audit(run, canaries=num_canaries, canary_site=canary_site, white_box=white_box,
                              confidence=confidence, check=False)  # checked below, once the figures are shown
    run_dir, bb = result.run_dir, result.black_box
    click.echo(f"canary audit of {run_dir}: {bb.canaries} canaries ({bb.included} included) at {result.site}, "
               f"{bb.confidence:.0%} confidence, delta {result.delta:g}")
    theory = f"{result.epsilon:.3f}" if result.epsilon is not None else "infinite (no DP)"
    click.echo(f"theoretical epsilon ({result.site}):        {theory}")
    for name, audit_ in (("black-box (final loss)", bb), ("white-box (updates)", result.white_box)):
        if audit_ is not None:
            best = audit_.best
            click.echo(f"empirical lower bound, {name:<22} {audit_.epsilon_lower_bound:.3f}   "
                       f"(k={best.k_in}: {best.correct} of {best.guesses} guesses right; best of {len(audit_.candidates)} k, Bonferroni)")
    click.echo(f"wrote {run_dir / RESULT_FILE}")
    check_bound(result)


def _least_protected_site(run_dir: Path) -> tuple[str, float, float] | None:
    """(site, epsilon, delta) of the site with the largest epsilon in RUN_DIR/summary.json; None without DP."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    try:
        if not summary.get("dp") or not summary.get("sites"):
            return None
        top = max(summary["sites"], key=lambda s: float(s["epsilon"]))
        return str(top["site"]), float(top["epsilon"]), float(top["delta"])
    except (AttributeError, KeyError, TypeError, ValueError):
        # A summary without per-site epsilon (another fedtune's): the audit stands without the bound.
        click.secho(f"note: {path} lacks per-site epsilon and delta; no DP bound is shown.", fg="yellow", err=True)
        return None


def _dp_tpr_bound(site: tuple[str, float, float], fpr: float) -> float:
    """min(1, e^eps * FPR + delta): no attack on an (eps, delta)-DP run does better (Kairouz et al. 2015)."""
    return min(1.0, math.exp(site[1]) * fpr + site[2])

"""`fedtune simulate` (N sites on this machine) and `fedtune run` (a federated run on deployed sites)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fedtune.cli.options import (
    parse_fail_sites,
    resolve_config,
    resume_config,
    resume_options,
    run_options,
    with_flags,
)
from fedtune.cli.root import main, offline_env
from fedtune.common.errors import ConfigError


def _resume_or_resolve(config_file: str | None, flags: dict[str, Any], *, simulation: bool) -> tuple[Path | None, Any]:
    """Pop --resume/--allow-change from flags; the resumed run's config, or the one the flags and file give."""
    resume, allow_change = flags.pop("resume"), flags.pop("allow_change")
    if resume:
        return resume, resume_config(resume, config_file, allow_change, simulation=simulation, **flags)
    if allow_change:
        raise ConfigError("--allow-change is for --resume RUN_DIR only.")
    return None, resolve_config(config_file, "sim" if simulation else "run", **flags)


@main.command()
@resume_options
@run_options
@click.option("--sites", type=int, help="Number of simulated sites [3].")
@click.option("--partition", help="How sites split the data: iid | dirichlet:ALPHA | column:NAME [iid].")
@click.option("--min-sites", type=int, help="Minimum sites sampled per round [2].")
@click.option("--fraction-train", type=float, help="Fraction of sites sampled each round [1].")
@click.option("--site-ranks", help="LoRA rank each simulated site trains, one per site, each <= --lora-rank, e.g. 8,4,4,2; "
              "the coordinator pads lower ranks with the global adapter's values (HetLoRA-style) [every site: --lora-rank].")
@click.option("--fail-site", "fail_sites", multiple=True, metavar="NAME@ROUND[:crash|hang|refuse]",
              help="Inject a fault, repeatable: simulated site NAME (site-0, site-1, ...) crashes (after its ledger charge), "
                   "hangs past the round deadline (federation.round_timeout) or refuses in round ROUND [crash].")
@click.option("--ray-address", metavar="HOST:PORT",
              help="Run the simulated sites on an existing Ray cluster (its head's address, as `ray start --head` printed it; "
                   "every node needs this fedtune installed and the data at the same path) [a Ray started on this machine].")
@click.option("--verbose", is_flag=True, default=False,
              help="Also show Flower's and Ray's logs and third-party warnings here; they always go to RUN_DIR/log.txt.")
def simulate(config_file: str | None, ray_address: str | None, verbose: bool, **flags: Any) -> None:
    """Simulate N sites on this machine through Flower's simulation engine.

    With no flags: the packaged clinical triage demo, 3 sites, DP on (epsilon 8, delta 1e-5).
    Writes the run directory: adapter/, checkpoints/round-N/, metrics.jsonl, summary.json,
    config.toml and report.png. After a crash, `--resume RUN_DIR` continues from the last
    complete checkpoint.
    """
    offline_env()
    if ray_address:  # at once: Ray itself would retry an address nothing answers at for minutes
        from fedtune.simulations.console import check_reachable

        check_reachable(ray_address)
    flags["fail_sites"] = parse_fail_sites(flags.pop("fail_sites"))
    resume, run = _resume_or_resolve(config_file, flags, simulation=True)
    checked = None
    if not resume:
        from fedtune.common.io import check_writable
        from fedtune.simulations.simulate import preflight

        try:
            checked = preflight(run)  # a bad flag or data file is reported before the run directory is created
        except ConfigError as err:  # e.g. model.base_model: named with --base-model, or the file, that gave it
            problems = with_flags(err.problems, flags)
            if config_file and not flags.get("base_model"):
                problems = [f"{config_file}: {q}" if q.startswith("model.base_model") else q for q in problems]
            raise ConfigError(problems) from None
        check_writable(Path(run.out).resolve(), what="run directory (--out)")
    from fedtune.simulations.simulate import run_simulation

    run_dir = run_simulation(run, resume=bool(resume), ray_address=ray_address, verbose=verbose, checked=checked)
    print_summary(run_dir)


@main.command("run")
@resume_options
@run_options
@click.option("--coordinator", "address", default="127.0.0.1:9092", show_default=True,
              help="The coordinator's admin HOST:PORT (`coordinator start --admin-port`), not the sites' port.")
@click.option("--certs", type=click.Path(file_okay=False, path_type=Path),
              help="The admin's folder: ca.crt, admin.crt and admin.key from `fedtune certs init`.")
@click.option("--insecure", is_flag=True, help="Plain-text connection (local experiments only).")
@click.option("--min-sites", type=int, help="Minimum sites per round [2].")
@click.option("--sites", type=int, help="Sites expected to be connected; with --client-dp a run that finds another number is refused [3].")
@click.option("--fraction-train", type=float, help="Fraction of sites sampled each round [1].")
@click.option("--fraction-evaluate", type=float, help="Fraction of sites asked to evaluate each round; 0 halves the messages per round [1].")
def run_cmd(config_file: str | None, address: str, certs: Path | None, insecure: bool, **flags: Any) -> None:
    """Submit a federated run to the coordinator and stream one line per round.

    --labels (comma-separated, or a file with one label per line) is required: every site checks
    its data against it. The run directory (adapter/, checkpoints/, metrics.jsonl, summary.json,
    report.png) is written by the coordinator at --out, a path on the coordinator's machine.
    After a coordinator crash, `--resume RUN_DIR` (on the coordinator's machine: it reads
    RUN_DIR/config.toml and leaves the request there) continues from the last complete checkpoint.
    """
    from fedtune.cli.coordinator import connect
    from fedtune.common.config import RunConfig, from_dict
    from fedtune.server.coordinator import app_dir, flwr_command, run_config_args

    labels = flags.get("labels")
    if not labels and not flags.get("resume") and flags.get("task") != "causal-lm":  # a causal LM has no label set
        raise ConfigError("--labels is required: the run's label set, as L1,L2,... or a file with one label per line.")
    if labels and Path(labels).is_file():
        flags["labels"] = ",".join(line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip())
    resume, run = _resume_or_resolve(config_file, flags, simulation=False)
    if not resume:
        run = from_dict({"simulation": False, "out": str(Path(run.out).resolve())}, base=run)
        if run.causal_lm and run.data.path and not run.data.path.startswith("demo:"):
            # The coordinator's own held-out file (server/lm_eval.py), read by the ServerApp in another folder.
            run = from_dict({"data": {"path": str(Path(run.data.path).resolve())}}, base=run)
    conn, env = connect(address, certs, insecure)
    app = app_dir(RunConfig().to_flat())
    cmd = flwr_command("run", str(app), conn, *run_config_args(run.to_flat()), "--stream")
    from fedtune.cli.coordinator import follow_run

    follow_run(cmd, conn, env, run_dir=Path(run.out))  # a run that failed on the coordinator exits non-zero, with its reason
    if (Path(run.out) / "summary.json").exists():
        print_summary(Path(run.out))
    else:
        click.echo(f"run submitted; its run directory is {run.out} on the coordinator's machine.")


def print_summary(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = json.loads((run_dir / "summary.json").read_text())
    console = Console()
    if not summary["dp"]:
        console.print("[bold red]This run trained WITHOUT differential privacy: no privacy guarantee.[/]")
    test = summary.get("test") or {}
    ev = summary.get("evaluation") or {}
    if ev.get("final_sampled"):  # evaluation.final_full = false: never let a sample's figure pass for the full one
        console.print(f"held-out test figures below: a fixed sample of {ev['final_examples']} of {ev['test_examples']} examples "
                      "(--eval-sample-final), not the whole split")
    if test.get("accuracy") is not None:
        console.print(f"held-out test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}")
    if test.get("perplexity") is not None:
        base = (summary.get("base") or {}).get("perplexity")
        console.print(f"held-out test: perplexity {test['perplexity']:.2f}" + (f" (base model {base:.2f})" if base is not None else "")
                      + f"; example generations in {run_dir / 'generations.jsonl'}")
        if test.get("rouge_l") is not None:
            base_rouge = (summary.get("base") or {}).get("rouge_l")
            console.print(f"held-out test: ROUGE-L {test['rouge_l']:.3f}" + (f" (base model {base_rouge:.3f})" if base_rouge is not None else ""))
    val = summary.get("validation") or {}
    if val.get("accuracy") is not None:
        f1 = f", macro-F1 {val['macro_f1']:.3f}" if val.get("macro_f1") is not None else ""
        console.print(f"site validation ({val['sites']} sites, as their policies release it): accuracy {val['accuracy']:.3f}{f1}")
    if summary["dp"]:
        table = Table(title="Privacy per site (sample-level DP-SGD)")
        for col in ("site", "examples (approx.)", "epsilon", "budget", "delta", "z", "C", "q", "steps", "statistics"):
            table.add_column(col, justify="right")
        for s in summary["sites"]:
            table.add_row(
                s["site"], str(s["examples"]), f"{s['epsilon']:.3f}", f"{s['budget_epsilon']:g}", f"{s['delta']:g}",
                f"{s['noise_multiplier']:.3f}", f"{s['clip_norm']:g}", f"{s['sample_rate']:.2g}", str(s["steps"]), s.get("statistics", "none"),
            )
        console.print(table)
        console.print(f"max epsilon over sites: {summary['max_epsilon']:.3f}")
    client = summary.get("client_level")
    if client:
        console.print(
            f"client-level DP (DP-FedAvg): epsilon {client['epsilon']:.3f} at delta {client['delta']:g}; "
            f"S={client['clip_norm']:g}, z={client['noise_multiplier']:.3f}, {client['expected_sites']:g} of {client['sites']} sites "
            f"per round, {client['rounds']} rounds ({client['sampling']})"
        )
    if summary.get("secure_aggregation"):
        console.print("secure aggregation (SecAgg+): the coordinator saw only the weighted mean of the site updates")
    ratio = summary["bytes_up"] / max(1, summary["rounds"] * max(1, len(summary["sites"]))) / summary["full_model_bytes"]
    console.print(
        f"bytes up {summary['bytes_up'] / 1e6:.2f} MB, down {summary['bytes_down'] / 1e6:.2f} MB "
        f"(per site per round {ratio:.2%} of the full model); {summary['seconds']:.0f}s"
    )
    console.print(f"run directory: {run_dir}")



"""The ``fedtune`` command line.

Heavy libraries (torch, transformers, Flower) are imported inside commands, so ``--help`` is instant.
Errors print one line naming the fix and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedtune import __version__
from fedtune.common.errors import ConfigError, FedtuneError

if TYPE_CHECKING:
    from fedtune.common.config import RunConfig


class _Group(click.Group):
    """Turns fedtune's own errors into one line on stderr (traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedtuneError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"fedtune: error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fedtune")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Federated, differentially private LoRA fine-tuning of pre-trained transformers.

    Sites train LoRA adapters on their own data with DP-SGD (Opacus); a Flower coordinator
    averages them. Only adapter tensors and scalar metrics ever leave a site.

    \b
    Researchers:   fedtune simulate                     (N sites on this machine)
    Coordinators:  fedtune certs init, coordinator start, coordinator add-site, run, status, logs, stop
    Site operators: fedtune site init, site check, site start, site ledger
    Auditors:      fedtune report RUN_DIR, audit RUN_DIR    (privacy report, membership inference)
    Everyone:      fedtune evaluate / predict / generate / export / serve (use a trained adapter), dashboard RUN_DIR...
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def offline_env() -> None:
    import os

    from fedtune.common.environment import OFFLINE

    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def _overrides(**flags: Any) -> dict[str, Any]:
    """Map CLI flags onto the nested config; flags left unset do not override the config file."""
    mapping = {
        "data": ("data", "path"),
        "text_column": ("data", "text_column"),
        "label_column": ("data", "label_column"),
        "labels": ("data", "labels"),
        "partition": ("data", "partition"),
        "sites": ("federation", "sites"),
        "rounds": ("federation", "rounds"),
        "min_sites": ("federation", "min_sites"),
        "fraction_train": ("federation", "fraction_train"),
        "fraction_evaluate": ("federation", "fraction_evaluate"),
        "aggregation": ("federation", "aggregation"),
        "server_opt": ("federation", "server_opt"),
        "server_lr": ("federation", "server_lr"),
        "server_momentum": ("federation", "server_momentum"),
        "max_update_norm": ("federation", "max_update_norm"),
        "proximal_mu": ("train", "proximal_mu"),
        "local_epochs": ("train", "local_epochs"),
        "batch_size": ("train", "batch_size"),
        "learning_rate": ("train", "learning_rate"),
        "epsilon": ("privacy", "target_epsilon"),
        "delta": ("privacy", "delta"),
        "clip_norm": ("privacy", "clip_norm"),
        "accountant": ("privacy", "accountant"),
        "lora_rank": ("lora", "rank"),
        "site_ranks": ("lora", "site_ranks"),
        "client_dp_epsilon": ("client_dp", "target_epsilon"),
        "client_dp_clip_norm": ("client_dp", "clip_norm"),
        "base_model": ("model", "base_model"),
        "fail_sites": ("faults", "fail_sites"),
        "max_length": ("model", "max_length"),
        "task": (None, "task"),
        "prompt_column": ("data", "prompt_column"),
        "response_column": ("data", "response_column"),
        "messages_column": ("data", "messages_column"),
        "seed": (None, "seed"),
        "out": (None, "out"),
    }
    nested: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None or flag not in mapping:
            continue
        section, key = mapping[flag]
        if section is None:
            nested[key] = value
        else:
            nested.setdefault(section, {})[key] = value
    if flags.get("no_dp"):
        nested.setdefault("privacy", {})["enabled"] = False
    if flags.get("client_dp"):
        nested.setdefault("client_dp", {})["enabled"] = True
    if flags.get("secure_agg"):
        nested.setdefault("secure_agg", {})["enabled"] = True
    return nested


def _run_options(f: Any) -> Any:
    """Options shared by every command that starts a federated run; [defaults] come from the config."""
    from fedtune.common.config import (
        AGGREGATION_SYNTAX,
        DP_LEARNING_RATE,
        PLAIN_LEARNING_RATE,
        SERVER_OPTIMIZERS,
        TASK_MAX_LENGTH,
        TASKS,
        RunConfig,
    )

    d = RunConfig()
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file; flags override it."),
        click.option("--task", type=click.Choice(list(TASKS)),
                     help=f"classification (text -> label) or causal-lm (prompt -> response, LoRA on a causal LM) [{d.task}]."),
        click.option("--data", help="CSV, JSONL or Parquet with a text and a label column, or prompt and response columns for causal-lm "
                     "(default: packaged clinical demo; 'demo:bank_intents' for the bank demo; causal-lm: 'demo:clinical_summaries')."),
        click.option("--text-column", help=f"Text column name [{d.data.text_column}]."),
        click.option("--label-column", help=f"Label column name [{d.data.label_column}]."),
        click.option("--labels", help="The run's label set, comma-separated [the labels found in the data]."),
        click.option("--prompt-column", help=f"causal-lm: prompt column name [{d.data.prompt_column}]."),
        click.option("--response-column", help=f"causal-lm: response column name, the tokens trained on [{d.data.response_column}]."),
        click.option("--messages-column", help="causal-lm: a column of chats ({role, content} lists ending with the assistant's answer) "
                     "instead of prompt and response [none]."),
        click.option("--rounds", type=int, help=f"Federated rounds [{d.federation.rounds}]."),
        click.option("--local-epochs", type=float, help=f"Local passes over each site's data per round [{d.train.local_epochs:g}]."),
        click.option("--batch-size", type=int, help=f"Expected logical batch; Poisson sampling rate q = min(1, batch/n) [{d.train.batch_size}]."),
        click.option("--learning-rate", type=float, help=f"Learning rate [{DP_LEARNING_RATE:g} with DP, {PLAIN_LEARNING_RATE:g} with --no-dp]."),
        click.option("--epsilon", type=float, help=f"Target epsilon per site, reached after the planned rounds [{d.privacy.target_epsilon:g}]."),
        click.option("--delta", type=float, help=f"delta of each site's (epsilon, delta) guarantee [{d.privacy.delta:g}]."),
        click.option("--clip-norm", type=float, help=f"Per-example gradient clip norm C [{d.privacy.clip_norm:g}]."),
        click.option("--accountant", type=click.Choice(["rdp", "prv"]), help=f"Privacy accountant: RDP or PRV (tighter) [{d.privacy.accountant}]."),
        click.option("--no-dp", is_flag=True, default=False, help="Train WITHOUT differential privacy (baselines only)."),
        click.option("--client-dp", is_flag=True, default=False, help="Add client-level DP at the coordinator (DP-FedAvg: clip each site's update, add noise)."),
        click.option("--client-dp-epsilon", type=float, help=f"Client-level target epsilon after the planned rounds [{d.client_dp.target_epsilon:g}]."),
        click.option("--client-dp-clip-norm", type=float, help=f"Bound S on each site's update norm [{d.client_dp.clip_norm:g}]."),
        click.option("--secure-agg", is_flag=True, default=False, help="Secure aggregation (SecAgg+): the coordinator learns only the weighted mean of the sites' adapters."),
        click.option("--aggregation", help=f"How adapters are combined: {AGGREGATION_SYNTAX} [{d.federation.aggregation}]."),
        click.option("--server-opt", type=click.Choice(list(SERVER_OPTIMIZERS)),
                     help=f"Server optimiser over the averaged update: FedAvgM, FedAdam, FedYogi [{d.federation.server_opt}]."),
        click.option("--server-lr", type=float, help=f"Server optimiser learning rate [{d.federation.server_lr:g}]."),
        click.option("--server-momentum", type=float,
                     help=f"Server momentum: beta1 of --server-opt momentum/adam/yogi, in [0, 1) [{d.federation.server_momentum:g}]."),
        click.option("--max-update-norm", type=float,
                     help=f"Reject a site whose update's L2 norm in any tensor group (LoRA A, LoRA B, head) exceeds this; 0: off [{d.federation.max_update_norm:g}]."),
        click.option("--proximal-mu", type=float, help=f"FedProx mu: each site's proximal term (mu/2)||w - w_global||^2 [{d.train.proximal_mu:g}]."),
        click.option("--lora-rank", type=int, help=f"LoRA rank r [{d.lora.rank}]."),
        click.option("--base-model", type=click.Path(file_okay=False),
                     help="Local Hugging Face model folder (default: packaged all-MiniLM-L6-v2; causal-lm: SmolLM2-135M-Instruct, converted on first use)."),
        click.option("--max-length", type=int, help=f"Tokens per example [{TASK_MAX_LENGTH['classification']}; causal-lm {TASK_MAX_LENGTH['causal-lm']}]."),
        click.option("--seed", type=int, help=f"Seed for splits, initialisation and sampling [{d.seed}]."),
        click.option("--out", type=click.Path(file_okay=False), help="Run directory [runs/<command>-<time>]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _with_flags(problems: list[str], flags: dict[str, Any]) -> list[str]:
    """Each problem about a setting a flag gave, with the flag named ("... got 0.0 (set by --epsilon).")."""
    ctx = click.get_current_context(silent=True)
    # The option as the command declares it ("fail_sites" is --fail-site), so no flag needs spelling out here.
    options = {p.name: p.opts[0] for p in (ctx.command.params if ctx else ()) if p.opts}
    named = []
    for flag, value in flags.items():
        for section, values in _overrides(**{flag: value}).items():
            for key in values if isinstance(values, dict) else [None]:
                setting = f"{section}.{key}" if key else section
                named.append((setting, options.get(flag, "--" + flag.replace("_", "-"))))
    out = []
    for problem in problems:
        for setting, option in named:
            if problem.startswith(f"{setting} must") or problem.startswith(f"{setting}: "):
                problem = f"{problem.rstrip('.')} (set by {option})."
                break
        out.append(problem)
    return out


def _apply_flags(flags: dict[str, Any], base: RunConfig) -> RunConfig:
    """``base`` with the given flags applied; a ConfigError names the flag beside the setting."""
    from fedtune.common.config import from_dict

    try:
        return from_dict(_overrides(**flags), base=base)
    except ConfigError as err:
        raise ConfigError(_with_flags(err.problems, flags)) from None


def _resolve_config(config_file: str | None, prefix: str, **flags: Any):  # type: ignore[no-untyped-def]
    from fedtune.common.config import RunConfig, from_dict, load_toml

    base = load_toml(config_file) if config_file else RunConfig()
    run = _apply_flags(flags, base)
    if not run.out:
        run = from_dict({"out": f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"}, base=run)
    from fedtune.server.robust import aggregation_problems

    problems = aggregation_problems(run)  # before anything starts, not at the coordinator's first round
    if problems:
        raise ConfigError(problems)
    return run


def _fail_sites(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """--fail-site values, each checked against the syntax (the error names the flag); None when none is given."""
    from fedtune.common.config import parse_site_fault

    return tuple(str(parse_site_fault(v, where="--fail-site")) for v in values) or None


def _resume_options(f: Any) -> Any:
    """--resume RUN_DIR and --allow-change KEY[,KEY]: continue a run after a crash (server/resume.py)."""
    f = click.option("--allow-change", "allow_change", multiple=True, metavar="KEY[,KEY]",
                     help="With --resume: settings that may differ from RUN_DIR/config.toml, e.g. federation.rounds "
                          "to extend the run or federation.round_timeout.")(f)
    f = click.option("--resume", "resume", type=click.Path(file_okay=False, path_type=Path), metavar="RUN_DIR",
                     help="Continue the run in RUN_DIR from its last complete checkpoint (same run id, config, labels and "
                          "round numbering); flags given change its config only when --allow-change names them.")(f)
    return f


def _resume_config(run_dir: Path, config_file: str | None, allow_change: tuple[str, ...], *, simulation: bool,
                   **flags: Any) -> RunConfig:
    """The config a resumed run continues with: RUN_DIR's, changed only where --allow-change says.

    Leaves the resume request in RUN_DIR for the coordinator (server/resume.py), which checks it again.
    """
    from fedtune.common.config import from_dict, load_toml
    from fedtune.common.io import check_writable
    from fedtune.server.resume import parse_allow_change, request_resume, stored_config
    from fedtune.server.robust import aggregation_problems

    if flags.get("out"):
        raise ConfigError(f"--out cannot be combined with --resume: the run continues in its own directory {run_dir}.")
    run_dir = run_dir.resolve()
    allowed = parse_allow_change(allow_change)
    base = stored_config(run_dir)
    if base.simulation != simulation:
        raise ConfigError(f"{run_dir} holds a {'simulated' if base.simulation else 'deployed'} run: resume it with "
                          f"`fedtune {'simulate' if base.simulation else 'run'} --resume {run_dir}`.")
    if config_file:
        base = load_toml(config_file, base=base)
    run = _apply_flags(flags, from_dict({"out": str(run_dir), "simulation": simulation}, base=base))
    problems = aggregation_problems(run)
    if problems:
        raise ConfigError(problems)
    check_writable(run_dir, what="run directory (--resume)")
    for change in request_resume(run_dir, run, allowed):
        click.echo(f"fedtune: resuming with {change} (--allow-change {change.key})", err=True)
    return run


@main.command()
@_resume_options
@_run_options
@click.option("--sites", type=int, help="Number of simulated sites [3].")
@click.option("--partition", help="How sites split the data: iid | dirichlet:ALPHA | column:NAME [iid].")
@click.option("--min-sites", type=int, help="Minimum sites sampled per round [2].")
@click.option("--fraction-train", type=float, help="Fraction of sites sampled each round [1].")
@click.option("--site-ranks", help="LoRA rank each simulated site trains, one per site, each <= --lora-rank, e.g. 8,4,4,2; "
              "the coordinator pads lower ranks with the global adapter's values (HetLoRA-style) [every site: --lora-rank].")
@click.option("--fail-site", "fail_sites", multiple=True, metavar="NAME@ROUND[:crash|hang|refuse]",
              help="Inject a fault, repeatable: simulated site NAME (site-0, site-1, ...) crashes (after its ledger charge), "
                   "hangs past the round deadline (federation.round_timeout) or refuses in round ROUND [crash].")
def simulate(config_file: str | None, **flags: Any) -> None:
    """Simulate N sites on this machine through Flower's simulation engine.

    With no flags: the packaged clinical triage demo, 3 sites, DP on (epsilon 8, delta 1e-5).
    Writes the run directory: adapter/, checkpoints/round-N/, metrics.jsonl, summary.json,
    config.toml and report.png. After a crash, `--resume RUN_DIR` continues from the last
    complete checkpoint.
    """
    offline_env()
    resume, allow_change = flags.pop("resume"), flags.pop("allow_change")
    flags["fail_sites"] = _fail_sites(flags.pop("fail_sites"))
    if resume:
        run = _resume_config(resume, config_file, allow_change, simulation=True, **flags)
    else:
        if allow_change:
            raise ConfigError("--allow-change is for --resume RUN_DIR only.")
        run = _resolve_config(config_file, "sim", **flags)
        from fedtune.common.io import check_writable
        from fedtune.simulations.simulate import preflight

        try:
            preflight(run)  # a bad flag or data file is reported before the run directory is created
        except ConfigError as err:  # e.g. model.base_model: named with --base-model, or the file, that gave it
            problems = _with_flags(err.problems, flags)
            if config_file and not flags.get("base_model"):
                problems = [f"{config_file}: {q}" if q.startswith("model.base_model") else q for q in problems]
            raise ConfigError(problems) from None
        check_writable(Path(run.out).resolve(), what="run directory (--out)")
    from fedtune.simulations.simulate import run_simulation

    run_dir = run_simulation(run, resume=bool(resume))
    _print_summary(run_dir)


@main.command("run")
@_resume_options
@_run_options
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
    from fedtune.cli_deploy import _connect
    from fedtune.common.config import RunConfig, from_dict
    from fedtune.server.coordinator import app_dir, flwr_command, run_config_args

    resume, allow_change = flags.pop("resume"), flags.pop("allow_change")
    labels = flags.get("labels")
    if not labels and not resume and flags.get("task") != "causal-lm":  # a causal LM has no label set
        raise ConfigError("--labels is required: the run's label set, as L1,L2,... or a file with one label per line.")
    if labels and Path(labels).is_file():
        flags["labels"] = ",".join(line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip())
    if resume:
        run = _resume_config(resume, config_file, allow_change, simulation=False, **flags)
    else:
        if allow_change:
            raise ConfigError("--allow-change is for --resume RUN_DIR only.")
        run = _resolve_config(config_file, "run", **flags)
        run = from_dict({"simulation": False, "out": str(Path(run.out).resolve())}, base=run)
        if run.causal_lm and run.data.path and not run.data.path.startswith("demo:"):
            # The coordinator's own held-out file (server/lm_eval.py), read by the ServerApp in another folder.
            run = from_dict({"data": {"path": str(Path(run.data.path).resolve())}}, base=run)
    conn, env = _connect(address, certs, insecure)
    app = app_dir(RunConfig().to_flat())
    cmd = flwr_command("run", str(app), conn, *run_config_args(run.to_flat()), "--stream")
    from fedtune.cli_deploy import follow_run

    follow_run(cmd, conn, env, run_dir=Path(run.out))  # a run that failed on the coordinator exits non-zero, with its reason
    if (Path(run.out) / "summary.json").exists():
        _print_summary(Path(run.out))
    else:
        click.echo(f"run submitted; its run directory is {run.out} on the coordinator's machine.")


def _print_summary(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = json.loads((run_dir / "summary.json").read_text())
    console = Console()
    if not summary["dp"]:
        console.print("[bold red]This run trained WITHOUT differential privacy: no privacy guarantee.[/]")
    test = summary.get("test") or {}
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
def evaluate_cmd(adapter: str, data: str, text_column: str, label_column: str, prompt_column: str, response_column: str,
                 messages_column: str, base_model: str | None, json_out: str | None) -> None:
    """Accuracy and macro-F1 of a trained adapter on labeled data; a causal-lm adapter's perplexity on prompt/response data."""
    offline_env()
    from fedtune.common.data import check_labels, load_table
    from fedtune.common.errors import LabelsMismatchError
    from fedtune.common.tasks import encode, evaluate
    from fedtune.inference import adapter_task

    if adapter_task(Path(adapter)) == "causal-lm":
        out = _evaluate_lm(adapter, data, prompt_column, response_column, messages_column, base_model)
        click.echo(f"examples {out['examples']}  perplexity {out['perplexity']:.4f}  loss {out['loss']:.4f}")
        click.echo(json.dumps(out))
        if json_out:
            Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
        return
    loaded = _load_adapter(adapter, base_model)
    table = load_table(data, text_column=text_column, label_column=label_column)
    try:
        check_labels(table, loaded.labels)
    except LabelsMismatchError as err:
        raise LabelsMismatchError(f"--adapter {adapter} was trained on the labels {loaded.labels}; --data {err}") from None
    dataset = encode(loaded.tokenizer, table.texts, table.labels, loaded.labels, max_length=loaded.max_length)
    result = evaluate(loaded.model, dataset, len(loaded.labels))
    out = {"examples": result.examples, "accuracy": result.accuracy, "macro_f1": result.macro_f1, "loss": result.loss}
    click.echo(f"examples {result.examples}  accuracy {result.accuracy:.4f}  macro-F1 {result.macro_f1:.4f}  loss {result.loss:.4f}")
    click.echo(json.dumps(out))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")


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
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to generate per prompt.")
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


@main.command("serve")
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="Adapter folder (classification or causal-lm).")
@click.option("--base-model", type=click.Path(file_okay=False), help="Base model folder (default: the one the run used).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback is warned about.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one, printed).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Most texts or prompts per request, and per model call (waiting requests are merged up to it).")
@click.option("--max-body-bytes", type=click.IntRange(min=256), default=1 << 20, show_default=True,
              help="Largest request body; a larger one gets 413 before it is parsed.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [one per core].")
def serve_cmd(adapter: str, base_model: str | None, host: str, port: int, max_batch: int, max_body_bytes: int,
              threads: int | None) -> None:
    """Serve an adapter over HTTP: GET /health, POST /predict or /generate, the API at /docs.

    Localhost only by default: the server has no TLS and no authentication. Stop it with Ctrl-C.
    """
    offline_env()
    from fedtune.loopback import exposure_warning
    from fedtune.serve import ServeSettings, serve

    warning = exposure_warning(host)
    if warning:
        click.secho(f"fedtune: WARNING: {warning}", err=True, fg="red", bold=True)
    settings = ServeSettings(max_batch=max_batch, max_body_bytes=max_body_bytes, threads=threads)
    serve(Path(adapter), base_model=base_model, host=host, port=port, settings=settings,
          announce=lambda line: click.echo(f"fedtune: {line}"))


@main.command("dashboard")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--site-config", type=click.Path(dir_okay=False, path_type=Path), help="A site's site.toml: adds a page of its privacy ledger.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (anything but the loopback shows the runs to the network).")
@click.option("--port", type=click.IntRange(1, 65535), default=8050, show_default=True)
@click.option("--refresh", type=click.IntRange(1, 3600), default=5, show_default=True, help="Seconds between reloads of a live run's page.")
def dashboard_cmd(run_dirs: tuple[Path, ...], site_config: Path | None, host: str, port: int, refresh: int) -> None:
    """A web dashboard of run directories (and a site's ledger): accuracy, epsilon per site, refusals, bytes, model card.

    Reads only the folders given and the site's ledger; a run still going reloads itself.
    """
    from fedtune.dashboard import serve

    serve(run_dirs, site_config=site_config, host=host, port=port, refresh_seconds=refresh)


def _register_commands() -> None:
    from fedtune import cli_deploy, cli_privacy

    for command in (cli_deploy.certs, cli_deploy.site, cli_deploy.coordinator, cli_deploy.status, cli_deploy.logs,
                    cli_deploy.stop, cli_deploy.app, cli_privacy.report, cli_privacy.audit):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()

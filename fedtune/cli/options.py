"""Options shared by the commands that start a federated run (`simulate`, `run`), and the config they resolve to."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fedtune.common.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.common.config import RunConfig


def overrides(**flags: Any) -> dict[str, Any]:
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
        "init_adapter": ("model", "init_adapter"),
        "fail_sites": ("faults", "fail_sites"),
        "max_length": ("model", "max_length"),
        "task": (None, "task"),
        "prompt_column": ("data", "prompt_column"),
        "response_column": ("data", "response_column"),
        "messages_column": ("data", "messages_column"),
        "seed": (None, "seed"),
        "eval_every": ("evaluation", "every"),
        "eval_sample": ("evaluation", "sample"),
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
    if flags.get("eval_sample_final"):
        nested.setdefault("evaluation", {})["final_full"] = False
    return nested


def run_options(f: Any) -> Any:
    """Options shared by every command that starts a federated run; [defaults] come from the config."""
    from fedtune.common.config import (
        AGGREGATION_SYNTAX,
        LEARNING_RATE,
        SERVER_OPTIMIZERS,
        TASK_CLIP_NORM,
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
        click.option("--learning-rate", type=float, help=f"Learning rate [{LEARNING_RATE:g}]."),
        click.option("--epsilon", type=float, help=f"Target epsilon per site, reached after the planned rounds [{d.privacy.target_epsilon:g}]."),
        click.option("--delta", type=float, help=f"delta of each site's (epsilon, delta) guarantee [{d.privacy.delta:g}]."),
        click.option("--clip-norm", type=float, help=f"Per-example gradient clip norm C [{TASK_CLIP_NORM['classification']:g} for classification, "
                     f"{TASK_CLIP_NORM['causal-lm']:g} for causal-lm]."),
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
        click.option("--init-adapter", type=click.Path(file_okay=False, resolve_path=True),
                     help="Start from an earlier run's adapter/ or checkpoints/round-N/ (same base model, task and LoRA shape; "
                          "its labels first, new ones grow the head) instead of a fresh adapter; fedtune run: a path on the coordinator."),
        click.option("--max-length", type=int, help=f"Tokens per example [{TASK_MAX_LENGTH['classification']}; causal-lm {TASK_MAX_LENGTH['causal-lm']}]."),
        click.option("--seed", type=int, help=f"Seed for splits, initialisation and sampling [{d.seed}]."),
        click.option("--eval-every", type=int, metavar="K",
                     help=f"Test the global adapter on the held-out split after every K-th round only; the last round always "
                          f"[{d.evaluation.every}]."),
        click.option("--eval-sample", type=int, metavar="N",
                     help="Test on a fixed seeded sample of N held-out examples (marked 'sample' in the round line and "
                          "summary.json); the last round still on all of them. 0: all [0]."),
        click.option("--eval-sample-final", is_flag=True, default=False,
                     help="With --eval-sample: test the last round on the sample too (summary.json says so)."),
        click.option("--out", type=click.Path(file_okay=False), help="Run directory [runs/<command>-<time>]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def with_flags(problems: list[str], flags: dict[str, Any]) -> list[str]:
    """Each problem about a setting a flag gave, with the flag named ("... got 0.0 (set by --epsilon).")."""
    ctx = click.get_current_context(silent=True)
    # The option as the command declares it ("fail_sites" is --fail-site), so no flag needs spelling out here.
    options = {p.name: p.opts[0] for p in (ctx.command.params if ctx else ()) if p.opts}
    named = []
    for flag, value in flags.items():
        for section, values in overrides(**{flag: value}).items():
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


def apply_flags(flags: dict[str, Any], base: RunConfig) -> RunConfig:
    """``base`` with the given flags applied; a ConfigError names the flag beside the setting."""
    from fedtune.common.config import from_dict

    try:
        return from_dict(overrides(**flags), base=base)
    except ConfigError as err:
        raise ConfigError(with_flags(err.problems, flags)) from None


def resolve_config(config_file: str | None, prefix: str, **flags: Any):  # type: ignore[no-untyped-def]
    from fedtune.common.config import RunConfig, from_dict, load_toml

    base = load_toml(config_file) if config_file else RunConfig()
    run = apply_flags(flags, base)
    if not run.out:
        run = from_dict({"out": f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"}, base=run)
    from fedtune.server.robust import aggregation_problems

    problems = aggregation_problems(run)  # before anything starts, not at the coordinator's first round
    if problems:
        raise ConfigError(problems)
    return run


def parse_fail_sites(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """--fail-site values, each checked against the syntax (the error names the flag); None when none is given."""
    from fedtune.common.config import parse_site_fault

    return tuple(str(parse_site_fault(v, where="--fail-site")) for v in values) or None


def resume_options(f: Any) -> Any:
    """--resume RUN_DIR and --allow-change KEY[,KEY]: continue a run after a crash (server/resume.py)."""
    f = click.option("--allow-change", "allow_change", multiple=True, metavar="KEY[,KEY]",
                     help="With --resume: settings that may differ from RUN_DIR/config.toml, e.g. federation.rounds "
                          "to extend the run or federation.round_timeout.")(f)
    f = click.option("--resume", "resume", type=click.Path(file_okay=False, path_type=Path), metavar="RUN_DIR",
                     help="Continue the run in RUN_DIR from its last complete checkpoint (same run id, config, labels and "
                          "round numbering); flags given change its config only when --allow-change names them.")(f)
    return f


def resume_config(run_dir: Path, config_file: str | None, allow_change: tuple[str, ...], *, simulation: bool,
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
    run = apply_flags(flags, from_dict({"out": str(run_dir), "simulation": simulation}, base=base))
    problems = aggregation_problems(run)
    if problems:
        raise ConfigError(problems)
    check_writable(run_dir, what="run directory (--resume)")
    for change in request_resume(run_dir, run, allowed):
        click.echo(f"fedtune: resuming with {change} (--allow-change {change.key})", err=True)
    return run


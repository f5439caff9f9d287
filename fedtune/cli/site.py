"""The site operator's commands: `fedtune site init | check | prepare | start | ledger` (and the hidden warm worker)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedtune.cli.root import offline_env, warn_insecure
from fedtune.common.config import TASKS  # light (no torch)
from fedtune.common.errors import ConfigError


@click.group()
def site() -> None:
    """The site daemon: set up, check and run on the site's own premises."""


@site.command("init")
@click.option("--name", required=True, help="This site's name, e.g. hospital-a.")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The site's local labeled data (CSV, JSONL, Parquet).")
@click.option("--coordinator", required=True, help="The coordinator's HOST:PORT.")
@click.option("--ca", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The coordinator's ca.crt.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for site.toml and the node key.")
@click.option("--budget-epsilon", type=float, default=8.0, show_default=True, help="Lifetime epsilon budget of each record.")
@click.option("--delta", type=float, default=1e-5, show_default=True, help="delta of the site's guarantee.")
@click.option("--task", type=click.Choice(list(TASKS)), default="classification", show_default=True,
              help="What runs may train on this data; causal-lm writes [policy] allowed_tasks = [\"causal-lm\"] and the prompt/response columns.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--prompt-column", default=None, help="causal-lm: the prompt column [prompt].")
@click.option("--response-column", default=None, help="causal-lm: the response column, the only tokens trained on [response].")
@click.option("--messages-column", default=None, help="causal-lm: a column of chats ({role, content} lists ending with the assistant's answer) "
              "instead of prompt and response.")
@click.option("--base-model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="This site's copy of the base model (a local Hugging Face folder) [the packaged all-MiniLM-L6-v2]. "
                   "Runs must use the same model; the site never loads a folder the coordinator names.")
@click.option("--overwrite", is_flag=True, help="Replace an existing site.toml and key pair.")
def site_init(name: str, data: Path, coordinator: str, ca: Path, out: Path, budget_epsilon: float, delta: float, task: str,
              text_column: str, label_column: str, prompt_column: str | None, response_column: str | None, messages_column: str | None,
              base_model: Path | None, overwrite: bool) -> None:
    """Write site.toml and this site's node-authentication key pair."""
    from fedtune.client.daemon import write_site_config
    from fedtune.client.identity import create_node_key, public_key_fingerprint

    if not ca.is_file():
        raise ConfigError(f"--ca {ca} does not exist; it is ca.crt from the coordinator's `fedtune certs init`.")
    if base_model is not None:
        from fedtune.common.config import check_model_folder

        check_model_folder(base_model, where="--base-model")
    lm_flags = {"--prompt-column": prompt_column, "--response-column": response_column, "--messages-column": messages_column}
    given = [flag for flag, value in lm_flags.items() if value is not None]
    if task != "causal-lm" and given:
        raise ConfigError(f"{', '.join(given)} apply to --task causal-lm only; this site is initialised for --task {task}.")
    if messages_column and (prompt_column or response_column):
        raise ConfigError("--messages-column replaces --prompt-column and --response-column; give one or the other.")
    config = write_site_config(out, name=name, coordinator=coordinator, ca=ca, data=data, text_column=text_column,
                               label_column=label_column, budget_epsilon=budget_epsilon, delta=delta, overwrite=overwrite,
                               base_model=base_model, task=task, prompt_column=prompt_column or "prompt",
                               response_column=response_column or "response", messages_column=messages_column or "")
    keys = create_node_key(out, overwrite=overwrite)
    click.echo(f"site config: {config}")
    if task == "causal-lm":
        click.echo("policy: runs may train a generative model (causal-lm) on this data, and nothing else "
                   "([policy] allowed_tasks; a generative model can learn to repeat training text, within the run's epsilon).")
    click.echo(f"node key (secret, stays here): {keys.private_key}")
    click.echo(f"hand this file to the coordinator: {keys.public_key}  ({public_key_fingerprint(keys.public_key)})")
    click.echo(f"  they run: fedtune coordinator add-site {keys.public_key} --name {name}")
    click.echo(f"then: fedtune site check --config {config}")


@site.command("check")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The site's site.toml.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="causal-lm: the run's model.max_length, to count the examples it would truncate [256].")
def site_check(config_path: Path, max_length: int | None) -> None:
    """Check data, model, certificates, privacy ledger and the coordinator; non-zero exit on any failure."""
    from fedtune.client.check import run_checks
    from fedtune.client.daemon import load_site_config

    offline_env()
    config = load_site_config(config_path)
    failed = 0
    for result in run_checks(config, max_length=max_length or 0):
        mark = (click.style("warn", fg="yellow") if result.warning else click.style("ok  ", fg="green")) if result.ok \
            else click.style("FAIL", fg="red")
        click.echo(f"{mark} {result.name:<15} {result.detail}")
        failed += not result.ok
    if failed:
        click.echo(f"{failed} check(s) failed.", err=True)
        sys.exit(1)


@site.command("prepare")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The site's site.toml.")
@click.option("--in", "data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Another data file to prepare [site.toml's data.path].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The cleaned file; its suffix picks the format (.csv, .jsonl, .parquet) [NAME.clean.SUFFIX beside the input].")
@click.option("--task", type=click.Choice(list(TASKS)), default=None, help="Which columns to prepare [the task site.toml's policy allows].")
@click.option("--near-dup-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="Jaccard similarity of character 5-grams at or above which two rows are near duplicates.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="The run's model.max_length, to count the examples it would truncate [64 classification, 256 causal-lm].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out that no earlier `site prepare` wrote.")
def site_prepare(config_path: Path, data: Path | None, out: Path | None, task: str | None, near_dup_threshold: float,
                 max_length: int | None, overwrite: bool) -> None:
    """Clean the site's data into a new file and report what was found; the input is never modified.

    Normalises text (Unicode NFC, whitespace, control characters), drops empty rows, exact and near
    duplicates and rows whose text has conflicting labels, and reports label balance, rare labels, short
    texts and token lengths. Writes OUT, OUT.prepare.json (counts and row numbers, no text) and OUT.prepare.png,
    and first links the cleaned rows to the rows they came from in the site's privacy ledger (its state
    folder), so cleaning never gives a row a fresh budget.
    """
    from rich.console import Console

    from fedtune.client.daemon import load_site_config
    from fedtune.client.near_dup import NearDupSettings
    from fedtune.client.prepare import PrepareSettings, prepare_site_data
    from fedtune.client.prepare_report import render

    offline_env()
    config = load_site_config(config_path)
    settings = PrepareSettings(near_dup=NearDupSettings(threshold=near_dup_threshold), max_length=max_length or 0)
    result = prepare_site_data(config, data=data, out=out, task=task, settings=settings, overwrite=overwrite)
    render(result.report, Console())
    click.echo(f"cleaned: {result.out}\nreport: {result.report_path}" + (f"\nplot: {result.plot_path}" if result.plot_path else ""))
    if result.out.resolve() != config.data_path.resolve():
        click.echo(f"to train on it, set [data] path = \"{result.out}\" in {config_path}")


@site.command("start")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The site's site.toml.")
@click.option("--runtime-port", type=int, default=9094, show_default=True, help="Local port of the daemon's runtime API (loopback).")
@click.option("--max-retries", type=int, default=None, help="Give up after this many failed connection attempts [never].")
@click.option("--no-warm-worker", is_flag=True, help="Load model and libraries in every message's process instead of one warm worker.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for training [all cores]. Sites sharing one machine should split its cores: "
                   "oversubscribed threads make each round many times slower.")
def site_start(config_path: Path, runtime_port: int, max_retries: int | None, no_warm_worker: bool, threads: int | None) -> None:
    """Run the site daemon (flower-supernode) with TLS and node authentication.

    The SuperNode polls the coordinator every 0.2 s while idle (FEDTUNE_SUPERNODE_POLL seconds).
    """
    from fedtune.client.check import check_credentials
    from fedtune.client.daemon import load_site_config, run_daemon

    config = load_site_config(config_path)
    if config.insecure:
        warn_insecure()
    else:
        # Refused here, in one line: flower-supernode would retry a handshake that can never succeed.
        _, served = check_credentials(config)
        if served is None:
            click.echo(f"note: the coordinator at {config.coordinator} does not answer yet; its certificate is checked "
                       "when it does (the daemon keeps trying).", err=True)
    sys.exit(run_daemon(config_path, runtime_port=runtime_port, max_retries=max_retries, warm_worker=not no_warm_worker, threads=threads))


@site.command("worker", hidden=True)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def site_worker(config_path: Path) -> None:
    """The warm worker `site start` runs beside flower-supernode (internal)."""
    import logging

    from fedtune.client.daemon import load_site_config
    from fedtune.client.worker import serve

    offline_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import fedtune.client.handlers  # noqa: F401  (pay the torch/PEFT/Opacus imports before the first round)

    serve(load_site_config(config_path))


@site.command("ledger")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The site's site.toml.")
def site_ledger(config_path: Path) -> None:
    """Print what the records of this site's data file have spent, and every charge that touched them."""
    from fedtune.client.check import site_record_digests
    from fedtune.client.daemon import load_site_config
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.errors import DataError

    config = load_site_config(config_path)
    ledger = PrivacyLedger(config.state_dir)
    try:
        records: list[str] | None = site_record_digests(config)  # the keys of every task the site allows
        scope = f"the rows of {config.data_path}"
    except DataError as err:
        # The ledger must stay readable when the data is not: fall back to every record it knows.
        click.echo(f"cannot read the data file ({err}); showing every record the ledger has charged.", err=True)
        records, scope = None, "every record the ledger has charged"
    summary = ledger.summary(records, delta=config.delta)
    budget = config.budget_epsilon
    click.echo(f"{ledger.path}, for {scope} ({summary.records} distinct records), delta {config.delta:g}:")
    click.echo(f"  max epsilon {summary.max_epsilon:.3f} of budget {budget:g}, left {summary.left(budget):.3f}; "
               f"{summary.at_max} records at the max, {summary.never_spent} never spent")
    for line in summary.table() if summary.charges else ["no charges touch these records."]:
        click.echo("  " + line)
    if summary.other_charges:
        click.echo(f"  {summary.other_charges} other charges touch only records no longer in this file.")


"""Deployment commands: certificates, site daemons, the coordinator, and federated runs.

Every command wraps a real Flower process or control call; heavy imports stay inside commands.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from fedtune.common.config import TASKS  # light (no torch); fedtune.cli imports it anyway
from fedtune.common.errors import ConfigError

# Admin commands dial the coordinator's admin listener (`coordinator start --admin-port`); sites dial --port.
DEFAULT_COORDINATOR = "127.0.0.1:9092"


def _warn_insecure() -> None:
    click.secho(
        "WARNING: --insecure: no TLS, no node authentication and no admin certificate. Updates and metrics travel "
        "in plain text, anyone who can reach the ports can join, and anyone who can reach the admin port can start "
        "runs. Use only for local experiments.",
        fg="yellow", err=True,
    )


# --------------------------------------------------------------------------------------- certs
@click.group()
def certs() -> None:
    """Certificates: the coordinator's TLS and the consortium admins' client certificates."""


@certs.command("init")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for ca.crt, ca.key, server.crt, server.key, admin.crt, admin.key, admins.pem.")
@click.option("--host", "hosts", multiple=True, help="Name or IP sites and admins dial, repeatable; localhost and 127.0.0.1 are always included.")
@click.option("--days", type=int, default=825, show_default=True, help="Validity of every certificate.")
@click.option("--admin-name", default="admin", show_default=True, help="Who holds the first admin certificate (shown in the coordinator's logs).")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
def certs_init(out: Path, hosts: tuple[str, ...], days: int, admin_name: str, overwrite: bool) -> None:
    """Create a private CA, the coordinator's TLS certificate and a first admin certificate (keys 0600)."""
    from fedtune.server.pki import init_certificates

    # The SuperLink's own helper and the gateway dial 127.0.0.1: the certificate must name it whatever else it names.
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *hosts]))
    paths = init_certificates(out, hosts=names, days=days, overwrite=overwrite, admin_name=admin_name)
    click.echo(f"CA certificate (public, give to every site and admin): {paths.ca_cert}")
    click.echo(f"CA key (secret, keep offline):               {paths.ca_key}")
    click.echo(f"coordinator certificate for {', '.join(names)}: {paths.server_cert}")
    click.echo(f"coordinator key (secret):                    {paths.server_key}")
    click.echo(f"admins the coordinator accepts:              {paths.admins}")
    click.echo(f"admin certificate and key (secret, admins only, never a site): {paths.admin_cert}, {paths.admin_key}")


@certs.command("admin")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for this admin's admin.crt and admin.key.")
@click.option("--name", required=True, help="Who holds it (shown in the coordinator's logs).")
@click.option("--days", type=int, default=825, show_default=True, help="Validity of the certificate.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
def certs_admin(out: Path, name: str, days: int, overwrite: bool) -> None:
    """Create one more admin's client certificate (the coordinator accepts it once listed in its admins.pem)."""
    from fedtune.server.pki import init_admin_certificate

    paths = init_admin_certificate(out, name=name, days=days, overwrite=overwrite)
    click.echo(f"admin certificate: {paths.cert}")
    click.echo(f"admin key (secret, stays with {name}): {paths.key}")
    click.echo(f"on the coordinator: append {paths.cert.name} to its admins.pem and restart it; give {name} ca.crt too.")


# ---------------------------------------------------------------------------------------- site
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
    from fedtune.cli import offline_env
    from fedtune.client.check import run_checks
    from fedtune.client.daemon import load_site_config

    offline_env()
    config = load_site_config(config_path)
    failed = 0
    for result in run_checks(config, max_length=max_length or 0):
        mark = click.style("ok  ", fg="green") if result.ok else click.style("FAIL", fg="red")
        click.echo(f"{mark} {result.name:<15} {result.detail}")
        failed += not result.ok
    if failed:
        click.echo(f"{failed} check(s) failed.", err=True)
        sys.exit(1)


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
        _warn_insecure()
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

    from fedtune.cli import offline_env
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


# --------------------------------------------------------------------------------- coordinator
@click.group()
def coordinator() -> None:
    """The coordinator (flower-superlink)."""


@coordinator.command("start")
@click.option("--certs", type=click.Path(file_okay=False, path_type=Path), help="Folder from `fedtune certs init` (ca.crt, server.crt, server.key, admins.pem).")
@click.option("--state", required=True, type=click.Path(file_okay=False, path_type=Path), help="Persistent state folder (database of sites and runs).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the sites' port listens on.")
@click.option("--port", type=int, default=9093, show_default=True, help="Port for sites (Fleet API only).")
@click.option("--admin-host", default=None, help="Address the admin port listens on [--host]; 127.0.0.1 also requires a shell (or SSH tunnel) on this machine.")
@click.option("--admin-port", type=int, default=9092, show_default=True, help="Port for admins: `fedtune run`, status, logs, stop, coordinator add-site (admin certificate required).")
@click.option("--superlink-port", type=int, default=0, help="Flower's SuperLink, on 127.0.0.1 only, behind both ports [a free port].")
@click.option("--insecure", is_flag=True, help="No TLS, no node authentication, no admin certificate (local experiments only).")
def coordinator_start(certs: Path | None, state: Path, host: str, port: int, admin_host: str | None, admin_port: int,
                      superlink_port: int, insecure: bool) -> None:
    """Run the coordinator: Flower's SuperLink on the loopback behind fedtune's gateway.

    Sites reach only the Fleet API on --port (TLS, node authentication); only admins holding a
    certificate listed in admins.pem reach the Control API on --admin-port. Stops on SIGTERM/SIGINT.
    """
    import logging

    from fedtune.server.coordinator import run_coordinator

    if insecure:
        _warn_insecure()
    elif certs is None:
        raise ConfigError("--certs DIR is required (or --insecure for local experiments).")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.exit(run_coordinator(certs=None if insecure else certs, state=state, host=host, port=port,
                             admin_host=admin_host or host, admin_port=admin_port, superlink_port=superlink_port))


def _connection_options(f: Any) -> Any:
    f = click.option("--insecure", is_flag=True, help="Plain-text connection (local experiments only).")(f)
    f = click.option("--certs", type=click.Path(file_okay=False, path_type=Path),
                     help="The admin's folder: ca.crt, admin.crt and admin.key from `fedtune certs init`.")(f)
    f = click.option("--coordinator", "address", default=DEFAULT_COORDINATOR, show_default=True,
                     help="The coordinator's admin HOST:PORT (`coordinator start --admin-port`), not the sites' port.")(f)
    return f


def _connect(address: str, certs: Path | None, insecure: bool) -> tuple[str, dict[str, str]]:
    """The Flower connection for an admin command; refuses, in one line, without admin credentials."""
    from fedtune.server.coordinator import admin_connection

    if insecure:
        _warn_insecure()
        return admin_connection(address, certs=None)
    if certs is None:
        raise ConfigError("--certs DIR (the admin's ca.crt, admin.crt and admin.key) is required, or --insecure for local experiments.")
    from fedtune.server.pki import check_ca_file, check_served_certificate

    if (certs / "ca.crt").is_file():
        check_ca_file(certs / "ca.crt")  # a bad file would otherwise surface as an SSL error inside the connection check
    try:
        return admin_connection(address, certs=certs)
    except ConfigError:
        # Say why in the operator's terms (expired, another host, another CA) when the coordinator's certificate is the cause.
        if all((certs / name).is_file() for name in ("ca.crt", "admin.crt", "admin.key")):
            check_served_certificate(address, certs / "ca.crt", client_cert=certs / "admin.crt", client_key=certs / "admin.key")
        raise


def _flwr(args: list[str], env: dict[str, str]) -> None:
    from fedtune.server.coordinator import flwr_command

    code = subprocess.call(flwr_command(*args), env=env)
    if code:
        sys.exit(code)


def follow_run(cmd: list[str], conn: str, env: dict[str, str], *, run_dir: Path, poll: float = 1.0, settle: float = 60.0) -> None:
    """Run ``flwr run ... --stream`` (``cmd``), echoing its output, then fail unless the run completed.

    Flower's ``flwr run --stream`` exits 0 however the run ends: it only streams the logs. The run's
    own status (``flwr ls --run-id``) says whether the ServerApp completed, failed (and with which
    exception) or was stopped.

    Raises:
        FedtuneError: naming the run, its status and the coordinator's reason (e.g. a round that
            failed for too few sites, which says how to resume it).
        SystemExit: flwr's own non-zero exit code (it could not submit, or lost the coordinator).
    """
    import json
    import re
    import time

    from fedtune.common.errors import FedtuneError
    from fedtune.server.coordinator import flwr_command

    run_id: str | None = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if run_id is None and (found := re.search(r"started run (\d+)", line)):
            run_id = found.group(1)
    code = proc.wait()
    if code:
        click.echo(f"fedtune: flwr exited {code}; if the coordinator stopped mid-run, continue the run with "
                   f"`fedtune run --resume {run_dir}` on the coordinator's machine once it is back.", err=True)
        sys.exit(code)
    if run_id is None:
        raise FedtuneError("flwr run did not say which run it started; check `fedtune status`.")
    deadline = time.monotonic() + settle  # the log stream can end a moment before the status is final
    while True:
        out = subprocess.run(flwr_command("ls", conn, "--run-id", run_id, "--format", "json"), env=env,
                             capture_output=True, text=True)
        try:
            row = json.loads(out.stdout[out.stdout.index("{"):])["runs"][0]
            status, details = str(row["status"]), str(row.get("status-details") or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise FedtuneError(f"cannot read run {run_id}'s status (flwr ls exited {out.returncode}): "
                               f"{(out.stdout + out.stderr).strip()[-300:]}") from None
        if status.startswith("finished") or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if status != "finished:completed":
        reason = details.removeprefix("ServerApp failed with exception: ") or "no reason given"
        raise FedtuneError(f"run {run_id} ended {status} on the coordinator: {reason}")


@coordinator.command("add-site")
@click.argument("pubkey", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The site's name.")
@_connection_options
def coordinator_add_site(pubkey: Path, name: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Register a site's public key (node-key.pub) so its daemon may connect."""
    from fedtune.client.identity import check_node_public_key

    if not pubkey.is_file():
        raise ConfigError(f"{pubkey} does not exist; it is node-key.pub from the site's `fedtune site init`.")
    check_node_public_key(pubkey, setting="PUBKEY")  # before anything is sent: it may be a private key
    conn, env = _connect(address, certs, insecure)
    _flwr(["supernode", "register", str(pubkey), conn, "--name", name], env)


@coordinator.command("sites")
@_connection_options
def coordinator_sites(address: str, certs: Path | None, insecure: bool) -> None:
    """List registered sites: node ids and status (flwr supernode list)."""
    conn, env = _connect(address, certs, insecure)
    _flwr(["supernode", "list", conn], env)


@coordinator.command("remove-site")
@click.argument("node_id")
@_connection_options
def coordinator_remove_site(node_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Unregister a site by its node id (flwr supernode unregister): its daemon is refused from then on."""
    conn, env = _connect(address, certs, insecure)
    _flwr(["supernode", "unregister", node_id, conn], env)


@click.command("status")
@_connection_options
def status(address: str, certs: Path | None, insecure: bool) -> None:
    """List runs on the coordinator (flwr ls)."""
    conn, env = _connect(address, certs, insecure)
    _flwr(["ls", conn], env)


@click.command("logs")
@click.argument("run_id")
@_connection_options
def logs(run_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Show a run's logs (flwr log)."""
    conn, env = _connect(address, certs, insecure)
    _flwr(["log", run_id, conn, "--show"], env)


@click.command("stop")
@click.argument("run_id")
@_connection_options
def stop(run_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Stop a run (flwr stop)."""
    conn, env = _connect(address, certs, insecure)
    _flwr(["stop", run_id, conn], env)


# ----------------------------------------------------------------------------------------- app
@click.group()
def app() -> None:
    """The app bundle `fedtune run` ships: its digest, and Ed25519 signatures sites can require."""


def _shipped_digest() -> str:
    """The app digest of the bundle `fedtune run` ships with this fedtune (built by Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    from fedtune.client.app_guard import bundle_digest
    from fedtune.common.config import RunConfig
    from fedtune.server.coordinator import app_dir

    return bundle_digest(build_fab_from_disk(app_dir(RunConfig().to_flat())))


@app.command("hash")
def app_hash() -> None:
    """Print the app digest sites list in site.toml ([apps] trusted_hashes) to accept this fedtune's runs."""
    click.echo(_shipped_digest())


@app.command("keygen")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for app-signing.key and app-signing.pub.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair.")
def app_keygen(out: Path, overwrite: bool) -> None:
    """Create an Ed25519 key pair for signing app bundles (keep the private key offline)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    from fedtune.client.app_guard import key_fingerprint
    from fedtune.common.io import write_file_exclusive

    key = Ed25519PrivateKey.generate()
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / "app-signing.key", out / "app-signing.pub"
    write_file_exclusive(private, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600, overwrite=overwrite)
    write_file_exclusive(public, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) + b" fedtune-app-signing\n",
                         mode=0o644, overwrite=overwrite)
    click.echo(f"signing key (secret, keep offline): {private}")
    click.echo(f"public key for sites' [apps] trusted_signers: {public}  ({key_fingerprint(key.public_key())})")


@app.command("sign")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM from `fedtune app keygen`, or an unencrypted OpenSSH key).")
@click.option("--digest", default=None, help="The app digest to sign (from `fedtune app hash` on the run machine) [this fedtune's].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Signature file [$FEDTUNE_HOME/fedtune-signatures.json, which `fedtune run` ships].")
def app_sign(key_path: Path, digest: str | None, out: Path | None) -> None:
    """Sign the app digest; `fedtune run` ships the signatures, sites listing the key accept the bundle.

    Signatures of other digests (an older fedtune's bundle) are dropped from the file; one by the
    same key is replaced.
    """
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    from fedtune.client.app_guard import SIGNATURE_FILE, key_fingerprint, sign_digest
    from fedtune.server.coordinator import fedtune_home

    data = key_path.read_bytes() if key_path.is_file() else b""
    try:
        key = load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data else load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--key {key_path}: not an unencrypted PEM or OpenSSH private key ({err}).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"--key {key_path} holds a {type(key).__name__.lstrip('_')}; app signing keys are Ed25519 (`fedtune app keygen`).")
    digest = (digest or _shipped_digest()).strip().lower()
    try:
        entry = sign_digest(digest, key)
    except ValueError as err:
        raise ConfigError(f"--digest: {err}") from None
    out = out or fedtune_home() / SIGNATURE_FILE
    entries = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
    entries = [e for e in entries if e.get("digest") == digest and e.get("public_key") != entry["public_key"]] + [entry]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    click.echo(f"signed app digest {digest} with {key_fingerprint(key.public_key())}: {out} ({len(entries)} signature(s))")

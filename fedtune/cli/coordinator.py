"""The coordinator's commands: `fedtune certs`, `coordinator`, `status`, `logs`, `stop`.

Every command wraps a real Flower process or control call; heavy imports stay inside commands.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from fedtune.cli.root import warn_insecure
from fedtune.common.errors import ConfigError

# Admin commands dial the coordinator's admin listener (`coordinator start --admin-port`); sites dial --port.
DEFAULT_COORDINATOR = "127.0.0.1:9092"


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
        warn_insecure()
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


def connect(address: str, certs: Path | None, insecure: bool) -> tuple[str, dict[str, str]]:
    """The Flower connection for an admin command; refuses, in one line, without admin credentials."""
    from fedtune.server.coordinator import admin_connection

    if insecure:
        warn_insecure()
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
    conn, env = connect(address, certs, insecure)
    _flwr(["supernode", "register", str(pubkey), conn, "--name", name], env)


@coordinator.command("sites")
@_connection_options
def coordinator_sites(address: str, certs: Path | None, insecure: bool) -> None:
    """List registered sites: node ids and status (flwr supernode list)."""
    conn, env = connect(address, certs, insecure)
    _flwr(["supernode", "list", conn], env)


@coordinator.command("remove-site")
@click.argument("node_id")
@_connection_options
def coordinator_remove_site(node_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Unregister a site by its node id (flwr supernode unregister): its daemon is refused from then on."""
    conn, env = connect(address, certs, insecure)
    _flwr(["supernode", "unregister", node_id, conn], env)


@click.command("status")
@_connection_options
def status(address: str, certs: Path | None, insecure: bool) -> None:
    """List runs on the coordinator (flwr ls)."""
    conn, env = connect(address, certs, insecure)
    _flwr(["ls", conn], env)


@click.command("logs")
@click.argument("run_id")
@_connection_options
def logs(run_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Show a run's logs (flwr log)."""
    conn, env = connect(address, certs, insecure)
    _flwr(["log", run_id, conn, "--show"], env)


@click.command("stop")
@click.argument("run_id")
@_connection_options
def stop(run_id: str, address: str, certs: Path | None, insecure: bool) -> None:
    """Stop a run (flwr stop)."""
    conn, env = connect(address, certs, insecure)
    _flwr(["stop", run_id, conn], env)



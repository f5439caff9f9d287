"""The coordinator's processes and Flower's control commands, as fedtune runs them.

- ``flower-superlink`` on the loopback only, with TLS, node authentication, a persistent database
  and no per-run dependency installation, behind fedtune's gateway (``server/gateway.py``): a Fleet
  listener for sites and a Control listener that only admins holding a pinned client certificate
  can reach;
- a private Flower home (``$FEDTUNE_HOME/flower``, default ``~/.fedtune/flower``) holding the
  connection to the coordinator's admin listener, so fedtune never edits the user's own Flower config;
- ``flwr supernode register``, ``flwr run``, ``flwr ls``, ``flwr log`` and ``flwr stop`` against it,
  through ``python -m fedtune.server.admin_flwr`` (Flower's ``flwr`` presenting the admin certificate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

from fedtune.common.environment import flower_environment, flower_tool
from fedtune.common.errors import ConfigError
from fedtune.common.io import parse_host_port

logger = logging.getLogger(__name__)

CERT_FILES = ("ca.crt", "server.crt", "server.key", "admins.pem")
ADMIN_FILES = ("ca.crt", "admin.crt", "admin.key")
ADMIN_PORT = 9092
ADMIN_CERT_ENV = "FEDTUNE_ADMIN_CERT"
ADMIN_KEY_ENV = "FEDTUNE_ADMIN_KEY"


def superlink_command(*, certs: Path | None, state: Path, host: str, port: int) -> list[str]:
    """``flower-superlink`` for a real deployment (``certs`` None: --insecure, local experiments only).

    ``coordinator start`` binds it to 127.0.0.1 and puts the gateway in front (see `run_coordinator`).
    """
    state.mkdir(parents=True, exist_ok=True)
    cmd = [
        flower_tool("flower-superlink"),
        "--host", host,
        "--port", str(port),
        # Registered sites and runs survive a restart only with a database file.
        "--database", str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        return [*cmd, "--insecure"]
    missing = [name for name in CERT_FILES if not (certs / name).is_file()]
    if missing:
        raise ConfigError(f"--certs {certs} lacks {missing}; create them with `fedtune certs init --out {certs}`.")
    from .pki import load_admin_certificates, verify_server_certificate

    # Flower's SuperExec and the gateway dial the SuperLink on the loopback address: the certificate must name it.
    verify_server_certificate(certs / "ca.crt", certs / "server.crt", "127.0.0.1")
    load_admin_certificates(certs / "admins.pem")
    return [
        *cmd,
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.crt"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
    ]


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `coordinator start` dies (Linux), so no SuperLink is orphaned."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_coordinator(
    *, certs: Path | None, state: Path, host: str, port: int, admin_host: str, admin_port: int, superlink_port: int
) -> int:
    """Run ``flower-superlink`` on 127.0.0.1:``superlink_port`` and the gateway in front of it.

    Sites dial ``host:port`` (Fleet API only); admins dial ``admin_host:admin_port`` (Control API,
    admin certificate required); ``superlink_port`` 0 takes a free loopback port. Returns when either
    process stops: 0 after SIGTERM/SIGINT, non-zero if the SuperLink or a listener failed.
    ``certs`` None: plain text and no authentication anywhere.
    """
    from .gateway import GatewayConfig, serve

    if superlink_port == 0:
        # Nobody outside this process dials it, so any free port will do, and two coordinators on
        # one host (tests, trials) never collide on a default.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            superlink_port = int(probe.getsockname()[1])
    ports = {"--port": port, "--admin-port": admin_port, "--superlink-port": superlink_port}
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"--port, --admin-port and --superlink-port must differ, got {ports}.")
    cmd = superlink_command(certs=certs, state=state, host="127.0.0.1", port=superlink_port)
    env = flower_environment()
    env["FLWR_HOME"] = str(state.resolve() / "flower")  # installed app bundles stay in the state folder
    config = GatewayConfig(fleet_host=host, fleet_port=port, admin_host=admin_host, admin_port=admin_port,
                           superlink_port=superlink_port, certs=certs)
    # httpx logs every request at INFO: the gateway forwards several a second per site.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    # Its own session: a signal to ours reaches only this supervisor, which sends it exactly one SIGTERM.
    superlink = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        return asyncio.run(serve(config, superlink))
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superlink.kill()
                superlink.wait()


def fedtune_home() -> Path:
    return Path(os.environ.get("FEDTUNE_HOME", Path.home() / ".fedtune")).expanduser()


def admin_connection(coordinator: str, *, certs: Path | None) -> tuple[str, dict[str, str]]:
    """Check the admin's credentials and the listener at ``coordinator``; write the Flower connection to it.

    ``certs`` is the admin's folder (``ca.crt``, ``admin.crt``, ``admin.key``); None means plain text
    (``--insecure``). Every failure is one ConfigError line naming the fix.

    Returns:
        The connection's name and the environment for `flwr_command`.
    """
    if certs is None:
        check_admin_listener(coordinator, certs=None)
        return connection(coordinator, ca=None)
    missing = [name for name in ADMIN_FILES if not (certs / name).is_file()]
    if missing:
        raise ConfigError(
            f"--certs {certs} lacks {', '.join(missing)}: starting runs, reading them and registering sites needs the "
            "consortium's admin certificate (admin.crt and admin.key from `fedtune certs init` or `fedtune certs admin`); "
            "sites never get one."
        )
    from .pki import check_admin_credentials

    check_admin_credentials(certs / "admin.crt", certs / "admin.key")
    check_admin_listener(coordinator, certs=certs)
    name, env = connection(coordinator, ca=certs / "ca.crt")
    env[ADMIN_CERT_ENV] = str((certs / "admin.crt").resolve())
    env[ADMIN_KEY_ENV] = str((certs / "admin.key").resolve())
    return name, env


def check_admin_listener(coordinator: str, *, certs: Path | None, timeout: float = 10.0) -> None:
    """Ask ``coordinator`` which gateway listener it is, presenting the admin certificate in ``certs``.

    Raises:
        ConfigError: one line saying what answered (nothing, the Fleet port, a server the CA does not
            vouch for, a refusal of the admin certificate) and what to do.
    """
    import httpx

    from .gateway import ADMIN, FLEET, LISTENER_PATH

    host, port = parse_host_port(coordinator, where="--coordinator")
    where = f"--coordinator {coordinator}"
    verify: ssl.SSLContext | bool = False
    if certs is not None:
        verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        verify.load_cert_chain(certs / "admin.crt", certs / "admin.key")
    scheme = "http" if certs is None else "https"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}{LISTENER_PATH}"
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            response = client.get(url)
    except httpx.HTTPError as err:
        reason = _root_cause(err)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ConfigError(f"{where}: its certificate is not one {certs}/ca.crt vouches for ({reason.verify_message}); "
                              "use the consortium's ca.crt and a --coordinator name its certificate names.") from None
        if isinstance(reason, ConnectionRefusedError):
            raise ConfigError(f"{where}: nothing listens there; is the coordinator running, and is this its admin address "
                              f"(`coordinator start --admin-port`, default {ADMIN_PORT})?") from None
        # A TLS server that refuses a client certificate just drops the connection (asyncio sends no alert),
        # which the client sees as a disconnect or, with TLS 1.2, an EOF in the handshake.
        if certs is not None and (isinstance(err, httpx.RemoteProtocolError) or isinstance(reason, ssl.SSLError)):
            raise ConfigError(f"{where} refused the admin certificate {certs}/admin.crt: it is not in that coordinator's "
                              "admins.pem (or this is not a fedtune coordinator's admin port).") from None
        raise ConfigError(f"{where} did not answer as a fedtune coordinator's admin listener: {reason}.") from None
    answer = response.text.strip() if response.status_code == 200 else ""
    if answer == FLEET:
        raise ConfigError(f"{where} is the coordinator's Fleet port, for sites only; admin commands dial its admin port "
                          f"(`coordinator start --admin-port`, default {ADMIN_PORT}).")
    if answer != ADMIN:
        raise ConfigError(f"{where} did not answer as a fedtune coordinator's admin listener (HTTP {response.status_code}); "
                          f"give the address of `coordinator start --admin-port` (default {ADMIN_PORT}).")


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def connection(coordinator: str, *, ca: Path | None) -> tuple[str, dict[str, str]]:
    """Write the Flower connection for ``coordinator``; returns its name and the environment to use it.

    ``ca`` None means a plain-text connection (``--insecure``).
    """
    host, port = parse_host_port(coordinator, where="--coordinator")
    if ca is not None and not ca.is_file():
        raise ConfigError(f"CA certificate {ca} does not exist; it is DIR/ca.crt from `fedtune certs init`.")
    name = "fedtune-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{host}-{port}").strip("-")
    home = fedtune_home() / "flower"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f"address = {json.dumps(coordinator)}"]
    if ca is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(ca.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = flower_environment()
    env["FLWR_HOME"] = str(home)
    return name, env


def run_config_args(flat: Mapping[str, bool | int | float | str]) -> list[str]:
    """One ``--run-config`` argument holding every ``key=value``, values in TOML syntax.

    One argument, not one per key: Flower parses each argument into a nested dict and merges them
    with ``dict.update``, so a second ``data.*`` argument would drop the first one's ``data`` keys.
    """
    pairs = []
    for key, value in flat.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            if '"' in value:
                raise ConfigError(f"run setting {key} must not contain a double quote, got {value!r}.")
            text = json.dumps(value)
        pairs.append(f"{key}={text}")
    return ["--run-config", " ".join(pairs)]


# The signature file sites read (client/app_guard.py SIGNATURE_FILE; server/ never imports client/).
APP_SIGNATURES = "fedtune-signatures.json"


def app_dir(defaults: Mapping[str, bool | int | float | str]) -> Path:
    """A Flower app folder for ``flwr run``: just a pyproject naming fedtune's installed apps.

    The bundle carries no code: the coordinator and every site run the fedtune they installed
    (a site refuses any other bundle, see ``client/app_guard.py``). Every run_config key is
    declared (Flower accepts overrides of declared keys only). Signatures from ``fedtune app sign``
    (``$FEDTUNE_HOME/fedtune-signatures.json``) travel with it, for sites that require a signer.
    """
    import tomli_w

    from fedtune import __version__

    nested: dict[str, object] = {}
    for key, value in defaults.items():
        section, dot, sub = key.partition(".")
        if dot:
            nested.setdefault(section, {})[sub] = value  # type: ignore[index]
        else:
            nested[key] = value
    doc = {
        "project": {
            "name": "fedtune",
            "version": __version__,
            "description": "fedtune federated DP-LoRA run (apps come from the installed fedtune)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
            "config": nested,
        }}},
    }
    folder = Path(tempfile.mkdtemp(prefix="fedtune-app-"))
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    signatures = fedtune_home() / APP_SIGNATURES
    if signatures.is_file():
        (folder / APP_SIGNATURES).write_bytes(signatures.read_bytes())
    return folder


def flwr_command(*args: str) -> list[str]:
    """Flower's ``flwr`` presenting the admin certificate named in the environment (see `admin_connection`)."""
    return [sys.executable, "-m", "fedtune.server.admin_flwr", *args]

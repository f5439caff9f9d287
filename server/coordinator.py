"""The coordinator's processes and Flower's control commands, as fedtune runs them.

- ``flower-superlink`` with TLS, node authentication, a persistent database and no per-run
  dependency installation;
- a private Flower home (``$FEDTUNE_HOME/flower``, default ``~/.fedtune/flower``) holding the
  connection to the coordinator, so fedtune never edits the user's own Flower config;
- ``flwr supernode register``, ``flwr run``, ``flwr ls``, ``flwr log`` and ``flwr stop`` against it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

from fedtune.common.environment import flower_environment, flower_tool
from fedtune.common.errors import ConfigError
from fedtune.common.io import parse_host_port

CERT_FILES = ("ca.crt", "server.crt", "server.key")


def superlink_command(*, certs: Path | None, state: Path, host: str, port: int) -> list[str]:
    """``flower-superlink`` for a real deployment (``certs`` None: --insecure, local experiments only)."""
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
    from .pki import verify_server_certificate

    # Flower's SuperExec dials the SuperLink on the loopback address: the certificate must name it.
    verify_server_certificate(certs / "ca.crt", certs / "server.crt", "127.0.0.1")
    return [
        *cmd,
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.crt"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
    ]


def fedtune_home() -> Path:
    return Path(os.environ.get("FEDTUNE_HOME", Path.home() / ".fedtune")).expanduser()


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
    return [flower_tool("flwr"), *args]

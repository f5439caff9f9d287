"""Only the consortium's admins start runs and register sites: a real coordinator on 127.0.0.1.

`fedtune coordinator start` runs flower-superlink behind fedtune's gateway. A party holding exactly
what a site holds (``ca.crt``, its own node key, the Fleet address) tries what Flower's own ``flwr``
lets any Control API client do: list runs, submit a run, register a node key (a Sybil site), on the
Fleet port and on the admin port. Each is refused, and the admin's view of the SuperLink shows that
nothing happened. The admin, with the certificate from `fedtune certs init`, can do all of it.
No training: the refusals happen before any run would start.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from .deployment import CoordinatorPorts, Processes, fedtune, start_coordinator


@dataclass(frozen=True)
class Coordinator:
    root: Path
    certs: Path  # everything `certs init` wrote: the admin's folder too
    ports: CoordinatorPorts
    env: dict[str, str]
    site: Path  # what a site holds: ca.crt, node-key, node-key.pub


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    from fedtune.client.identity import create_node_key

    root = tmp_path_factory.mktemp("control-auth")
    env = {**os.environ, "FEDTUNE_HOME": str(root / "fedtune-home")}
    (root / "logs").mkdir()
    procs = Processes(root / "logs")
    certs = root / "certs"
    site = root / "site"
    site.mkdir()
    ports = CoordinatorPorts.free()
    try:
        fedtune("certs", "init", "--out", str(certs), env=env)
        shutil.copy(certs / "ca.crt", site / "ca.crt")
        create_node_key(site)
        start_coordinator(procs, certs=certs, state=root / "state", ports=ports, env=env)
        yield Coordinator(root=root, certs=certs, ports=ports, env=env, site=site)
    finally:
        procs.stop_all()


def _flwr(home: Path, *args: str) -> tuple[int, str]:
    """Flower's own CLI, in this process (imported once), as a site would run it; exit code and output."""
    from flwr.cli.app import app

    result = CliRunner().invoke(app, list(args), env={"FLWR_HOME": str(home)})
    return result.exit_code, result.output


def _site_flower_home(c: Coordinator) -> Path:
    """A Flower config with what a site holds: its CA certificate, and the two ports it can find."""
    home = c.root / "site-flower"
    home.mkdir(exist_ok=True)
    ca = str(c.site / "ca.crt")
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fleet"\n\n'
        f'[superlink.fleet]\naddress = "{c.ports.fleet_address}"\nroot-certificates = "{ca}"\n\n'
        f'[superlink.admin]\naddress = "{c.ports.admin_address}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    return home


@dataclass(frozen=True)
class AdminView:
    runs: int
    node_keys: list[bytes]


def _admin_view(c: Coordinator) -> AdminView:
    """What the SuperLink holds, asked through the admin listener with the admin certificate."""
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    from fedtune.server.admin_flwr import admin_context

    context = admin_context((c.certs / "ca.crt").read_bytes(), c.certs / "admin.crt", c.certs / "admin.key")
    client = ControlHttpClient(f"https://{c.ports.admin_address}", verify=context,
                               interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    try:
        runs = client.ListRuns(ListRunsRequest())
        nodes = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return AdminView(runs=len(runs.run_dict), node_keys=[n.public_key for n in nodes.nodes_info])


def _site_public_key(c: Coordinator) -> bytes:
    """The site's key as the SuperLink stores it (PEM SubjectPublicKeyInfo), read with cryptography, not Flower."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key((c.site / "node-key.pub").read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Attempt:
    exit_code: int
    output: str


@pytest.fixture(scope="module")
def site_attempts(coordinator: Coordinator) -> dict[tuple[str, str], Attempt]:
    """Execute: every Control API call a site would try, on both ports, with Flower's own CLI."""
    from fedtune.common.config import RunConfig
    from fedtune.server.coordinator import app_dir

    home = _site_flower_home(coordinator)
    app = app_dir(RunConfig().to_flat())
    calls = {
        "list runs": ["ls"],
        "start a run": ["run", str(app)],
        "register a node key": ["supernode", "register", str(coordinator.site / "node-key.pub")],
    }
    attempts = {}
    for port in ("fleet", "admin"):
        for what, args in calls.items():
            code, output = _flwr(home, *args, port)
            attempts[(port, what)] = Attempt(code, output)
    return attempts


@pytest.mark.parametrize("what", ["list runs", "start a run", "register a node key"])
def test_a_site_is_refused_on_the_fleet_port(site_attempts: dict[tuple[str, str], Attempt], what: str) -> None:
    attempt = site_attempts[("fleet", what)]

    assert attempt.exit_code != 0, attempt.output
    assert "403" in attempt.output, attempt.output


@pytest.mark.parametrize("what", ["list runs", "start a run", "register a node key"])
def test_a_site_is_refused_on_the_admin_port_without_an_admin_certificate(
    site_attempts: dict[tuple[str, str], Attempt], what: str
) -> None:
    attempt = site_attempts[("admin", what)]

    assert attempt.exit_code != 0, attempt.output
    assert "unavailable" in attempt.output.lower(), attempt.output


def test_nothing_a_site_tried_reached_the_superlink(site_attempts: dict[tuple[str, str], Attempt], coordinator: Coordinator) -> None:
    view = _admin_view(coordinator)

    assert view.runs == 0
    assert _site_public_key(coordinator) not in view.node_keys
    assert view.node_keys == []


def test_the_admin_registers_the_key_the_site_could_not(site_attempts: dict[tuple[str, str], Attempt], coordinator: Coordinator) -> None:
    # Flower refuses a key registered twice: success also proves no attempt above registered it.
    result = fedtune("coordinator", "add-site", str(coordinator.site / "node-key.pub"), "--name", "site-x",
                     "--coordinator", coordinator.ports.admin_address, "--certs", str(coordinator.certs), env=coordinator.env)

    assert re.search(r"SuperNode \d+ registered", result.stdout), result.stdout
    assert _admin_view(coordinator).node_keys == [_site_public_key(coordinator)]


@pytest.mark.parametrize("command", [["status"], ["logs", "1"], ["stop", "1"], ["run", "--labels", "a,b"],
                                     ["coordinator", "add-site", "NODE_KEY", "--name", "site-x"]])
def test_admin_commands_refuse_a_site_s_folder_in_one_line(coordinator: Coordinator, command: list[str]) -> None:
    args = [str(coordinator.site / "node-key.pub") if a == "NODE_KEY" else a for a in command]

    result = fedtune(*args, "--coordinator", coordinator.ports.admin_address, "--certs", str(coordinator.site),
                     env=coordinator.env, check=False)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("fedtune: error: ") and "admin.crt" in result.stderr, result.stderr


def test_an_admin_certificate_the_coordinator_does_not_list_is_refused(coordinator: Coordinator) -> None:
    # Prepare: a well-formed admin certificate made by someone else (anyone can run `certs admin`).
    mallory = coordinator.root / "mallory"
    fedtune("certs", "admin", "--out", str(mallory), "--name", "mallory", env=coordinator.env)
    shutil.copy(coordinator.site / "ca.crt", mallory / "ca.crt")

    # Execute: through fedtune, and straight at the admin listener with Flower's request.
    result = fedtune("status", "--coordinator", coordinator.ports.admin_address, "--certs", str(mallory),
                     env=coordinator.env, check=False)
    context = ssl.create_default_context(cafile=str(mallory / "ca.crt"))
    context.load_cert_chain(mallory / "admin.crt", mallory / "admin.key")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"https://{coordinator.ports.admin_address}/v1/control/list-runs", content=b"", verify=context,
                   headers={"content-type": "application/protobuf"}, timeout=10)

    # Assert
    assert result.returncode == 2
    assert "refused the admin certificate" in result.stderr, result.stderr


def test_admin_commands_aimed_at_the_fleet_port_say_so(coordinator: Coordinator) -> None:
    result = fedtune("status", "--coordinator", coordinator.ports.fleet_address, "--certs", str(coordinator.certs),
                     env=coordinator.env, check=False)

    assert result.returncode == 2
    assert "is the coordinator's Fleet port" in result.stderr, result.stderr


@pytest.mark.parametrize("path", ["/v1/runtime/acquire-task", "/v1/control/list-runs", "/docs"])
def test_the_fleet_port_refuses_everything_but_the_fleet_api(coordinator: Coordinator, path: str) -> None:
    context = ssl.create_default_context(cafile=str(coordinator.site / "ca.crt"))

    reply = httpx.post(f"https://{coordinator.ports.fleet_address}{path}", content=b"", verify=context, timeout=10)
    health = httpx.get(f"https://{coordinator.ports.fleet_address}/health", verify=context, timeout=10)

    assert reply.status_code == 403, reply.text
    assert health.status_code == 200


def _raw_request(port: int, ca: Path, target: str) -> bytes:
    """One HTTP request with ``target`` exactly as written (an HTTP library would normalise it first)."""
    import socket

    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
                        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(4096):
                reply += chunk
    return reply


@pytest.mark.parametrize("target", ["/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                                    "/v1/fleet/./../control/list-runs", "/v1/fleet/..%2Fcontrol/list-runs"])
def test_the_fleet_port_refuses_paths_that_climb_out_of_the_fleet_api(coordinator: Coordinator, target: str) -> None:
    reply = _raw_request(coordinator.ports.fleet, coordinator.site / "ca.crt", target)

    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]

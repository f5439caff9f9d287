"""`fedtune simulate --ray-address`: the simulated sites run on an existing Ray cluster.

A local Ray head (`ray start --head --block`, 2 CPUs, every port chosen free) stands in for a
cluster; a tiny 2-site, 1-round simulation connects to it through the CLI at 127.0.0.1. The head is
ended by signalling its own process group, never with `ray stop`: that stops every Ray process on
the machine, other people's included. That test is marked slow (Ray's start and two actors: a minute or more).

Ray turns --node-ip-address=127.0.0.1 into the machine's address unless told that this is a
one-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its macOS/Windows mode), so both the head
and the driver run with that: the node's address is the loopback one. Ray's GCS and raylet still
listen on every interface (as every Ray that Flower's simulation starts does); nothing is advertised
beyond loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HEAD_START_SECONDS = 600  # Ray waits 30 s for its raylet; a busy 2-core machine may need a few tries
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_head(ray: str, temp: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`ray start --head --block` on 127.0.0.1 with free ports, in a session of its own."""
    port, worker_low = free_port(), free_port()
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(), "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    log = Path(temp) / f"head-{port}.out"
    with log.open("w") as out:
        head = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
             f"--min-worker-port={worker_low}", f"--max-worker-port={worker_low + 200}",
             *(f"{flag}={value}" for flag, value in ports.items())],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **LOOPBACK_ONLY},
        )
    return head, port, log


def stop_head(head: subprocess.Popen[bytes]) -> None:
    """End `ray start --block` and everything it started: they share its session (and die with it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, Path]]:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        pytest.skip("ray's command line is not installed (it comes with flwr[simulation]); no cluster to start")
    # A short folder of its own: Ray's sockets live under it (Unix socket paths are limited to ~107 bytes),
    # and another Ray on this machine keeps its own /tmp/ray.
    temp = tempfile.mkdtemp(prefix="ftray", dir="/tmp")
    deadline = time.monotonic() + HEAD_START_SECONDS
    head = None
    try:
        # Ray gives its raylet 30 s to register; on a loaded machine a start can miss that: try again, within the bound.
        while True:
            head, port, log = start_head(ray, temp)
            while head.poll() is None and "Ray runtime started" not in log.read_text(errors="replace") and time.monotonic() < deadline:
                time.sleep(1)
            if head.poll() is None and "Ray runtime started" in log.read_text(errors="replace"):
                break
            stop_head(head)
            if time.monotonic() >= deadline:
                pytest.fail(f"the Ray head did not start within {HEAD_START_SECONDS}s:\n{log.read_text(errors='replace')[-3000:]}")
        yield f"127.0.0.1:{port}", Path(temp)
    finally:
        if head is not None:
            stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_ray_cluster(ray_head: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    address, head_temp = ray_head
    run_dir = tmp_path / "run"

    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", "--ray-address", address, "--base-model", str(tiny_model_dir),
         "--sites", "2", "--rounds", "1", "--max-length", "32", "--out", str(run_dir)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, env={**os.environ, **LOOPBACK_ONLY},
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["site"] for s in summary["sites"]] == ["site-0", "site-1"]
    log = (run_dir / "log.txt").read_text()
    # Ray's driver says which it did: joined the cluster at that address, or started one of its own.
    assert "Connecting to existing Ray cluster" in log and address in log
    assert "Started a local Ray instance" not in log
    # The sites ran as actors of that cluster: its own worker logs (under the head's --temp-dir) name them.
    # Not the driver's log.txt: Ray forwards actor output asynchronously, and a run that ends quickly can
    # exit before the forwarded lines arrive (seen in a full `make test`).
    worker_logs = "".join(p.read_text(errors="replace") for p in head_temp.glob("session_*/logs/worker-*"))
    assert "ClientAppActor" in worker_logs, "no ClientAppActor ran on the cluster"


def test_an_address_nothing_answers_at_is_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    port = free_port()  # bound and released: nothing listens there now
    run_dir = tmp_path / "run"

    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", "--ray-address", f"127.0.0.1:{port}", "--sites", "2", "--rounds", "1",
         "--out", str(run_dir)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fedtune: error: --ray-address 127.0.0.1:{port}: nothing answered there ([Errno 111] Connection refused); "
        "start a cluster with `ray start --head --port=PORT` and give its HOST:PORT."
    ]
    assert not run_dir.exists(), "refused before the run directory is made"

"""Real fedtune deployment processes on 127.0.0.1 for tests: bounded in time, always cleaned up."""

from __future__ import annotations

import csv
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common.sitedata import demo_data_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CoordinatorPorts:
    """The three ports of `fedtune coordinator start`: sites (Fleet), admins (Control), and the loopback SuperLink."""

    fleet: int
    admin: int
    superlink: int

    @classmethod
    def free(cls) -> CoordinatorPorts:
        ports: list[int] = []
        while len(ports) < 3:
            if (port := free_port()) not in ports:
                ports.append(port)
        return cls(*ports)

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.fleet}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin}"

    def args(self) -> list[str]:
        return ["--port", str(self.fleet), "--admin-port", str(self.admin), "--superlink-port", str(self.superlink)]


def fedtune(*args: str, env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "fedtune.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"fedtune {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def write_site_data(path: Path, rows: slice) -> Path:
    with open(demo_data_path(), newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))[rows]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in records)
    return path


def wait_for_tls(port: int, ca: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    context = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"coordinator on 127.0.0.1:{port} did not accept TLS within {timeout}s")


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@dataclass
class Processes:
    """Started daemons, each in its own process group; ``stop_all`` ends every one of them."""

    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.running[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        else:  # Flower's helpers may outlive a daemon that exited: end its whole group anyway
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self, name: str, timeout: float = 15) -> None:
        """SIGKILL ``name``'s own process only: its children in their own sessions get what they asked for on its death."""
        proc = self.running.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)

    def crash(self, name: str, timeout: float = 15) -> None:
        """SIGKILL ``name`` and every process it started (their own sessions included), as a crash of its host would."""
        proc = self.running.pop(name)
        # Leaves first: a killed parent would send its children the SIGTERM they asked for (PR_SET_PDEATHSIG),
        # and a SuperNode that gets one deactivates gracefully, which a crash never does.
        for pid in [*reversed(descendants(proc.pid)), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=timeout)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                # The command name (2nd field) is in parentheses and may hold spaces: split after it.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        out.append(child)
        queue += children.get(child, [])
    return out


def start_coordinator(procs: Processes, *, certs: Path, state: Path, ports: CoordinatorPorts, env: dict[str, str]) -> None:
    """`fedtune coordinator start` on 127.0.0.1, returning once both of its listeners accept connections."""
    procs.start("coordinator", ["coordinator", "start", "--certs", str(certs), "--state", str(state), *ports.args()], env)
    wait_for_tls(ports.fleet, certs / "ca.crt")
    wait_for_port(ports.admin)

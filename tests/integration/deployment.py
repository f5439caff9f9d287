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

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

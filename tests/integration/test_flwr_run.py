"""The Flower way, as the README gives it: `flwr run .` from the repository, on Flower's own local
SuperLink, with nothing installed at run time.

`flwr` starts a local SuperLink in simulation mode on first use (here on free ports, with its own
FLWR_HOME, stopped at the end) and builds the app from this repository. Marked slow (a minute or two).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).parent / "flwr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_local_superlink(home: Path) -> None:
    """The detached SuperLink `flwr` started, and its simulation: only processes that name this FLWR_HOME."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if str(home) in cmd or env.get("FLWR_HOME") == str(home):
            for child in proc.children(recursive=True):
                child.send_signal(signal.SIGKILL)
            proc.send_signal(signal.SIGKILL)


def test_flwr_run_from_the_repository_trains_and_writes_the_run_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {
        **os.environ,
        # As with the venv active: `flwr` launches `flower-superlink` from PATH.
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The README's variable: the local SuperLink runs the app in this environment instead of
        # `uv sync`ing its dependencies into a fresh one (a multi-GB torch download).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    overrides = (f'federation.sites=2 federation.rounds=1 model.max_length=32 model.base_model="{tiny_model_dir}" '
                 f'out="{out}"')
    try:
        started = subprocess.run([str(FLWR), "run", ".", "--run-config", overrides, "--format", "json"], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "uv sync" not in started.stdout + started.stderr
        reply = json.loads(started.stdout)
        assert reply.get("success"), reply
        run_id = reply["run-id"]
        status, deadline = "", time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = subprocess.run([str(FLWR), "ls", "--run-id", str(run_id), "--format", "json"], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=60)
            status = json.loads(listed.stdout)["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(2)
        log = (home / "local-superlink" / "superlink.log").read_text(errors="replace")
        assert status == "finished:completed", f"run status {status!r}; SuperLink log tail:\n{log[-3000:]}"
        assert "uv sync" not in log, "the app's dependencies were installed at run time"
    finally:
        _stop_local_superlink(home)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["dp"] is True and summary["max_epsilon"] > 0
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

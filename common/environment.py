"""The environment fedtune gives Flower's processes (daemons, ServerApp and ClientApp processes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

OFFLINE = {
    # No hub: models come from local folders or the packaged default.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Flower would otherwise install each run's app dependencies (an unpinned, multi-GB torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec looks for new ServerApp/ClientApp tasks every 1 s by default; each message of a
    # round waits for that poll, so poll faster (the SuperNode's and Grid's own 3 s polls are fixed).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def flower_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) made offline, with this interpreter's scripts first on PATH.

    Flower starts its helpers (flower-superexec, flwr-clientapp, flwr-serverapp) by name, so the
    scripts folder of the interpreter running fedtune must come first.
    """
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter (or the bare name)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name

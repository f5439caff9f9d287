"""What `fedtune simulate`'s console (simulations/console.py) changes in the process, and that it puts it back.

No Ray starts here (the address is refused before ``ray.init``); the test with a real local Ray is
tests/integration/test_console_ray.py.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from fedtune.common.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_pythonpath_gets_sys_path_once_however_often_init_ray_runs_and_is_put_back(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.simulations.console import init_ray, run_console

    monkeypatch.setenv("PYTHONPATH", "/earlier/path")
    address = f"127.0.0.1:{_closed_port()}"  # refused before ray.init, after PYTHONPATH is set

    with run_console(tmp_path / "run"):
        for _ in range(2):
            with pytest.raises(ConfigError, match="nothing answered there"):
                init_ray(address=address, num_cpus=1, log_file=None, verbose=False)
        inside = os.environ["PYTHONPATH"].split(os.pathsep)

    assert inside == [*sys.path, "/earlier/path"]
    assert os.environ["PYTHONPATH"] == "/earlier/path"

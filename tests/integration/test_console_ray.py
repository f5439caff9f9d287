"""`fedtune simulate`'s console (simulations/console.py) around a real local Ray: what it changes, and that it puts it back.

Starts Ray on this machine (one CPU, no dashboard, about 20 s) and shuts it down; no simulation runs.
The console's checks that need no Ray are tests/unit/test_console.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def test_the_log_forwarding_and_its_environment_are_put_back_on_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from fedtune.simulations.console import init_ray, run_console

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    try:
        with run_console(tmp_path / "run") as log_file:
            init_ray(address=None, num_cpus=1, log_file=log_file, verbose=False)  # a real local Ray
            inside = ([name for name, _ in dispatcher.handlers], os.environ.get("RAY_COLOR_PREFIX"), os.environ.get("PYTHONPATH"))
        # Ray still runs (as when Flower does not shut it down): its own printing is back, ours is gone.
        after = [name for name, _ in dispatcher.handlers]
        env_after = (os.environ.get("RAY_COLOR_PREFIX"), os.environ.get("PYTHONPATH"))
    finally:
        ray.shutdown()

    assert "fedtune_log_file" in inside[0] and "ray_print_logs" not in inside[0]
    assert inside[1] == "0" and inside[2] == os.pathsep.join(sys.path)
    assert after.count("ray_print_logs") == 1 and "fedtune_log_file" not in after
    assert env_after == (None, None), "unset before, unset after"
    assert "ray_print_logs" not in [name for name, _ in dispatcher.handlers], "ray.shutdown removed it; nothing put it back"

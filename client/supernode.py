"""``flower-supernode`` with a short idle poll: ``python -m fedtune.client.supernode [flower-supernode args]``.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s after
every pull that finds no message, and 0.5 s between checks for the ClientApp's reply. A message
therefore waits 1.5 s on average before the site even sees it, twice per round. Flower has no
setting for either, so this entry point gives that one module a clock whose sleeps are capped at
the site's poll interval (``FEDTUNE_SUPERNODE_POLL`` seconds, default 0.2), then runs Flower's
own ``flower-supernode`` unchanged. The cost is more pull requests to the coordinator while idle:
five a second per site at the default.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any

POLL_ENV = "FEDTUNE_SUPERNODE_POLL"
DEFAULT_POLL = 0.2
_LOOP_MODULE = "flwr.supernode.start_client_internal"


class CappedClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: sleeps last at most ``cap``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def poll_interval(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    raw = environ.get(POLL_ENV, "")
    if not raw:
        return DEFAULT_POLL
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{POLL_ENV} must be a number of seconds in (0, 3], got {raw!r}") from None
    if not 0 < value <= 3:
        raise SystemExit(f"{POLL_ENV} must be a number of seconds in (0, 3], got {raw!r}")
    return value


def install(cap: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (by module path: the package re-exports a function of that name)."""
    module = importlib.import_module(_LOOP_MODULE)
    if not hasattr(module, "time"):
        raise RuntimeError(f"{_LOOP_MODULE} no longer uses the time module; re-check the SuperNode poll patch")
    module.time = CappedClock(cap)  # type: ignore[attr-defined]


def main() -> None:
    install(poll_interval())
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()

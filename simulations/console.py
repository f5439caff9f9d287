"""What `fedtune simulate` shows on the terminal, and where everything else goes (RUN_DIR/log.txt).

The terminal gets fedtune's own lines (the run's header, one line per round, the summary, fedtune's
warnings and errors). Flower's and Ray's INFO logs, third-party warnings and whatever the simulated
sites (Ray actors, separate processes) write to their stderr go to ``RUN_DIR/log.txt``; with
``--verbose`` they are shown as well, each once.

Why each piece is needed:

- Opacus calls ``logging.basicConfig`` when imported, which puts a console handler on the root logger;
  Flower's logger has its own console handler and also propagates to the root, so every Flower line
  appeared twice. While a run lasts, both console handlers are set aside and every record reaches
  the root's handlers once: the log file, and the terminal only with ``--verbose``.
- Python warnings (Ray's FutureWarning, a library's DeprecationWarning) become log records
  (``logging.captureWarnings``), so they land in the same file.
- Ray forwards the actors' stdout/stderr to the driver (``log_to_driver``) and prints them on the
  driver's terminal. Ray is initialised here, before Flower's backend would (it then reuses this
  instance), so that the forwarded lines can be written to the log file instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError, FedtuneError

LOG_FILE = "log.txt"
_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
# Ray's name for the driver-side handler that prints forwarded worker output (ray/_private/worker.py).
_RAY_PRINT_HANDLER = "ray_print_logs"
_RAY_FILE_HANDLER = "fedtune_log_file"
_forwarded: list[Any] = []  # the open log file the actors' output is written to, closed by run_console
# What init_ray changed in this process, put back when run_console exits: environment variables as they
# were (None: unset), and Ray's print handler set aside while the actors' output goes to the log file.
_saved_env: dict[str, str | None] = {}
_saved_print_handlers: list[tuple[str, Any]] = []


@contextmanager
def run_console(run_dir: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Send third-party logs and warnings to ``run_dir/log.txt`` (and to the terminal only if ``verbose``).

    Restores the logging and warnings configuration it changed on exit. Yields the log file's path.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOG_FILE
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    from flwr.common.logger import console_handler as flower_console

    # Every record reaches the root logger once: Flower's own console handler goes (its records
    # propagate), and so do console handlers a library's basicConfig left on the root (Opacus).
    flower = logging.getLogger("flwr")
    flower_had_console = flower_console in flower.handlers
    flower.removeHandler(flower_console)
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    root.handlers = [h for h in root.handlers if not _is_terminal_handler(h)] + [file_handler] + ([terminal] if verbose else [])
    root.setLevel(logging.INFO)

    # fedtune's own warnings and errors stay on the terminal (its INFO lines: the file, and the terminal if verbose).
    own = logging.StreamHandler(sys.stderr)
    own.setLevel(logging.WARNING)
    own.setFormatter(logging.Formatter("fedtune: %(levelname)s: %(message)s"))
    fedtune_logger = logging.getLogger("fedtune")
    if not verbose:
        fedtune_logger.addHandler(own)
    saved_fedtune_level = fedtune_logger.level
    fedtune_logger.setLevel(logging.INFO)

    import ray  # noqa: F401  (configures its "ray" logger, which does not propagate, at import)

    ray_logger = logging.getLogger("ray")
    saved_ray = list(ray_logger.handlers)
    # A handler of its own: ray.init sets the format of every handler on its logger.
    ray_file = logging.FileHandler(path, encoding="utf-8")
    ray_file.setLevel(logging.INFO)
    ray_logger.handlers = [ray_file] + (saved_ray if verbose else [])

    with warnings.catch_warnings():
        logging.captureWarnings(True)  # warnings become records of "py.warnings": the file (and the terminal if verbose)
        try:
            yield path
        finally:
            _restore_ray_settings()
            logging.captureWarnings(False)
            ray_logger.handlers = saved_ray
            fedtune_logger.removeHandler(own)
            fedtune_logger.setLevel(saved_fedtune_level)
            if flower_had_console:
                flower.addHandler(flower_console)
            root.handlers = saved_root[1]
            root.setLevel(saved_root[0])
            file_handler.close()
            ray_file.close()


def _is_terminal_handler(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def init_ray(*, address: str | None, num_cpus: int, log_file: Path | None, verbose: bool) -> None:
    """Start Ray on this machine, or connect to the cluster at ``address``, for Flower's simulation engine.

    Flower's Ray backend reuses an initialised Ray (``RayBackend.init_ray``) and shuts it down when
    the simulation ends (for a cluster: it disconnects; the cluster stays up). What it would pass
    itself is passed here too: the driver's ``sys.path`` as the actors' PYTHONPATH, no dashboard.
    Connecting to a cluster, Ray refuses a CPU count (the cluster's nodes declare theirs).

    Unless ``verbose``, the actors' forwarded output goes to ``log_file`` instead of the terminal.
    What it changes in this process (PYTHONPATH, Ray's colour prefix, where forwarded output goes)
    ``run_console`` puts back on exit.
    """
    import ray

    # From PYTHONPATH as it was before any init_ray of this run_console: a second call must not append again.
    before = _saved_env["PYTHONPATH"] if "PYTHONPATH" in _saved_env else os.environ.get("PYTHONPATH")
    pythonpath = os.pathsep.join([*sys.path, *([before] if before else [])])
    _set_env("PYTHONPATH", pythonpath)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, "log_to_driver": True,
                              "logging_level": logging.INFO}
    if address:
        check_reachable(address)
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        ray.init(**kwargs)
    except ConnectionError as err:  # nothing answered at --ray-address
        raise ConfigError(f"--ray-address {address}: no Ray cluster answered there ({err}); start one with "
                          "`ray start --head --port=PORT` and give its HOST:PORT.") from None
    except Exception as err:  # Ray raises a bare Exception when its raylet misses its fixed 30 s start-up window
        if "timed out during startup" not in str(err):
            raise
        load = os.getloadavg()[0]
        raise FedtuneError(f"Ray did not start on this machine: {err} (load average {load:.1f} on {os.cpu_count()} CPUs). "
                           "Try again when the machine is less busy, or run on a started cluster with --ray-address.") from None
    if not verbose and log_file is not None:
        _forward_actor_output(log_file)


def check_reachable(address: str) -> None:
    """Refuse a --ray-address that nothing listens on, at once (Ray itself retries for minutes).

    ``auto`` (Ray's "the cluster started on this machine") is left to Ray.
    """
    import socket

    if address == "auto":
        return
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigError(f"--ray-address must be HOST:PORT (the head's GCS address, as `ray start --head` printed it) or 'auto', "
                          f"got {address!r}.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"--ray-address {address}: nothing answered there ({err}); start a cluster with "
                          "`ray start --head --port=PORT` and give its HOST:PORT.") from None


def _forward_actor_output(log_file: Path) -> None:
    """Write the actors' forwarded stdout/stderr to ``log_file`` instead of printing it on the terminal.

    Ray offers no public hook for where ``log_to_driver`` output goes: its driver prints it through
    a handler registered on ``ray._private.ray_logging.global_worker_stdstream_dispatcher``. If that
    moves in a later Ray, the output stays on the terminal (a warning in the log file says so) and
    the console test fails, rather than the run.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_worker_logs
    except ImportError:
        logging.getLogger(__name__).warning("this Ray has no worker stream dispatcher: site output stays on the terminal")
        return
    _stop_forwarding()
    out = log_file.open("a", encoding="utf-8")
    _forwarded.append(out)
    _set_env("RAY_COLOR_PREFIX", "0")  # read by Ray at each line: no terminal colour codes in a file

    def write(data: dict[str, Any]) -> None:
        # Ray's own formatting (actor name and pid prefix; autoscaler status reduced to its events).
        print_worker_logs(data, out)
        out.flush()

    if not _saved_print_handlers:
        _saved_print_handlers.extend(pair for pair in dispatcher.handlers if pair[0] == _RAY_PRINT_HANDLER)
    dispatcher.remove_handler(_RAY_PRINT_HANDLER)
    dispatcher.add_handler(_RAY_FILE_HANDLER, write)


def _stop_forwarding() -> None:
    if not _forwarded:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_RAY_FILE_HANDLER)
    while _forwarded:
        _forwarded.pop().close()


def _set_env(key: str, value: str) -> None:
    _saved_env.setdefault(key, os.environ.get(key))
    os.environ[key] = value


def _restore_ray_settings() -> None:
    """Undo what init_ray did to this process, so a later run (or the caller) starts from what it had.

    Ray's print handler goes back only while Ray is still initialised (a cluster connection Flower did
    not shut down): ``ray.shutdown`` removes it itself, and the next ``ray.init`` adds a fresh one.
    """
    _stop_forwarding()
    if _saved_print_handlers:
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if ray.is_initialized() and not any(name == _RAY_PRINT_HANDLER for name, _ in dispatcher.handlers):
            for name, handler in _saved_print_handlers:
                dispatcher.add_handler(name, handler)
        _saved_print_handlers.clear()
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()

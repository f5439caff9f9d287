"""Flower's ``flower-supernode`` as a site runs it: ``python -m fedtune.client.supernode [fedtune flags] [flower-supernode args]``.

Three changes to Flower 1.42's SuperNode, each to one module, made before it starts:

- **Only the site's own code runs.** Flower installs the app bundle (FAB) a run ships and puts
  its folder first on ``sys.path`` when it loads the ClientApp, so a bundle naming
  ``fedtune.client.app:app`` could still ship its own ``fedtune/``. Every bundle the SuperNode
  pulls now goes through :class:`~fedtune.client.app_guard.AppGuard` *before* Flower stores it
  (only a stored bundle is ever handed to a ClientApp process to install and import). A refused
  bundle gets one log line on the site and, for each of the run's messages, the error reply
  ``untrusted-app site=<name>`` (Flower's own path for a FAB it cannot verify), so the
  coordinator's ServerApp sees a refusal at once instead of waiting for a timeout.
- **The ClientApp cannot write the ledger or the node key.** With ``--fedtune-writable DIR``
  the process gives up, through Linux Landlock, write access everywhere but under the listed
  folders, for itself and every process it starts (Flower's SuperExec and each message's
  ClientApp process). The site daemon lists only Flower's home (``state/flower``) when the warm
  worker, which is not under this restriction, does the training and owns the ledger.
- **A short idle poll.** Flower's loop (``flwr.supernode.start_client_internal``) sleeps a fixed
  3 s after every pull that finds no message and 0.5 s between checks for the ClientApp's reply;
  that module gets a clock whose sleeps are capped at ``FEDTUNE_SUPERNODE_POLL`` seconds (default
  0.2), at the cost of more pull requests while idle (five a second per site).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .app_guard import AppGuard, UntrustedApp

# By name: run as ``python -m`` this module is ``__main__``, and its lines must still be fedtune's.
logger = logging.getLogger("fedtune.client.supernode")

POLL_ENV = "FEDTUNE_SUPERNODE_POLL"
DEFAULT_POLL = 0.2
_LOOP_MODULE = "flwr.supernode.start_client_internal"
SITE_CONFIG_FLAG = "--fedtune-site-config"
WRITABLE_FLAG = "--fedtune-writable"


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


# ------------------------------------------------------------------------------------ app gate
def install_app_gate(guard: AppGuard) -> None:
    """Check every bundle Flower's SuperNode pulls before it is stored; refuse untrusted ones with a reply.

    Flower's loop fetches a run's bundle (``get_fab``) inside ``_pull_and_store_message`` the
    first time a message of that run arrives, and stores it only after its own checks pass. The
    wrapper hands that function a ``get_fab`` that checks the bytes and raises on refusal; the
    refused run is never stored, so each later message of it is checked (and refused) again.
    """
    module = importlib.import_module(_LOOP_MODULE)
    for name in ("_pull_and_store_message", "_insert_message"):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"{_LOOP_MODULE}.{name} is gone; re-check the SuperNode app gate in client/supernode.py")
    original = module._pull_and_store_message
    if getattr(original, "fedtune_gate", False):
        return
    from flwr.app import Error, Message

    from fedtune.common.messages import REFUSAL_ERROR_CODE, Refusal, RefusalCode

    def pull_and_store_message(**kwargs: Any) -> int | None:
        received: list[Message] = []
        receive: Callable[[], Any] = kwargs["receive"]
        get_fab: Callable[[str, int], Any] = kwargs["get_fab"]

        def receive_and_keep() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            try:
                accepted = guard.check(fab.content)
            except UntrustedApp:
                raise
            except Exception as err:  # noqa: BLE001 - fail closed: a bundle the check cannot judge is refused
                raise UntrustedApp(f"the bundle could not be checked ({type(err).__name__}: {err}).") from err
            logger.info("run %d: app bundle %s accepted (app digest %s%s)", run_id, fab_hash[:12], accepted.digest,
                        f", trusted by {accepted.trusted_by}" if accepted.trusted_by else "")
            return fab

        try:
            return original(**{**kwargs, "receive": receive_and_keep, "get_fab": checked_get_fab})  # type: ignore[no-any-return]
        except UntrustedApp as err:
            message = received[-1]
            site = str(kwargs["node_config"].get("site-name", "")) or "unnamed"
            logger.error("run %d: refused the app bundle (FAB %s) and its %s message: %s", message.metadata.run_id,
                         _fab_hash(kwargs, message), message.metadata.message_type, err)
            reason = Refusal(site=site, code=RefusalCode.UNTRUSTED_APP).reason()
            state = kwargs["state"]
            # Flower reports each reply's processing time, and logs an ERROR when the message it
            # replies to has no record. Stored without content and with no task, the message is
            # out of every ClientApp's reach; Flower deletes it once the reply is sent.
            state.store_message(message)
            state.record_message_processing_start(message.metadata.message_id)
            state.record_message_processing_end(message.metadata.message_id)
            module._insert_message(Message(Error(code=REFUSAL_ERROR_CODE, reason=reason), reply_to=message),
                                   state, kwargs["object_store"])
            return int(message.metadata.run_id)

    pull_and_store_message.fedtune_gate = True  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_store_message  # type: ignore[attr-defined]


def _fab_hash(kwargs: dict[str, Any], message: Any) -> str:
    """The refused run's FAB hash for the log, if Flower's run record is at hand (best effort)."""
    try:
        return str(kwargs["get_run"](message.metadata.run_id).fab_hash)[:12]
    except Exception:  # noqa: BLE001 - only the log line loses its hash
        return "?"


# ------------------------------------------------------------------------------- write sandbox
# Linux Landlock (5.13+): an unprivileged process restricts itself and all its descendants; the
# restriction can never be lifted. Syscall numbers are the same on every architecture.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_WRITE_FILE, _TRUNCATE = 1 << 1, 1 << 14  # the only write rights that apply to a single file
_WRITE_RIGHTS_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove and make-anything
_REFER = 1 << 13  # ABI 2: rename/link across folders
# What every process of the tree may still write besides the listed folders.
ALWAYS_WRITABLE = (Path(os.devnull),)


class SandboxUnavailable(OSError):
    """The kernel offers no Landlock (too old, disabled at boot, or filtered by a container)."""


def restrict_writes(writable: Sequence[Path]) -> int:
    """Forbid this process and every process it starts to write anywhere but beneath ``writable``.

    Reading is left alone (Python, Flower and the node key must still be read). Must run before
    the process starts threads: Landlock restricts the calling thread and what it creates.
    Returns the Landlock ABI version used; raises SandboxUnavailable if there is none.
    """
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_long(0), ctypes.c_long(_CREATE_RULESET_VERSION))
    if abi < 1:
        raise SandboxUnavailable(ctypes.get_errno(), f"Landlock is unavailable: {os.strerror(ctypes.get_errno())}")
    handled = _WRITE_RIGHTS_V1 | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled))  # struct landlock_ruleset_attr, fs part only
    ruleset = syscall(ctypes.c_long(_SYS_CREATE_RULESET), attr, ctypes.c_long(8), ctypes.c_long(0))
    if ruleset < 0:
        raise SandboxUnavailable(ctypes.get_errno(), f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for path in [*writable, *ALWAYS_WRITABLE]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rights = handled if os.path.isdir(path) else handled & (_WRITE_FILE | _TRUNCATE)
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd))  # struct landlock_path_beneath_attr (packed)
                if syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(_RULE_PATH_BENEATH), rule, ctypes.c_long(0)):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule for {path} failed: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            raise OSError(ctypes.get_errno(), f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        if syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_long(0)):
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return int(abi)


# ---------------------------------------------------------------------------------------- main
def split_args(argv: Sequence[str]) -> tuple[Path | None, list[Path], list[str]]:
    """fedtune's own flags (site config, writable folders) and the rest, for flower-supernode."""
    site_config: Path | None = None
    writable: list[Path] = []
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        if arg in (SITE_CONFIG_FLAG, WRITABLE_FLAG):
            value = next(items, None)
            if value is None:
                raise SystemExit(f"{arg} needs a path")
            if arg == SITE_CONFIG_FLAG:
                site_config = Path(value)
            else:
                writable.append(Path(value))
        else:
            rest.append(arg)
    return site_config, writable, rest


def main() -> None:
    site_config, writable, flower_args = split_args(sys.argv[1:])
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s fedtune: %(message)s"))
    logging.getLogger("fedtune").addHandler(handler)
    logging.getLogger("fedtune").setLevel(logging.INFO)

    if writable:  # first: before Flower or anything else starts a thread
        try:
            abi = restrict_writes(writable)
            logger.info("ClientApp processes may write only beneath %s (Landlock ABI %d)", ", ".join(map(str, writable)), abi)
        except SandboxUnavailable as err:
            logger.warning("%s: ClientApp processes can write wherever this user can, the ledger included; "
                           "run them as a separate user (see the operator guide, 'What a site runs').", err)
    guard = AppGuard()
    if site_config is not None:
        from .daemon import load_site_config

        guard = AppGuard(load_site_config(site_config).apps)
    policy = guard.policy
    logger.info("app bundles: config only, ClientApp fedtune.client.app:app%s",
                f"; {len(policy.trusted_hashes)} trusted digest(s), {len(policy.trusted_signers)} trusted signer(s)"
                if policy.requires_trust else "; no trusted digests or signers listed")
    install(poll_interval())
    install_app_gate(guard)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()

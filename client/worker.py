"""The site's warm worker: one long-lived process that serves every message of the site daemon.

Flower starts a fresh ClientApp process per message; loading torch, PEFT, Opacus and the base
model there costs seconds each time. The worker pays that once. The ClientApp process forwards
each request over a Unix socket in the site's state folder (folder 0700, socket 0600, and
``multiprocessing.connection``'s HMAC challenge with a key file readable by the site only).

The worker answers with its *own* site settings (data, ledger, budget): whatever node config a
request carries is replaced by the worker's, so nothing arriving over the socket can point it
at other files or raise its budget either.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import replace
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Mapping

from fedtune.common.errors import FedtuneError

from .daemon import SiteConfig

logger = logging.getLogger(__name__)


class WorkerRefusal(FedtuneError):
    """A refusal raised in the worker, carried back as its code only (the details are in the worker's log)."""

    def __init__(self, code: str) -> None:
        self.code = code  # type: ignore[misc]
        self.detail = "see the site worker's log"
        super().__init__(f"refused by the site's worker: {code}")


def worker_paths(state_dir: Path) -> tuple[Path, Path]:
    folder = state_dir / "worker"
    return folder / "worker.sock", folder / "worker.key"


def prepare_worker(site: SiteConfig) -> dict[str, str]:
    """Create the socket folder and a fresh key; returns the node-config entries that point to them."""
    address, key_file = worker_paths(site.state_dir)
    address.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(address.parent, 0o700)
    address.unlink(missing_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return {"worker-address": str(address), "worker-key-file": str(key_file)}


def serve(site: SiteConfig) -> None:
    """Serve requests until killed (one at a time: a site trains one message at a time)."""
    from .handlers import handle
    from .site_request import SiteReply

    address, key_file = worker_paths(site.state_dir)
    key = key_file.read_text().strip().encode()
    own_node_config = site.node_config()
    with Listener(str(address), family="AF_UNIX", authkey=key) as listener:
        os.chmod(address, 0o600)
        logger.info("warm worker for %s listening on %s", site.name, address)
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as err:  # a failed HMAC challenge: log and go on
                logger.warning("refused a worker connection: %s", err)
                continue
            with conn:
                try:
                    request = conn.recv()
                    reply: SiteReply = handle(replace(request, node_config=own_node_config))
                    conn.send(("ok", reply))
                except FedtuneError as err:
                    # The details stay in this log; only the code goes back (and on to the coordinator).
                    logger.warning("refused %s (%s): %s", getattr(request, "kind", "?"), err.code, err)
                    conn.send(("refused", err.code))
                except Exception:  # a bug must not kill the daemon: report it to this message only
                    logger.exception("the site's worker failed on a %s request", getattr(request, "kind", "?"))
                    conn.send(("refused", "internal-error"))


def call_worker(node_config: Mapping[str, Any], request: Any) -> Any:
    """Send one request to the site's warm worker and return its SiteReply."""
    address = str(node_config["worker-address"])
    key = Path(str(node_config["worker-key-file"])).read_text().strip().encode()
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        conn.send(request)
        status, payload = conn.recv()
    if status == "ok":
        return payload
    raise WorkerRefusal(str(payload))

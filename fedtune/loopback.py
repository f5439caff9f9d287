"""Where fedtune's local HTTP servers (`fedtune serve`, `fedtune dashboard`) listen, and who may talk to them.

Both listen on the loopback by default and have no TLS and no login: whatever reaches the port may
use them. `exposure_warning` says so for any other address. `refuse_foreign_hosts` keeps a web
page in the operator's own browser out of a loopback server by DNS rebinding (a name the page's
author controls, re-pointed at 127.0.0.1: the browser then sends that name as the Host header).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

# The Host headers a browser sends to a server on the IPv4 loopback. (Starlette's host check
# cannot parse a bracketed IPv6 literal, so a server on ::1 gets no Host check.)
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def exposure_warning(host: str) -> str | None:
    """None for a loopback host; else why serving there is a risk (the server has no TLS and no authentication)."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, ValueError):
            addresses = []
    if addresses and all(a.is_loopback for a in addresses):
        return None
    return (f"--host {host} is not a loopback address: anyone who can reach it can use this server, with no TLS and no "
            "authentication. Prefer 127.0.0.1, behind a TLS reverse proxy that authenticates its clients or an SSH tunnel.")


def refuse_foreign_hosts(app: FastAPI, host: str) -> None:
    """On a server bound to 127.0.0.1 or localhost, answer 400 to a request whose Host header names anything else."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if host in LOOPBACK_NAMES:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))

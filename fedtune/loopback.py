"""Where fedtune's local HTTP servers (`fedtune serve`, `fedtune dashboard`) listen, and who may talk to them.

Both listen on the loopback by default and have no TLS and no login: whatever reaches the port may
use them. `exposure_warning` says so for any other address. `refuse_foreign_hosts` keeps a web
page in the operator's own browser out of a loopback server by DNS rebinding (a name the page's
author controls, re-pointed at the loopback: the browser then sends that name as the Host header),
on 127.0.0.1, ``localhost`` and ``::1`` alike. `listen` and `run_app` are the one way both servers
bind their port (0: any free one) and say where they listen once they accept connections.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

# The Host names a browser sends to a server on the loopback (IPv6 in brackets, read without them).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            return [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, ValueError):
            return []


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    addresses = _addresses(host)
    return bool(addresses) and all(a.is_loopback for a in addresses)


def exposure_warning(host: str) -> str | None:
    """None for a loopback host; else why serving there is a risk (the server has no TLS and no authentication)."""
    if is_loopback(host):
        return None
    return (f"--host {host} is not a loopback address: anyone who can reach it can use this server, with no TLS and no "
            "authentication. Prefer 127.0.0.1, behind a TLS reverse proxy that authenticates its clients or an SSH tunnel.")


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-cased and without its port ('[::1]:8050' -> '::1'); None when malformed.

    Starlette's TrustedHostMiddleware cuts the header at its first colon, which leaves '[' of any
    IPv6 literal: it cannot guard a server on ::1. This reads the bracketed form.
    """
    text = header.strip().lower()
    if text.startswith("["):
        name, closed, rest = text[1:].partition("]")
        return name if closed and (not rest or (rest[:1] == ":" and rest[1:].isdigit())) else None
    name, colon, port = text.partition(":")
    return name if not colon or port.isdigit() else None


class _HostGuard:
    """ASGI middleware: 400 for a request whose Host header names none of ``allowed``."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                body = json.dumps({"error": f"Host {header!r} is not this server's loopback name; use one of "
                                            f"{sorted(self.allowed)}."}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def refuse_foreign_hosts(app: FastAPI, host: str) -> None:
    """On a server bound to a loopback address, answer 400 to a request whose Host header names anything else.

    Allowed: 127.0.0.1, localhost, ::1 and ``host`` itself (a server on 127.0.0.2 is reached as
    127.0.0.2). A server on another address has no such check: the network reaches it anyway, and
    its operator was warned (`exposure_warning`).
    """
    if is_loopback(host):
        app.add_middleware(_HostGuard, allowed=frozenset({*LOOPBACK_NAMES, host.strip("[]").lower()}))


def url(host: str, port: int) -> str:
    """http://HOST:PORT, an IPv6 host in brackets."""
    host = host.strip("[]")
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: any free port; ``getsockname()`` says which), for `run_app`.

    Bound before a model or a ledger loads, so that a port in use is one line at once.

    Raises:
        ConfigError: the address cannot be bound, naming --host, --port and the reason.
    """
    from fedtune.common.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}; pick another --port "
                          "(0: any free one).") from None
    return sock


def run_app(app: Any, sock: socket.socket, *, on_started: Callable[[], None], log_level: str = "info",
            graceful_seconds: int | None = 10) -> None:
    """Serve ``app`` with uvicorn on ``sock`` until SIGINT/SIGTERM; ``on_started`` runs once it accepts connections."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_started()

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_seconds)
    _Server(config).run(sockets=[sock])

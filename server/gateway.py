"""The coordinator's gateway: the only listeners the network sees, in front of a loopback-only SuperLink.

Why it exists: ``flower-superlink`` 1.42 serves the Fleet API (sites), the Control API (start,
stop and list runs, read logs, register node keys) and the Runtime API (its own ServerApp
processes) on one HTTPS port, and in the open-source edition the Control API asks nobody who is
calling (its only account plugin, OIDC, ships with Flower Enterprise); Flower has no flag for a
second listener (``--control-api-address`` is deprecated and ignored). So every site, which must
reach that port and holds ``ca.crt``, could start runs, read logs and register a node key of its
own (a Sybil site). The Runtime API is open too in Flower's default subprocess isolation, where
the SuperExec secret is ignored: a caller could claim a pending ServerApp task and act as the
coordinator of a run.

So fedtune binds the SuperLink to 127.0.0.1 and puts this gateway in front of it, with two listeners:

- **fleet** (``--host:--port``, what sites dial): TLS with the coordinator's certificate, and only
  ``/v1/fleet/*`` (node-authenticated by the SuperLink, as before) and ``/health`` pass;
  anything else, the Control and Runtime APIs included, gets 403 without reaching the SuperLink.
- **admin** (``--admin-host:--admin-port``): mutual TLS. The handshake itself refuses every client
  that does not prove it holds the key of a certificate in ``admins.pem`` (pinned, self-signed,
  clientAuth; see ``server/pki.py``), so no request of an unauthenticated caller is ever read.
  Only ``/v1/control/*`` and ``/health`` pass.

Neither passes ``/v1/runtime/*``: only the SuperLink's own SuperExec uses it, on the loopback.
Anyone with a shell on the coordinator host can still reach the SuperLink directly, so that host
is trusted as an admin is. ``GET /fedtune/listener`` answers which listener was reached, so the
admin commands can say "that is the Fleet port" instead of failing obscurely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET = "fleet"
ADMIN = "admin"
LISTENER_PATH = "/fedtune/listener"
# What each listener forwards: one API's routes (Flower names them /v1/<api>/<kebab-case-method>) and
# the health check. Matched whole, on the path exactly as received: a prefix test would pass
# "/v1/fleet/../control/start-run", which httpx then normalises into the Control API.
ALLOWED_APIS = {FLEET: "fleet", ADMIN: "control"}
_ROUTE = re.compile(r"/v1/([a-z]+)/[a-z0-9-]+")
OPEN_PATHS = ("/health",)
# RFC 9110 section 7.6.1: connection-specific, never forwarded. Host is set for the upstream by httpx.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host",
})


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Where the gateway listens and where the SuperLink is; ``certs`` None means plain text (no TLS, no auth)."""

    fleet_host: str
    fleet_port: int
    admin_host: str
    admin_port: int
    superlink_port: int
    certs: Path | None

    @property
    def upstream(self) -> str:
        return f"{'http' if self.certs is None else 'https'}://127.0.0.1:{self.superlink_port}"


def allowed(listener: str, scope: Scope) -> bool:
    """Whether ``listener`` forwards this request: its API's routes or the health check, nothing else.

    The raw path must equal the decoded one: Flower's routes need no percent-encoding, and a
    request that uses it ("%2e%2e") is refused rather than interpreted.
    """
    path = scope["path"]
    raw = scope.get("raw_path")
    if raw is not None and raw.decode("latin-1") != path:
        return False
    if path in OPEN_PATHS:
        return True
    match = _ROUTE.fullmatch(path)
    return match is not None and match.group(1) == ALLOWED_APIS[listener]


class ReverseProxy:
    """An ASGI app forwarding the allowed paths of one listener to the SuperLink, streaming replies."""

    def __init__(self, listener: str, upstream: str, *, verify: ssl.SSLContext | bool) -> None:
        import httpx

        if listener not in ALLOWED_APIS:
            raise ValueError(f"listener must be one of {sorted(ALLOWED_APIS)}, got {listener!r}")
        self.listener = listener
        # No read timeout: the Control API streams a run's logs for as long as the run lasts.
        self.client = httpx.AsyncClient(base_url=upstream, verify=verify,
                                        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=60.0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: Flower uses none
            return
        path = scope["path"]
        if path == LISTENER_PATH and scope["method"] == "GET":
            await _reply(send, 200, self.listener)
            return
        if not allowed(self.listener, scope):
            client = scope.get("client") or ("?", 0)
            logger.warning("refused %s %r from %s on the %s listener", scope["method"], scope.get("raw_path", path),
                           client[0], self.listener)
            what = "the Fleet API only" if self.listener == FLEET else "the Control API only"
            await _reply(send, 403, f"fedtune gateway: this path is not served here; this listener serves {what}.")
            return
        await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        # Flower's requests are single protobuf messages: read the body whole, then forward it.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        # The checked path, which has no dot segments or escapes for httpx to rewrite; Flower uses no query strings.
        request = self.client.build_request(scope["method"], scope["path"], headers=headers, content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            logger.error("the SuperLink at %s did not answer %s: %s", self.client.base_url, scope["path"], err)
            await _reply(send, 502, "fedtune gateway: the SuperLink is not answering; see the coordinator's log.")
            return
        try:
            await send({
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP],
            })
            # Stream until the SuperLink ends the reply or the client goes away (a log stream
            # otherwise outlives its reader for as long as the run lasts).
            relay = asyncio.ensure_future(_relay(response, send))
            gone = asyncio.ensure_future(_disconnected(receive))
            done, pending = await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                if task is relay and not task.cancelled() and task.exception() is not None:
                    logger.warning("reply to %s cut short: %s", scope["path"], task.exception())
        finally:
            await response.aclose()


async def _relay(response: Any, send: Send) -> None:
    async for chunk in response.aiter_raw():  # raw: content-encoding passes through untouched
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def server_context(certs: Path, *, admins: Path | None) -> ssl.SSLContext:
    """The TLS context of one listener; with ``admins``, a client must present a certificate listed there.

    Pinning works because each listed certificate is self-signed: OpenSSL takes it as its own trust
    anchor, checks the client's signature over the handshake (so the client holds the key) and the
    clientAuth purpose, and accepts nothing else (a certificate the CA signed included).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    if admins is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(admins))
    return context


class _Server:
    """A uvicorn server whose signals the gateway handles itself (two servers share one process)."""

    def __init__(self, app: ReverseProxy, host: str, port: int, context: ssl.SSLContext | None) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # `serve` below stops both servers on a signal
                yield

        config = uvicorn.Config(
            app, host=host, port=port, lifespan="on", access_log=False, log_level="warning",
            # The SuperLink's replies carry their own Date and Server headers.
            server_header=False, date_header=False,
            ssl_context_factory=(lambda _config, _default: context) if context is not None else None,
        )
        self.server = Server(config)
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve())

    def stop(self) -> None:
        self.server.should_exit = True


def _superlink_verify(config: GatewayConfig) -> ssl.SSLContext | bool:
    """How the gateway checks the SuperLink it forwards to: the consortium CA, and the name 127.0.0.1."""
    return ssl.create_default_context(cafile=str(config.certs / "ca.crt")) if config.certs is not None else False


async def _wait_for_superlink(config: GatewayConfig, superlink: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(base_url=config.upstream, verify=_superlink_verify(config), timeout=2.0) as client:
        while True:
            if superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {superlink.returncode} before it was ready; see its log above")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if loop.time() > deadline:
                raise RuntimeError(f"flower-superlink did not answer on 127.0.0.1:{config.superlink_port} within {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def serve(config: GatewayConfig, superlink: subprocess.Popen[bytes], *, ready_timeout: float = 120.0) -> int:
    """Run both listeners until SIGTERM/SIGINT, until ``superlink`` exits, or until a listener fails.

    The listeners open only once the SuperLink answers, so whoever can connect is served.

    Returns:
        0 after a signal; the SuperLink's exit code (or 1) if it exited; 1 if a listener failed.

    Raises:
        RuntimeError: the SuperLink exited or did not answer within ``ready_timeout`` seconds at start.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    signal_wait = asyncio.ensure_future(signalled.wait())

    ready = asyncio.ensure_future(_wait_for_superlink(config, superlink, ready_timeout))
    await asyncio.wait({ready, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    if signalled.is_set():
        ready.cancel()
        return 0
    ready.result()

    verify = _superlink_verify(config)
    fleet_tls = server_context(config.certs, admins=None) if config.certs is not None else None
    admin_tls = server_context(config.certs, admins=config.certs / "admins.pem") if config.certs is not None else None
    servers = [
        _Server(ReverseProxy(FLEET, config.upstream, verify=verify), config.fleet_host, config.fleet_port, fleet_tls),
        _Server(ReverseProxy(ADMIN, config.upstream, verify=verify), config.admin_host, config.admin_port, admin_tls),
    ]
    for s in servers:
        s.start()
    tasks = [s.task for s in servers if s.task is not None]
    announced = False
    while not signalled.is_set() and superlink.poll() is None and not any(t.done() for t in tasks):
        await asyncio.wait({signal_wait, *tasks}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        if not announced and all(s.server.started for s in servers):
            announced = True
            scheme = "http" if config.certs is None else "https"
            logger.info("fedtune gateway: Fleet API (sites) on %s://%s:%d; Control API (admins%s) on %s://%s:%d; "
                        "SuperLink on 127.0.0.1:%d only", scheme, config.fleet_host, config.fleet_port,
                        "" if config.certs is None else ", admin certificate required", scheme, config.admin_host,
                        config.admin_port, config.superlink_port)
    for s in servers:
        s.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    signal_wait.cancel()
    if signalled.is_set():
        return 0
    if superlink.poll() is not None:
        logger.error("flower-superlink exited with code %s; the gateway stops too.", superlink.returncode)
        return superlink.returncode or 1
    logger.error("a gateway listener stopped (is port %d or %d taken?); stopping.", config.fleet_port, config.admin_port)
    return 1

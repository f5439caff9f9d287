"""``flwr`` presenting the admin's client certificate: ``python -m fedtune.server.admin_flwr [flwr args]``.

The coordinator's admin listener accepts only clients holding a certificate in its ``admins.pem``
(see ``server/gateway.py``), but Flower 1.42's CLI can only verify a server (``root-certificates``),
never present a certificate of its own. Every CLI command builds its Control API client in one
place, ``ControlHttpClient.from_server_address`` (via ``flwr.cli.utils``); this entry point gives
that constructor a TLS context that also holds the admin's certificate and key
(``FEDTUNE_ADMIN_CERT``, ``FEDTUNE_ADMIN_KEY``), then runs Flower's own ``flwr`` unchanged.
Without those variables it is plain ``flwr``.
"""

from __future__ import annotations

import inspect
import os
import ssl
import sys
from pathlib import Path
from typing import Any

CERT_ENV = "FEDTUNE_ADMIN_CERT"
KEY_ENV = "FEDTUNE_ADMIN_KEY"


def admin_context(root_certificates: bytes | str | None, cert: Path, key: Path) -> ssl.SSLContext:
    """A client context trusting ``root_certificates`` (PEM bytes or a file; None: the system's) with the admin's certificate."""
    if isinstance(root_certificates, bytes):
        context = ssl.create_default_context(cadata=root_certificates.decode("ascii"))
    else:
        context = ssl.create_default_context(cafile=root_certificates)
    context.load_cert_chain(cert, key)
    return context


def install(cert: Path, key: Path) -> None:
    """Make Flower's Control API client present ``cert`` (whose private key is ``key``) on every connection."""
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.protobuf.client import ProtobufClient

    expected = ["cls", "server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"]
    found = list(inspect.signature(ProtobufClient.from_server_address.__func__).parameters)  # type: ignore[attr-defined]
    if found != expected:
        raise RuntimeError(f"Flower's ProtobufClient.from_server_address takes {found}, not {expected}; "
                           "re-check fedtune.server.admin_flwr against this Flower version")

    def from_server_address(cls: type[Any], server_address: str, insecure: bool, root_certificates: bytes | str | None,
                            interceptors: Any, *, retry_invoker: Any = None) -> Any:
        if insecure:
            raise SystemExit("fedtune: error: an admin certificate needs TLS, but the Flower connection is insecure.")
        return cls(f"https://{server_address}", interceptors=interceptors,
                   verify=admin_context(root_certificates, cert, key), retry_invoker=retry_invoker)

    ControlHttpClient.from_server_address = classmethod(from_server_address)  # type: ignore[method-assign, assignment]


def main() -> None:
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if bool(cert) != bool(key):
        raise SystemExit(f"fedtune: error: set both {CERT_ENV} and {KEY_ENV}, or neither.")
    if cert and key:
        install(Path(cert), Path(key))
    from flwr.cli.app import app

    sys.argv[0] = "flwr"
    app()


if __name__ == "__main__":
    main()

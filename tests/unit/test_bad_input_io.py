"""Bad input catalogue, part 2 (issue 13): certificates, node keys and data files, as an operator gets them wrong.

Each mistake must reach the user as one line (`fedtune: error: ...`, exit code 2) naming the file, what was
found and what is allowed, before any Flower process starts; no traceback, nothing written.

Certificates and keys are made here with `cryptography` directly (not with fedtune's own PKI code, whose
output they must not mirror); a certificate is "presented" by a plain TLS server on 127.0.0.1. Which node
keys are acceptable is decided by Flower's own loaders (the oracle), run on the same files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import io
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import fedtune.common.data as data_module
from fedtune.cli import main
from fedtune.client.daemon import load_site_config
from fedtune.common.data import load_table
from fedtune.common.errors import ConfigError, DataError

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


# --- helpers ------------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclasses.dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def make_ca(cn: str = "test CA", *, not_before: dt.datetime = NOW - DAY, not_after: dt.datetime = NOW + 30 * DAY) -> CA:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CA(key, cert)


def make_server_cert(
    ca: CA, hosts: list[str], *, not_before: dt.datetime = NOW - DAY, not_after: dt.datetime = NOW + 30 * DAY
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def stamp(when: dt.datetime) -> str:
    """How a moment must appear in messages (second resolution, UTC)."""
    return f"{when.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


# Each mistake: (server certificate validity and hosts, signed by the consortium CA or another one).
CERT_CASES = {
    "expired": dict(hosts=["localhost", "127.0.0.1"], not_before=NOW - 10 * DAY, not_after=NOW - DAY),
    "not-yet-valid": dict(hosts=["localhost", "127.0.0.1"], not_before=NOW + DAY, not_after=NOW + 10 * DAY),
    "another-host": dict(hosts=["coord.example.org", "10.9.8.7"]),
    "another-ca": dict(hosts=["localhost", "127.0.0.1"]),
}


def cert_case(name: str, ca: CA) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    spec = dict(CERT_CASES[name])
    signer = make_ca("some other CA") if name == "another-ca" else ca
    return make_server_cert(signer, spec.pop("hosts"), **spec)  # type: ignore[arg-type]


def expected_cert_text(name: str, cert: x509.Certificate) -> list[str]:
    """What the message must say for each mistake: the window and now, the names covered, the issuer."""
    window = f"valid from {stamp(cert.not_valid_before_utc)} to {stamp(cert.not_valid_after_utc)}"
    return {
        "expired": ["expired", window, "now is"],
        "not-yet-valid": ["not valid yet", window, "now is", "clock"],
        "another-host": ["does not name host '127.0.0.1'", "coord.example.org", "10.9.8.7"],
        "another-ca": ["not signed by the CA", "some other CA", "test CA"],
    }[name]


def one_error_line(result, *, ignore: str = "") -> str:  # type: ignore[no-untyped-def]
    """The CLI's refusal: exit code 2, exactly one non-empty stderr line (besides ``ignore``d ones), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not (ignore and line.startswith(ignore))]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), lines
    return lines[0]


class TLSServer:
    """A TLS server on 127.0.0.1 presenting one certificate (none: plain TCP); it answers nothing and counts connections."""

    def __init__(self, tmp: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate | None) -> None:
        self.connections = 0
        self.context: ssl.SSLContext | None = None
        if cert is not None and key is not None:
            (tmp / "served.crt").write_bytes(pem(cert))
            (tmp / "served.key").write_bytes(key_pem(key))
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(tmp / "served.crt", tmp / "served.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(2)
            try:
                if self.context is not None:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)  # until the client gives up
                else:  # answers a TLS hello as an HTTP server (uvicorn without TLS) does
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    servers: list[TLSServer] = []

    def start(key: ec.EllipticCurvePrivateKey | None = None, cert: x509.Certificate | None = None) -> TLSServer:
        folder = tmp_path / f"server{len(servers)}"
        folder.mkdir()
        servers.append(TLSServer(folder, key, cert))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any command tries to start a process (flower-superlink, flower-supernode, the worker)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr("fedtune.client.daemon.run_daemon", lambda *a, **k: refuse("run_daemon"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def make_site(tmp_path: Path, *, ca: bytes, node_key: bytes, coordinator: str, data: Path | None = None) -> Path:
    """A site folder: site.toml naming ca.crt and node-key (mode 0600) beside it."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "ca.crt").write_bytes(ca)
    (site / "node-key").write_bytes(node_key)
    (site / "node-key").chmod(0o600)
    data = data or write_csv(tmp_path / "notes.csv", [(f"note {i}", "a" if i % 2 else "b") for i in range(10)])
    (site / "site.toml").write_text(
        f'[site]\nname = "site-a"\ncoordinator = "{coordinator}"\nca = "ca.crt"\nnode_key = "node-key"\nstate_dir = "state"\n'
        f'[data]\npath = "{data}"\n[privacy]\nbudget_epsilon = 8.0\ndelta = 1e-5\n', encoding="utf-8")
    return site / "site.toml"


def openssh_private(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,  # type: ignore[attr-defined]
                             serialization.NoEncryption())


def openssh_public(key: object) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"  # type: ignore[attr-defined]


GOOD_NODE_KEY = openssh_private(ec.generate_private_key(ec.SECP384R1()))


# --- 1. certificates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CERT_CASES))
def test_coordinator_start_refuses_a_bad_server_certificate_in_one_line_before_flower_starts(
    case: str, tmp_path: Path, no_processes: None
) -> None:
    # Prepare: the consortium CA and a server certificate with one mistake; admins.pem is valid.
    ca = make_ca()
    key, cert = cert_case(case, ca)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(pem(ca.cert))
    (certs / "server.crt").write_bytes(pem(cert))
    (certs / "server.key").write_bytes(key_pem(key))
    from fedtune.server.pki import init_admin_certificate

    admin = init_admin_certificate(tmp_path / "admin", name="alice")
    (certs / "admins.pem").write_bytes(admin.cert.read_bytes())
    state = tmp_path / "state"

    # Execute
    result = CliRunner().invoke(main, ["coordinator", "start", "--certs", str(certs), "--state", str(state),
                                       "--port", str(free_port()), "--admin-port", str(free_port())])

    # Assert: one line naming server.crt and what is wrong; no database was created (Flower never ran).
    line = one_error_line(result)
    assert str(certs / "server.crt") in line
    for text in expected_cert_text(case, cert):
        assert text in line, line
    assert not (state / "superlink.db").exists()


def test_coordinator_start_names_a_ca_file_that_is_not_pem(tmp_path: Path, no_processes: None) -> None:
    # Prepare: ca.crt saved in binary DER, as some CA tools export it.
    ca = make_ca()
    key, cert = make_server_cert(ca, ["localhost", "127.0.0.1"])
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.DER))
    (certs / "server.crt").write_bytes(pem(cert))
    (certs / "server.key").write_bytes(key_pem(key))
    (certs / "admins.pem").write_bytes(pem(cert))

    # Execute
    result = CliRunner().invoke(main, ["coordinator", "start", "--certs", str(certs), "--state", str(tmp_path / "state")])

    # Assert
    line = one_error_line(result)
    assert f"{certs / 'ca.crt'} is not a PEM certificate" in line and "DER" in line and "openssl x509 -inform der" in line


@pytest.mark.parametrize("case", sorted(CERT_CASES))
def test_site_start_refuses_the_certificate_the_coordinator_presents(
    case: str, tmp_path: Path, serve, no_processes: None  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a coordinator (a bare TLS server) presenting a certificate with one mistake.
    ca = make_ca()
    key, cert = cert_case(case, ca)
    server = serve(key, cert)
    config = make_site(tmp_path, ca=pem(ca.cert), node_key=GOOD_NODE_KEY, coordinator=server.address)

    # Execute
    result = CliRunner().invoke(main, ["site", "start", "--config", str(config)])

    # Assert: the line names the coordinator's address, the CA file and what is wrong.
    line = one_error_line(result)
    assert f"the coordinator at {server.address} presents" in line
    for text in expected_cert_text(case, cert):
        assert text in line, line
    assert server.connections >= 1


def test_site_check_names_the_same_mistakes_and_accepts_a_good_certificate(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    from fedtune.client.check import CHECKS

    checks = dict(CHECKS)
    ca = make_ca()
    good = serve(*make_server_cert(ca, ["localhost", "127.0.0.1"]))
    expired_key, expired = cert_case("expired", ca)
    bad = serve(expired_key, expired)
    site = load_site_config(make_site(tmp_path, ca=pem(ca.cert), node_key=GOOD_NODE_KEY, coordinator=good.address))

    # Execute / Assert: the good coordinator gets past certificate checks and the verified handshake.
    assert "certificate verified" in checks["coordinator"](site)
    assert "CA CN=test CA" in checks["certificates"](site)
    with pytest.raises(ConfigError) as info:
        checks["coordinator"](dataclasses.replace(site, coordinator=bad.address))
    assert all(text in str(info.value) for text in expected_cert_text("expired", expired))


@pytest.mark.parametrize("mistake", ["der", "leaf", "expired-ca", "empty", "private-key"])
def test_site_ca_file_mistakes_are_named_before_anything_is_dialled(
    mistake: str, tmp_path: Path, serve, no_processes: None  # type: ignore[no-untyped-def]
) -> None:
    # Prepare
    ca = make_ca()
    key, cert = make_server_cert(ca, ["localhost", "127.0.0.1"])
    content = {
        "der": ca.cert.public_bytes(serialization.Encoding.DER),
        "leaf": pem(cert),  # server.crt given as the CA
        "expired-ca": pem(make_ca(not_before=NOW - 10 * DAY, not_after=NOW - DAY).cert),
        "empty": b"",
        "private-key": key_pem(key),
    }[mistake]
    server = serve(key, cert)
    config = make_site(tmp_path, ca=content, node_key=GOOD_NODE_KEY, coordinator=server.address)

    # Execute
    result = CliRunner().invoke(main, ["site", "start", "--config", str(config)])

    # Assert
    line = one_error_line(result)
    assert f"site.ca {config.parent / 'ca.crt'}" in line
    assert {"der": "DER", "leaf": "is not a CA certificate", "expired-ca": "expired", "empty": "empty",
            "private-key": "holds a private key"}[mistake] in line
    assert server.connections == 0


def test_site_start_goes_on_when_the_coordinator_is_not_up_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: good credentials, nothing listening; run_daemon replaced to see that it is reached.
    ca = make_ca()
    config = make_site(tmp_path, ca=pem(ca.cert), node_key=GOOD_NODE_KEY, coordinator=f"127.0.0.1:{free_port()}")
    started: list[Path] = []
    monkeypatch.setattr("fedtune.client.daemon.run_daemon", lambda path, **kw: started.append(path) or 0)

    # Execute
    result = CliRunner().invoke(main, ["site", "start", "--config", str(config)])

    # Assert: the daemon starts (it keeps dialling), with a note that the certificate is checked later.
    assert result.exit_code == 0, result.output
    assert started == [config]
    assert "does not answer yet" in result.stderr


def test_site_start_names_a_coordinator_port_that_does_not_speak_tls(tmp_path: Path, serve, no_processes: None) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a plain HTTP answer, as from a coordinator started with --insecure.
    listener = serve()
    config = make_site(tmp_path, ca=pem(make_ca().cert), node_key=GOOD_NODE_KEY, coordinator=listener.address)

    # Execute
    result = CliRunner().invoke(main, ["site", "start", "--config", str(config)])

    # Assert
    line = one_error_line(result)
    assert f"site.coordinator {listener.address} accepts connections but does not speak TLS" in line
    assert "--insecure" in line


def _admin_folder(tmp_path: Path, ca: CA) -> Path:
    from fedtune.server.pki import init_admin_certificate

    admin = init_admin_certificate(tmp_path / "admin", name="alice")
    (admin.cert.parent / "ca.crt").write_bytes(pem(ca.cert))
    return admin.cert.parent


@pytest.mark.parametrize("case", ["expired", "another-host", "another-ca"])
def test_admin_commands_name_what_is_wrong_with_the_coordinators_certificate(
    case: str, tmp_path: Path, serve, no_processes: None  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: the admin's folder is good; the coordinator presents a wrong certificate.
    ca = make_ca()
    key, cert = cert_case(case, ca)
    server = serve(key, cert)
    admin = _admin_folder(tmp_path, ca)

    # Execute: `fedtune status`, and `fedtune run` (which dials the same way after reading its flags).
    status = CliRunner().invoke(main, ["status", "--coordinator", server.address, "--certs", str(admin)])
    run = CliRunner().invoke(main, ["run", "--coordinator", server.address, "--certs", str(admin), "--labels", "a,b",
                                    "--out", str(tmp_path / "run")])

    # Assert
    for result in (status, run):
        line = one_error_line(result)
        assert f"the certificate {server.address} presents" in line
        for text in expected_cert_text(case, cert):
            assert text in line, line


def test_admin_commands_name_a_coordinator_port_that_does_not_speak_tls(tmp_path: Path, serve, no_processes: None) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a plain HTTP answer, as from a coordinator started with --insecure; the admin's folder is good.
    listener = serve()
    admin = _admin_folder(tmp_path, make_ca())

    # Execute
    result = CliRunner().invoke(main, ["status", "--coordinator", listener.address, "--certs", str(admin)])

    # Assert: the same words as a site gets, naming the admin flag and port.
    line = one_error_line(result)
    assert f"--coordinator {listener.address} accepts connections but does not speak TLS" in line
    assert "--insecure" in line and "--admin-port" in line


def test_admin_ca_file_that_is_not_pem_is_named(tmp_path: Path, serve, no_processes: None) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    ca = make_ca()
    server = serve(*make_server_cert(ca, ["localhost", "127.0.0.1"]))
    admin = _admin_folder(tmp_path, ca)
    (admin / "ca.crt").write_bytes(b"not a certificate\n")

    # Execute
    result = CliRunner().invoke(main, ["status", "--coordinator", server.address, "--certs", str(admin)])

    # Assert
    line = one_error_line(result)
    assert f"{admin / 'ca.crt'} is not a PEM certificate" in line and "no '-----BEGIN CERTIFICATE-----' block" in line


# --- 2. node keys ---------------------------------------------------------------------------------------------
def _key_files(folder: Path) -> dict[str, Path]:
    """Key files an operator might give, each a different mistake (or none), written to ``folder``."""
    folder.mkdir()
    paths = {}
    for name, data in _key_contents().items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
        paths[name].chmod(0o600)
    return paths


@functools.lru_cache(maxsize=1)
def _key_contents() -> dict[str, bytes]:
    """Made once per session: an RSA key takes a while to generate."""
    p256, p384, p521 = (ec.generate_private_key(c()) for c in (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1))
    k1 = ec.generate_private_key(ec.SECP256K1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed = ed25519.Ed25519PrivateKey.generate()
    content = {
        "p384": openssh_private(p384), "p384.pub": openssh_public(p384),
        "p256": openssh_private(p256), "p256.pub": openssh_public(p256),
        "p521": openssh_private(p521), "p521.pub": openssh_public(p521),
        "secp256k1.pem": key_pem(k1),
        "secp256k1.pub.pem": k1.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "p384.pkcs8.pem": key_pem(p384),
        "rsa": openssh_private(rsa_key), "rsa.pub": openssh_public(rsa_key),
        "ed25519": openssh_private(ed), "ed25519.pub": openssh_public(ed),
        "two.pub": openssh_public(p384) + openssh_public(p256),
        "certificate.crt": pem(make_ca().cert),
        "text.txt": b"hello, I am not a key\n",
        "empty": b"",
    }
    return content


def _flower_accepts(paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[bool, bool]]:
    """Flower's own verdict on each file: (flower-supernode's private-key loader, `flwr supernode register`'s).

    Flower ends the process on a bad key (flwr_exit: log, then SystemExit, with a timer that kills the process
    5 s later); only that exit is replaced, by an exception, so the loaders' own checks run unchanged.
    """
    import importlib

    # By module path: the package re-exports a function under the module's own name.
    register = importlib.import_module("flwr.cli.supernode.register")
    supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")

    class Refused(Exception):
        pass

    def refuse(*args: object, **kwargs: object) -> None:
        raise Refused(args)

    monkeypatch.setattr(supernode, "flwr_exit", refuse)
    monkeypatch.setattr(register, "flwr_exit", refuse)
    verdict = {}
    for name, path in paths.items():
        try:
            supernode._try_setup_client_authentication(
                argparse.Namespace(auth_supernode_private_key=str(path), auth_supernode_public_key=None))
            private = True
        except Refused:
            private = False
        try:
            register.try_load_public_key(path)
            public = True
        except Refused:
            public = False
        verdict[name] = (private, public)
    return verdict


def test_node_key_checks_accept_exactly_what_flower_accepts_and_name_every_mistake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from fedtune.client.identity import check_node_private_key, check_node_public_key

    paths = _key_files(tmp_path / "keys")
    flower = _flower_accepts(paths, monkeypatch)

    # Execute
    ours: dict[str, tuple[bool, bool]] = {}
    messages: dict[str, tuple[str, str]] = {}
    for name, path in paths.items():
        verdict, said = [], []
        for check in (check_node_private_key, check_node_public_key):
            try:
                check(path)
                verdict.append(True)
                said.append("")
            except ConfigError as err:
                verdict.append(False)
                said.append(str(err))
        ours[name] = (verdict[0], verdict[1])
        messages[name] = (said[0], said[1])

    # Assert: the same verdict as Flower's loaders on every file (two keys in one file: Flower silently takes the
    # first; refusing it is stricter on purpose, since it registers one site under another's name).
    assert {k: v for k, v in ours.items() if k != "two.pub"} == {k: v for k, v in flower.items() if k != "two.pub"}
    assert flower["p384"] == (True, False) and flower["p384.pub"] == (False, True)  # the oracle can say yes and no
    assert ours["two.pub"] == (False, False) and "holds 2 keys" in messages["two.pub"][1]
    # ... and every refusal names the file, what it holds and what is required.
    said_private = {name: m[0] for name, m in messages.items()}
    said_public = {name: m[1] for name, m in messages.items()}
    for name, message in [*said_private.items(), *said_public.items()]:
        if message:
            assert str(paths[name]) in message and "ECDSA key on a NIST curve" in message or "PRIVATE key" in message, message
    assert "curve secp256k1" in said_private["secp256k1.pem"] and "PEM private key" in said_private["secp256k1.pem"]
    assert "RSA key (2048 bits)" in said_private["rsa"] and "RSA key (2048 bits)" in said_public["rsa.pub"]
    assert "Ed25519 key" in said_private["ed25519"] and "Ed25519 key" in said_public["ed25519.pub"]
    assert "is a public key" in said_private["p384.pub"] and "must name the private key" in said_private["p384.pub"]
    assert "is a PRIVATE key" in said_public["p384"] and "must never leave its site" in said_public["p384"]
    assert "not a key file" in said_private["text.txt"] and "not a key file" in said_public["text.txt"]
    assert "a certificate, not a key" in said_private["certificate.crt"]
    assert "empty" in said_private["empty"]
    assert "is not an OpenSSH private key" in said_private["p384.pkcs8.pem"]


@pytest.mark.parametrize("name", ["rsa", "ed25519", "secp256k1.pem", "p384.pkcs8.pem", "p384.pub", "text.txt"])
def test_site_start_refuses_a_node_key_flower_cannot_use(name: str, tmp_path: Path, no_processes: None) -> None:
    # Prepare
    paths = _key_files(tmp_path / "keys")
    config = make_site(tmp_path, ca=pem(make_ca().cert), node_key=paths[name].read_bytes(), coordinator=f"127.0.0.1:{free_port()}")

    # Execute
    result = CliRunner().invoke(main, ["site", "start", "--config", str(config)])

    # Assert
    line = one_error_line(result)
    assert f"site.node_key {config.parent / 'node-key'}" in line and "ECDSA key on a NIST curve" in line


@pytest.mark.parametrize("name", ["p384", "rsa.pub", "secp256k1.pub.pem", "two.pub", "text.txt"])
def test_add_site_refuses_a_bad_public_key_before_dialling_the_coordinator(
    name: str, tmp_path: Path, serve, no_processes: None  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a listener that counts connections stands in for the coordinator's admin port.
    paths = _key_files(tmp_path / "keys")
    listener = serve()

    # Execute
    result = CliRunner().invoke(main, ["coordinator", "add-site", str(paths[name]), "--name", "site-a",
                                       "--coordinator", listener.address, "--insecure"])

    # Assert: refused, naming the file; a private key is never sent anywhere.
    line = one_error_line(result, ignore="WARNING: --insecure")  # --insecure warns first
    assert f"PUBKEY {paths[name]}" in line
    assert listener.connections == 0


# --- 3. data files ----------------------------------------------------------------------------------------------
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path: Path) -> None:
    # Prepare: Excel's "CSV UTF-8" and Notepad prepend EF BB BF.
    csv_path = tmp_path / "notes.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\nFi\xc3\xa8vre.,ward\n")
    jsonl_path = tmp_path / "notes.jsonl"
    jsonl_path.write_bytes(b'\xef\xbb\xbf{"text": "Fi\xc3\xa8vre.", "label": "ward"}\n')

    # Execute
    tables = [load_table(csv_path), load_table(jsonl_path)]

    # Assert
    for table in tables:
        assert table.texts == ["Fièvre."] and table.labels == ["ward"]


def test_crlf_line_endings_leave_no_carriage_return_in_values(tmp_path: Path) -> None:
    # Prepare
    csv_path = tmp_path / "notes.csv"
    csv_path.write_bytes(b"text,label\r\nChest pain.,cardio\r\nHeadache.,neuro\r\n")
    jsonl_path = tmp_path / "notes.jsonl"
    jsonl_path.write_bytes(b'{"text": "Chest pain.", "label": "cardio"}\r\n{"text": "Headache.", "label": "neuro"}\r\n')

    # Execute / Assert
    for path in (csv_path, jsonl_path):
        table = load_table(path)
        assert table.texts == ["Chest pain.", "Headache."] and table.labels == ["cardio", "neuro"]


def test_a_quoted_line_break_keeps_one_row_and_later_rows_are_numbered_by_record(tmp_path: Path) -> None:
    # Prepare: row 1's text spans three physical lines (CRLF inside the quotes, as Excel writes it); the second
    # file adds a row with a blank text after them.
    good = b'text,label\r\n"Pain\r\nleft arm,\r\n""sharp""",cardio\r\nHeadache.,neuro\r\n'
    ok = tmp_path / "ok.csv"
    ok.write_bytes(good)
    path = tmp_path / "notes.csv"
    path.write_bytes(good + b"   ,neuro\r\n")

    # Execute
    table = load_table(ok)
    with pytest.raises(DataError) as info:
        load_table(path)

    # Assert: the break is kept as stored; the blank text is row 3, which starts on physical line 6.
    assert table.texts == ['Pain\r\nleft arm,\r\n"sharp"', "Headache."]
    assert f"{path} row 3 (line 6):" in str(info.value)


MIXED_FIRST = "text,label\nFièvre depuis lundi.,ward\n".encode("utf-8")
MIXED_SECOND = "Douleur thoracique, café,ward\n".encode("latin-1")  # é as the single byte 0xe9


@pytest.fixture
def mixed_csv(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.csv"
    # Mostly UTF-8, then a line pasted from a Latin-1 export; more UTF-8 after it.
    path.write_bytes(MIXED_FIRST + MIXED_SECOND.replace(b",ward", b' "ok",ward') + "Suivi à J+7.,ward\n".encode() * 3)
    return path


def _mixed_expectation(path: Path) -> str:
    raw = path.read_bytes()
    offset = raw.index(b"\xe9")  # the first byte that is not UTF-8, found independently of the reader
    line = raw.count(b"\n", 0, offset) + 1
    return f"{path} line {line}, byte offset {offset}: byte 0xe9 is not valid UTF-8"


def test_a_file_with_mixed_encodings_is_refused_naming_line_and_byte_offset(mixed_csv: Path, tmp_path: Path) -> None:
    # Prepare: the same mistake in JSON Lines, and a UTF-16 file (Excel's "Unicode text").
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes('{"text": "Fièvre.", "label": "ward"}\n'.encode() + b'{"text": "caf\xe9", "label": "ward"}\n')
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("text,label\nFièvre.,ward\n".encode("utf-16"))

    # Execute
    messages = {}
    for path in (mixed_csv, jsonl, utf16):
        with pytest.raises(DataError) as info:
            load_table(path)
        messages[path] = str(info.value)

    # Assert: refused (not guessed), with the place of the first bad byte and the fix.
    assert _mixed_expectation(mixed_csv) in messages[mixed_csv] and "re-saved as UTF-8" in messages[mixed_csv]
    assert _mixed_expectation(jsonl) in messages[jsonl]
    assert f"{utf16} is UTF-16" in messages[utf16] and "re-save it as UTF-8" in messages[utf16]


def test_site_check_simulate_and_a_simulated_sites_training_path_all_refuse_the_mixed_file(
    mixed_csv: Path, tmp_path: Path
) -> None:
    # Prepare
    from fedtune.client.check import CHECKS
    from fedtune.client.local import prepare_site
    from fedtune.common.config import from_dict

    expected = _mixed_expectation(mixed_csv)
    site = load_site_config(make_site(tmp_path, ca=pem(make_ca().cert), node_key=GOOD_NODE_KEY,
                                      coordinator="127.0.0.1:9", data=mixed_csv))
    run = from_dict({"data": {"path": str(mixed_csv)}, "federation": {"sites": 2, "min_sites": 2}})

    # Execute: `site check`'s data check; `fedtune simulate`; the site's own loading before training.
    with pytest.raises(DataError) as check_error:
        dict(CHECKS)["data"](site)
    simulate = CliRunner().invoke(main, ["simulate", "--data", str(mixed_csv), "--sites", "2", "--out", str(tmp_path / "run")])
    with pytest.raises(DataError) as train_error:
        prepare_site(run, {"partition-id": 0, "num-partitions": 2}, run_dir=str(tmp_path / "sim"), labels=["ward"])

    # Assert
    assert expected in str(check_error.value)
    assert expected in one_error_line(simulate)
    assert not (tmp_path / "run").exists()
    assert expected in str(train_error.value)


LIMIT = 64 * 1024  # the test's record limit (MAX_RECORD_CHARS lowered)
HUGE = 24 * 1024 * 1024  # one field of 24 MiB: 384 times the limit


def _write_huge(path: Path, fmt: str) -> None:
    block = b"x" * (1 << 20)
    with path.open("wb") as f:
        f.write(b"text,label\nShort note.,a\n\"" if fmt == "csv" else b'{"text": "Short note.", "label": "a"}\n{"text": "')
        for _ in range(HUGE // len(block)):
            f.write(block)
        f.write(b'",b\n' if fmt == "csv" else b'", "label": "b"}\n')


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_huge_single_row_is_refused_in_bounded_memory(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    path = tmp_path / f"huge.{fmt}"
    _write_huge(path, fmt)
    monkeypatch.setattr(data_module, "MAX_RECORD_CHARS", LIMIT)

    # Execute: the peak of Python allocations while loading (the whole file would be 24 MiB of bytes, and as much again decoded).
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_table(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: refused naming file, row and the limit; at most a few times the limit was ever held.
    message = str(info.value)
    assert f"{path} row 2 (line {3 if fmt == 'csv' else 2}): the record is longer than {LIMIT:,} characters" in message
    assert "MAX_RECORD_CHARS" in message
    assert peak < 16 * LIMIT + 1024 * 1024, f"peak {peak:,} bytes for a {HUGE:,}-byte row"


def test_the_record_limit_is_inclusive_and_counts_every_line_of_a_quoted_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: with a limit of 100 characters, a record of exactly 100 (line break included) loads, 101 does not;
    # a quoted record spread over short lines counts all of them.
    monkeypatch.setattr(data_module, "MAX_RECORD_CHARS", 100)
    exact = "y" * (100 - len(",a\n"))
    ok = tmp_path / "ok.csv"
    ok.write_text(f"text,label\n{exact},a\n", encoding="utf-8")
    over = tmp_path / "over.csv"
    over.write_text(f"text,label\n{exact}z,a\n", encoding="utf-8")
    spread = tmp_path / "spread.csv"
    spread.write_text('text,label\nfirst,a\n"' + "ten chars\n" * 12 + '",b\n', encoding="utf-8")

    # Execute / Assert
    assert load_table(ok).texts == [exact]
    with pytest.raises(DataError, match=re.escape(f"{over} row 1 (line 2): the record is longer than 100 characters")):
        load_table(over)
    with pytest.raises(DataError, match=re.escape(f"{spread} row 2 (line 3): the record is longer than 100 characters")):
        load_table(spread)


def test_a_parquet_value_over_the_limit_is_refused_naming_row_and_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(data_module, "MAX_RECORD_CHARS", 1000)
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"text": ["short", "z" * 1001], "label": ["a", "b"]}), path)

    # Execute / Assert
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: column 'text' holds 1,001 characters, more than the 1,000")):
        load_table(path)


def test_site_check_and_a_simulated_site_refuse_the_huge_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    from fedtune.client.check import CHECKS
    from fedtune.client.local import prepare_site
    from fedtune.common.config import from_dict

    path = tmp_path / "huge.csv"
    _write_huge(path, "csv")
    monkeypatch.setattr(data_module, "MAX_RECORD_CHARS", LIMIT)
    site = load_site_config(make_site(tmp_path, ca=pem(make_ca().cert), node_key=GOOD_NODE_KEY, coordinator="127.0.0.1:9", data=path))
    run = from_dict({"data": {"path": str(path)}, "federation": {"sites": 2, "min_sites": 2}})
    expected = f"{path} row 2 (line 3): the record is longer than {LIMIT:,} characters"

    # Execute / Assert
    with pytest.raises(DataError, match=re.escape(expected)):
        dict(CHECKS)["data"](site)
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_site(run, {"partition-id": 1, "num-partitions": 2}, run_dir=str(tmp_path / "sim"), labels=["a", "b"])


def test_long_legal_texts_up_to_the_limit_still_load_in_csv(tmp_path: Path) -> None:
    # Prepare: a 200,000-character note, over the csv module's own default field limit (131,072), under ours.
    path = write_csv(tmp_path / "notes.csv", [("w" * 200_000, "a"), ("short", "b")])

    # Execute / Assert
    assert [len(t) for t in load_table(path).texts] == [200_000, 5]


def test_json_lines_u2028_and_csv_output_of_python_round_trip(tmp_path: Path) -> None:
    # Prepare: line separators JSON may hold raw, and what Python's csv writer produces (CRLF row ends).
    rows = [("a\u2028b", "x"), ('quote " and, comma\nnewline', "y")]
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows), encoding="utf-8")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("text", "label"), *rows])
    csv_path = tmp_path / "notes.csv"
    csv_path.write_text(buffer.getvalue(), encoding="utf-8", newline="")

    # Execute / Assert
    for path in (jsonl, csv_path):
        table = load_table(path)
        assert list(zip(table.texts, table.labels)) == rows

"""The coordinator's PKI: real certificates, checked by cryptography's verifier and by real TLS handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedtune.common.errors import ConfigError
from fedtune.server.gateway import server_context
from fedtune.server.pki import (
    CertPaths,
    check_admin_credentials,
    init_admin_certificate,
    init_certificates,
    load_admin_certificates,
    verify_server_certificate,
)

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certificates(
        tmp_path_factory.mktemp("certs"), hosts=("localhost", "127.0.0.1", "coord.example.org", "10.0.0.5", "::1")
    )


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certificates(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """With no umask, a file created with the default 0666 would be world-readable: modes must be explicit."""
    saved = os.umask(0)
    yield
    os.umask(saved)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the certificates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("localhost"), x509.DNSName("coord.example.org"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
)
def test_server_certificate_chains_to_the_ca_for_each_host(certs: CertPaths, subject: x509.GeneralName) -> None:
    ca = _cert(certs.ca_cert)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)

    chain = verifier.verify(_cert(certs.server_cert), [])

    assert chain[-1] == ca
    assert len(chain) == 2


def test_server_certificate_does_not_chain_to_another_ca(certs: CertPaths, other_ca: CertPaths) -> None:
    verifier = PolicyBuilder().store(Store([_cert(other_ca.ca_cert)])).build_server_verifier(x509.DNSName("localhost"))

    with pytest.raises(VerificationError):
        verifier.verify(_cert(certs.server_cert), [])


def test_san_has_dns_names_as_dns_and_ip_literals_as_ip_addresses(certs: CertPaths) -> None:
    san = _cert(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)

    assert sorted(dns) == ["coord.example.org", "localhost"]
    assert sorted(map(str, ips)) == sorted(["127.0.0.1", "10.0.0.5", "::1"])
    assert all(isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for ip in ips)


def test_ca_is_a_ca_and_the_leaf_a_server_certificate_linked_by_key_ids(certs: CertPaths) -> None:
    ca, leaf = _cert(certs.ca_cert), _cert(certs.server_cert)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    leaf_aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    leaf_ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    assert ca_bc.critical and ca_bc.value.ca is True
    assert leaf_bc.critical and leaf_bc.value.ca is False
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    assert leaf_ku.digital_signature and not leaf_ku.key_cert_sign
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf_aki.key_identifier == ca_ski.digest
    assert leaf_ski.digest != ca_ski.digest
    assert leaf.issuer == ca.subject


def test_keys_are_p384_and_match_their_certificates(certs: CertPaths) -> None:
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    server_key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)

    assert isinstance(ca_key, ec.EllipticCurvePrivateKey) and isinstance(ca_key.curve, ec.SECP384R1)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    assert ca_key.public_key() == _cert(certs.ca_cert).public_key()
    assert server_key.public_key() == _cert(certs.server_cert).public_key()


def test_private_keys_are_0600_and_certificates_0644_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    paths = init_certificates(tmp_path / "certs")

    modes = {p.name: _mode(p) for p in (paths.ca_key, paths.server_key, paths.admin_key, paths.ca_cert, paths.server_cert,
                                        paths.admin_cert, paths.admins)}

    assert modes == {"ca.key": 0o600, "server.key": 0o600, "admin.key": 0o600,
                     "ca.crt": 0o644, "server.crt": 0o644, "admin.crt": 0o644, "admins.pem": 0o644}
    assert _mode(tmp_path / "certs") == 0o700
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == sorted(modes)


def test_refuses_to_overwrite_and_names_the_file(tmp_path: Path) -> None:
    init_certificates(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(ConfigError, match="ca.key already exists") as info:
        init_certificates(tmp_path)

    assert len(info.value.problems) == 7
    assert {p: p.read_bytes() for p in before} == before


def test_refuses_when_only_one_file_exists_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_bytes(b"someone else's key")

    with pytest.raises(ConfigError, match="server.key") as info:
        init_certificates(tmp_path)

    assert len(info.value.problems) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_overwrite_replaces_everything_and_restores_the_key_mode(tmp_path: Path) -> None:
    first = init_certificates(tmp_path)
    old_ca = first.ca_cert.read_bytes()
    first.server_key.chmod(0o644)  # loosened by hand since

    second = init_certificates(tmp_path, overwrite=True)

    assert second.ca_cert.read_bytes() != old_ca
    assert _mode(second.server_key) == 0o600
    verify_server_certificate(second.ca_cert, second.server_cert, "localhost")


@pytest.mark.parametrize(
    ("hosts", "bad"),
    [
        (("localhost", "bad host"), "bad host"),
        (("",), "''"),
        (("coord.example.org:9093",), "coord.example.org:9093"),
        ((), "empty"),
        ("localhost", "single string"),
    ],
)
def test_invalid_hosts_are_refused_naming_the_value(tmp_path: Path, hosts: tuple[str, ...], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        init_certificates(tmp_path, hosts=hosts)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("days", [0, -1, 1.5])
def test_non_positive_days_are_refused(tmp_path: Path, days: int) -> None:
    with pytest.raises(ConfigError, match="days"):
        init_certificates(tmp_path, days=days)


# --- admin certificates --------------------------------------------------------------------------


def test_admin_certificate_is_self_signed_client_only_and_listed_in_admins_pem(certs: CertPaths) -> None:
    admin = _cert(certs.admin_cert)
    key = serialization.load_pem_private_key(certs.admin_key.read_bytes(), password=None)

    bc = admin.extensions.get_extension_for_class(x509.BasicConstraints)
    eku = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert admin.issuer == admin.subject
    admin.verify_directly_issued_by(admin)  # its own signature, not the CA's
    assert admin.issuer != _cert(certs.ca_cert).subject
    assert bc.critical and bc.value.ca is False
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert key.public_key() == admin.public_key()
    assert x509.load_pem_x509_certificates(certs.admins.read_bytes()) == [admin]


def test_two_admins_get_different_keys_and_names(tmp_path: Path, certs: CertPaths) -> None:
    other = init_admin_certificate(tmp_path / "bob", name="bob")

    assert _cert(other.cert).public_key() != _cert(certs.admin_cert).public_key()
    assert _cert(other.cert).subject != _cert(certs.admin_cert).subject
    assert "bob" in _cert(other.cert).subject.rfc4514_string()
    assert _mode(other.key) == 0o600


def test_load_admin_certificates_accepts_a_list_of_admins(tmp_path: Path, certs: CertPaths) -> None:
    bob = init_admin_certificate(tmp_path / "bob", name="bob")
    admins = tmp_path / "admins.pem"
    admins.write_bytes(certs.admins.read_bytes() + bob.cert.read_bytes())

    loaded = load_admin_certificates(admins)

    assert loaded == [_cert(certs.admin_cert), _cert(bob.cert)]


def test_load_admin_certificates_refuses_a_certificate_the_ca_signed(tmp_path: Path, certs: CertPaths) -> None:
    admins = tmp_path / "admins.pem"
    admins.write_bytes(certs.admins.read_bytes() + certs.server_cert.read_bytes())

    with pytest.raises(ConfigError, match="self-signed") as info:
        load_admin_certificates(admins)

    assert len(info.value.problems) == 1


def test_load_admin_certificates_refuses_an_expired_admin_and_an_empty_list(tmp_path: Path, certs: CertPaths) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=826)
    (tmp_path / "empty.pem").write_bytes(b"")

    with pytest.raises(ConfigError, match="valid only from"):
        load_admin_certificates(certs.admins, at=later)
    with pytest.raises(ConfigError, match="at least one"):
        load_admin_certificates(tmp_path / "empty.pem")


def test_check_admin_credentials_refuses_a_key_of_another_certificate(tmp_path: Path, certs: CertPaths) -> None:
    bob = init_admin_certificate(tmp_path / "bob", name="bob")

    check_admin_credentials(certs.admin_cert, certs.admin_key)
    with pytest.raises(ConfigError, match="is not the private key of"):
        check_admin_credentials(certs.admin_cert, bob.key)
    with pytest.raises(ConfigError, match="not an admin client certificate"):
        check_admin_credentials(certs.server_cert, certs.server_key)


@pytest.mark.parametrize("name", ["", "two words", "ev/il", "adm\u00efn"])
def test_admin_names_are_refused_naming_the_value(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="admin name"):
        init_admin_certificate(tmp_path, name=name)

    assert list(tmp_path.iterdir()) == []


# --- verify_server_certificate ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "COORD.example.org", "::1"])
def test_verify_accepts_a_good_certificate_for_each_named_host(certs: CertPaths, host: str) -> None:
    verify_server_certificate(certs.ca_cert, certs.server_cert, host)


def test_verify_refuses_a_certificate_from_another_ca(certs: CertPaths, other_ca: CertPaths) -> None:
    with pytest.raises(ConfigError, match="not signed by the CA"):
        verify_server_certificate(other_ca.ca_cert, certs.server_cert, "localhost")


def test_verify_refuses_a_host_not_in_the_sans(certs: CertPaths) -> None:
    with pytest.raises(ConfigError, match="does not name host 'other.example.org'"):
        verify_server_certificate(certs.ca_cert, certs.server_cert, "other.example.org")


def test_verify_refuses_an_expired_certificate(tmp_path: Path) -> None:
    paths = init_certificates(tmp_path, days=30)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31)

    with pytest.raises(ConfigError, match="expired on"):
        verify_server_certificate(paths.ca_cert, paths.server_cert, "localhost", at=later)


def test_verify_refuses_a_leaf_given_as_the_ca(certs: CertPaths) -> None:
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        verify_server_certificate(certs.server_cert, certs.server_cert, "localhost")


def test_verify_names_a_missing_file(certs: CertPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.crt does not exist"):
        verify_server_certificate(certs.ca_cert, tmp_path / "nope.crt", "localhost")


# --- real TLS on 127.0.0.1 -------------------------------------------------------------------------


class _OneShotTLSServer:
    """Serves one connection on 127.0.0.1: TLS handshake, then replies b'pong' to b'ping'.

    `received` is what the application saw after the handshake; `error` what ended the connection.
    `context` replaces the plain server context built from ``cert`` and ``key``.
    """

    def __init__(self, cert: Path, key: Path, context: ssl.SSLContext | None = None) -> None:
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT_S)
        self.port = self.listener.getsockname()[1]
        self.received: bytes | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as err:
            self.error = err
            return
        with conn:
            conn.settimeout(TIMEOUT_S)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.received = tls.recv(1024)
                    if self.received == b"ping":
                        tls.sendall(b"pong")
            except (ssl.SSLError, OSError) as err:
                self.error = err

    def __enter__(self) -> _OneShotTLSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=TIMEOUT_S * 2)
        self.listener.close()
        assert not self.thread.is_alive(), "the TLS server thread did not finish"


def _client_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    # Strict RFC 5280 checks, as newer Pythons apply by default: our certificates must pass them too.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _tls_ping(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            return tls.recv(1024)


def test_tls_handshake_with_our_ca_and_hostname_succeeds(certs: CertPaths) -> None:
    with _OneShotTLSServer(certs.server_cert, certs.server_key) as server:
        reply = _tls_ping(server.port, _client_context(certs.ca_cert), "localhost")

    assert reply == b"pong"
    assert server.received == b"ping"
    assert server.error is None


def test_tls_client_trusting_another_ca_fails_verification(certs: CertPaths, other_ca: CertPaths) -> None:
    with _OneShotTLSServer(certs.server_cert, certs.server_key) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_ping(server.port, _client_context(other_ca.ca_cert), "localhost")

    assert server.received is None
    assert isinstance(server.error, OSError)


def test_tls_client_dialing_a_name_not_in_the_certificate_fails_verification(certs: CertPaths) -> None:
    with _OneShotTLSServer(certs.server_cert, certs.server_key) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
            _tls_ping(server.port, _client_context(certs.ca_cert), "other.example.org")

    assert server.received is None


def test_plain_tcp_client_gets_no_application_data(certs: CertPaths) -> None:
    with _OneShotTLSServer(certs.server_cert, certs.server_key) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as raw:
            # A whole plaintext request (what a client without TLS sends), longer than a TLS record header.
            raw.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = b""
            try:
                while chunk := raw.recv(1024):  # until the server closes (or resets) the connection
                    got += chunk
            except ConnectionResetError:
                pass

    assert b"pong" not in got
    assert server.received is None
    assert isinstance(server.error, ssl.SSLError)


# --- the admin listener's mutual TLS (the context fedtune's gateway serves with) --------------------


def _admin_ping(certs: CertPaths, client_cert: Path | None, client_key: Path | None) -> tuple[bytes | None, _OneShotTLSServer]:
    context = _client_context(certs.ca_cert)
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    server_tls = server_context(certs.ca_cert.parent, admins=certs.admins)
    with _OneShotTLSServer(certs.server_cert, certs.server_key, server_tls) as server:
        try:
            reply: bytes | None = _tls_ping(server.port, context, "localhost")
        except (ssl.SSLError, OSError):
            reply = None
    return reply, server


def test_admin_listener_serves_the_listed_admin(certs: CertPaths) -> None:
    reply, server = _admin_ping(certs, certs.admin_cert, certs.admin_key)

    assert reply == b"pong"
    assert server.received == b"ping"


def test_admin_listener_refuses_a_client_without_a_certificate(certs: CertPaths) -> None:
    reply, server = _admin_ping(certs, None, None)

    assert reply in (None, b"")
    assert server.received is None
    assert isinstance(server.error, ssl.SSLError)


def test_admin_listener_refuses_an_admin_certificate_it_does_not_list(tmp_path: Path, certs: CertPaths) -> None:
    mallory = init_admin_certificate(tmp_path / "mallory", name="mallory")

    reply, server = _admin_ping(certs, mallory.cert, mallory.key)

    assert reply in (None, b"")
    assert server.received is None
    assert isinstance(server.error, ssl.SSLError)


def test_admin_listener_refuses_a_listed_certificate_without_its_key(tmp_path: Path, certs: CertPaths) -> None:
    # Prepare: mallory's key under the listed admin's certificate (a TLS client must prove it holds the key).
    mallory = init_admin_certificate(tmp_path / "mallory", name="mallory")
    forged = tmp_path / "forged.pem"
    forged.write_bytes(certs.admin_cert.read_bytes() + mallory.key.read_bytes())
    context = _client_context(certs.ca_cert)

    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH|key values mismatch"):
        context.load_cert_chain(forged)  # OpenSSL refuses even to send it; a client that did would fail the signature check


def test_admin_listener_refuses_a_certificate_the_ca_signed(certs: CertPaths) -> None:
    # The coordinator's own server certificate: signed by the CA every site trusts, but not a listed admin.
    reply, server = _admin_ping(certs, certs.server_cert, certs.server_key)

    assert reply in (None, b"")
    assert server.received is None
    assert isinstance(server.error, ssl.SSLError)

"""The coordinator's certificates: a private CA and the SuperLink's TLS server certificate.

```
OUT_DIR/
  ca.crt       the CA certificate: public, every site and every `fedtune run` user gets a copy
  ca.key       the CA private key: secret (0600); keep it offline, the running coordinator never needs it
  server.crt   the SuperLink's certificate, signed by the CA, naming every host sites dial (0644)
  server.key   the SuperLink's private key: secret (0600)
```

Both keys are ECDSA P-384 (signed with SHA-384). Why not RSA-3072: P-384 is the curve Flower
itself uses for node-authentication keys, so one family of keys covers the whole deployment; it
gives a higher security level (~192-bit vs ~128-bit), much smaller keys and handshakes, and key
generation in milliseconds rather than seconds; OpenSSL, gRPC, uvicorn and httpx (what Flower
serves and dials with) all accept it.

Keys are written unencrypted, because the coordinator starts unattended (systemd, containers);
they are protected by their file mode instead, which is 0600 from the moment the file exists.

Flower's SuperLink starts a SuperExec that dials the SuperLink's own port over TLS on the
loopback address (0.0.0.0 -> 127.0.0.1, :: -> ::1), so the server certificate must also name
the loopback address the SuperLink is reached on: keep ``127.0.0.1`` (the default) among the hosts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedtune.common.errors import ConfigError
from fedtune.common.io import read_bytes, write_file_exclusive

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
# Certificates start an hour in the past: a site whose clock lags the coordinator's must not
# see a brand-new certificate as "not yet valid".
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class CertPaths:
    """Where `init_certificates` wrote the CA and the server certificate and keys."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def init_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Create a private CA and the coordinator's TLS server certificate signed by it.

    Args:
        out_dir: Folder to write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` into
            (created with mode 0700 if missing).
        hosts: Every name sites and `fedtune run` use to reach the coordinator; DNS names become
            DNSName SANs and IP literals IPAddress SANs. Keep ``127.0.0.1`` (see module doc).
        days: Validity of both certificates, in days.
        overwrite: Replace existing files; otherwise an existing file is an error.

    Returns:
        The four paths.

    Raises:
        ConfigError: a host is empty or malformed, ``days`` is not a positive integer, or a file
            exists and ``overwrite`` is False (nothing is written then).
    """
    names = _validate_hosts(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"`days` must be a positive integer, got {days!r}.")
    out_dir = Path(out_dir)
    paths = CertPaths(
        ca_cert=out_dir / CA_CERT_FILE,
        ca_key=out_dir / CA_KEY_FILE,
        server_cert=out_dir / SERVER_CERT_FILE,
        server_key=out_dir / SERVER_KEY_FILE,
    )
    all_paths = (paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert)
    if not overwrite:
        existing = [str(p) for p in all_paths if p.exists() or p.is_symlink()]
        if existing:
            raise ConfigError(
                [f"{p} already exists; pass overwrite=True (`--overwrite`) to replace it." for p in existing]
            )

    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - _BACKDATE, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    # A random suffix keeps two CAs (say, before and after a rotation) apart in error messages
    # and chain building, which look CAs up by name.
    ca_name = _name(f"fedtune CA {secrets.token_hex(4)}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )

    server_key = ec.generate_private_key(_CURVE())
    sans = [x509.IPAddress(ip) if (ip := _ip(h)) is not None else x509.DNSName(h) for h in names]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )

    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)
    # Keys first: a certificate without its key is useless, a key without its certificate harmless.
    write_file_exclusive(paths.ca_key, _private_pem(ca_key), mode=0o600, overwrite=overwrite)
    write_file_exclusive(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)
    write_file_exclusive(paths.server_key, _private_pem(server_key), mode=0o600, overwrite=overwrite)
    write_file_exclusive(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite
    )
    logger.info("Wrote a CA and a server certificate for %s to %s (valid %d days).", ", ".join(names), out_dir, days)
    return paths


def verify_server_certificate(
    ca_path: Path, cert_path: Path, host: str, *, at: dt.datetime | None = None
) -> None:
    """Check that ``cert_path`` is a valid TLS server certificate for ``host`` issued by ``ca_path``.

    Checks, each with its own message: the CA is a CA, the certificate is signed by it, both are
    within their validity period at ``at`` (default: now), ``host`` is among its subjectAltNames and
    it allows serverAuth; then a full RFC 5280 path validation (cryptography's verifier) catches
    anything else.

    Args:
        ca_path: The CA certificate (PEM), e.g. ``ca.crt``.
        cert_path: The server certificate (PEM), e.g. ``server.crt``.
        host: The DNS name or IP address sites dial.
        at: The moment to check validity for (timezone-aware); default now.

    Raises:
        ConfigError: naming the file and the reason.
    """
    ca_path, cert_path = Path(ca_path), Path(cert_path)
    when = at if at is not None else dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        raise ConfigError(f"`at` must be timezone-aware, got {when!r}.")
    ca = _load_cert(ca_path)
    cert = _load_cert(cert_path)
    target = _validate_hosts([host])[0]

    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{ca_path} is not a CA certificate (its BasicConstraints do not say CA:TRUE).")

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ConfigError(
            f"{cert_path} is not signed by the CA in {ca_path} (issuer {cert.issuer.rfc4514_string()!r}, "
            f"CA {ca.subject.rfc4514_string()!r}): {err or type(err).__name__}. "
            "Use the ca.crt that was created together with this server certificate."
        ) from err

    for path, c in ((ca_path, ca), (cert_path, cert)):
        if when < c.not_valid_before_utc:
            raise ConfigError(f"{path} is not valid yet: valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.")
        if when > c.not_valid_after_utc:
            raise ConfigError(
                f"{path} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                "create new certificates (`fedtune certs init`)."
            )

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError(f"{cert_path} has no subjectAltName; it cannot be used for host {target!r}.") from None
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    target_ip = _ip(target)
    found = target_ip in ips if target_ip is not None else any(_dns_match(p, target) for p in dns)
    if not found:
        listed = [*dns, *(str(ip) for ip in ips)]
        raise ConfigError(
            f"{cert_path} does not name host {target!r}; its subjectAltNames are {listed}. "
            f"Create a certificate with `--host {target}`."
        )

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ConfigError(f"{cert_path} is not a TLS server certificate (no serverAuth in its extendedKeyUsage).")

    subject = x509.IPAddress(target_ip) if target_ip is not None else x509.DNSName(target)
    verifier = PolicyBuilder().store(Store([ca])).time(when).build_server_verifier(subject)
    try:
        verifier.verify(cert, [])
    except VerificationError as err:
        raise ConfigError(f"{cert_path} failed validation against {ca_path} for {target!r}: {err}") from err


def _validate_hosts(hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, (str, bytes)):
        raise ConfigError(f"`hosts` must be a list of names, got the single string {hosts!r}.")
    names: list[str] = []
    problems: list[str] = []
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            problems.append(f"host {host!r} must be a non-empty DNS name or IP address.")
        elif any(ch.isspace() for ch in host):
            problems.append(f"host {host!r} contains whitespace; give each name separately.")
        elif not host.isascii():
            problems.append(f"host {host!r} is not ASCII; use its punycode (xn--...) form.")
        elif _ip(host) is None and (":" in host or "/" in host or "[" in host):
            problems.append(f"host {host!r} is not a DNS name or IP address; give it without a port or URL scheme.")
        elif host.lower() not in (n.lower() for n in names):
            names.append(host)
    if not names and not problems:
        problems.append("`hosts` is empty; give at least one DNS name or IP address the coordinator is reached on.")
    if problems:
        raise ConfigError(problems)
    return names


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        # A wildcard stands for exactly one left-most label (RFC 6125).
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(path: Path) -> x509.Certificate:
    data = read_bytes(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise ConfigError(f"{path} is not a PEM certificate: {err}.") from None

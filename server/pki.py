"""The coordinator's certificates: a private CA, the coordinator's TLS server certificate, and the
consortium admins' client certificates.

```
OUT_DIR/
  ca.crt       the CA certificate: public, every site and every admin gets a copy
  ca.key       the CA private key: secret (0600); keep it offline, the running coordinator never needs it
  server.crt   the coordinator's certificate, signed by the CA, naming every host sites and admins dial (0644)
  server.key   the coordinator's private key: secret (0600)
  admin.crt    the first admin's client certificate (0644): self-signed, clientAuth only
  admin.key    the admin's private key: secret (0600); admins only, never a site
  admins.pem   the admin certificates the coordinator accepts (0644): at first just admin.crt
```

Admin certificates are self-signed and *pinned*: the coordinator's admin listener trusts exactly
the certificates in ``admins.pem``, not anything the CA signs. So adding or revoking an admin is an
edit of that one file on the coordinator (and a restart); it never touches the CA, whose
certificate every site holds, and the CA key can stay offline for it. Only a client that holds the
private key of a listed certificate completes the TLS handshake (see ``server/gateway.py``).

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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import ConfigError
from fedtune.common.io import read_bytes, write_file_exclusive
from fedtune.common.tls import (
    check_ca_certificate,
    check_server_certificate,
    now_utc,
    parse_pem_certificate,
    served_certificate,
    utc,
)

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
ADMIN_CERT_FILE = "admin.crt"
ADMIN_KEY_FILE = "admin.key"
ADMINS_FILE = "admins.pem"

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
    admin_cert: Path
    admin_key: Path
    admins: Path


@dataclass(frozen=True)
class AdminPaths:
    """Where `init_admin_certificate` wrote an admin's client certificate and key."""

    cert: Path
    key: Path


def init_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
    overwrite: bool = False,
    admin_name: str = "admin",
) -> CertPaths:
    """Create a private CA, the coordinator's TLS server certificate signed by it, and a first admin.

    Args:
        out_dir: Folder to write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``,
            ``admin.crt``, ``admin.key`` and ``admins.pem`` into (created with mode 0700 if missing).
        hosts: Every name sites and admins use to reach the coordinator; DNS names become
            DNSName SANs and IP literals IPAddress SANs. Keep ``127.0.0.1`` (see module doc).
        days: Validity of every certificate, in days.
        overwrite: Replace existing files; otherwise an existing file is an error.
        admin_name: Common name of the admin certificate (who holds it, for the coordinator's logs).

    Returns:
        The seven paths.

    Raises:
        ConfigError: a host is empty or malformed, ``days`` is not a positive integer, or a file
            exists and ``overwrite`` is False (nothing is written then).
    """
    names = _validate_hosts(hosts)
    _validate_days(days)
    _validate_admin_name(admin_name)
    out_dir = Path(out_dir)
    paths = CertPaths(
        ca_cert=out_dir / CA_CERT_FILE,
        ca_key=out_dir / CA_KEY_FILE,
        server_cert=out_dir / SERVER_CERT_FILE,
        server_key=out_dir / SERVER_KEY_FILE,
        admin_cert=out_dir / ADMIN_CERT_FILE,
        admin_key=out_dir / ADMIN_KEY_FILE,
        admins=out_dir / ADMINS_FILE,
    )
    _refuse_existing(
        (paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert, paths.admin_key, paths.admin_cert, paths.admins),
        overwrite=overwrite,
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
    admin_key, admin_cert = _admin_certificate(admin_name, not_before, not_after)
    admin_pem = admin_cert.public_bytes(serialization.Encoding.PEM)
    write_file_exclusive(paths.admin_key, _private_pem(admin_key), mode=0o600, overwrite=overwrite)
    write_file_exclusive(paths.admin_cert, admin_pem, mode=0o644, overwrite=overwrite)
    write_file_exclusive(paths.admins, admin_pem, mode=0o644, overwrite=overwrite)
    logger.info(
        "Wrote a CA, a server certificate for %s and the admin certificate %r to %s (valid %d days).",
        ", ".join(names), admin_name, out_dir, days,
    )
    return paths


def init_admin_certificate(
    out_dir: Path, *, name: str, days: int = 825, overwrite: bool = False
) -> AdminPaths:
    """Create one more admin's client certificate: ``out_dir/admin.crt`` (0644) and ``admin.key`` (0600).

    The coordinator accepts it once ``admin.crt`` is appended to its ``admins.pem`` (and it is
    restarted); no CA key is involved (see module doc).

    Raises:
        ConfigError: ``name`` or ``days`` is invalid, or a file exists and ``overwrite`` is False.
    """
    _validate_days(days)
    _validate_admin_name(name)
    out_dir = Path(out_dir)
    paths = AdminPaths(cert=out_dir / ADMIN_CERT_FILE, key=out_dir / ADMIN_KEY_FILE)
    _refuse_existing((paths.key, paths.cert), overwrite=overwrite)
    now = dt.datetime.now(dt.timezone.utc)
    key, cert = _admin_certificate(name, now - _BACKDATE, now + dt.timedelta(days=days))
    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)
    write_file_exclusive(paths.key, _private_pem(key), mode=0o600, overwrite=overwrite)
    write_file_exclusive(paths.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)
    return paths


def load_admin_certificates(path: Path, *, at: dt.datetime | None = None) -> list[x509.Certificate]:
    """The admin certificates in ``path`` (the coordinator's ``admins.pem``), each checked.

    Checked here, at start, so that a bad list fails with a message naming it instead of every admin
    handshake failing later: at least one certificate; each self-signed (the list pins certificates,
    it does not name CAs), allowed for clientAuth and not for serverAuth, and valid at ``at``.

    Raises:
        ConfigError: naming the file, the certificate's subject and what is wrong.
    """
    path = Path(path)
    when = now_utc(at)
    data = read_bytes(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{path} holds no certificate; it must list at least one admin.crt.")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ConfigError(f"{path} is not a list of PEM certificates: {err}.") from None
    problems = []
    for cert in certs:
        who = f"{path}: certificate {cert.subject.rfc4514_string()!r}"
        eku = _eku(cert)
        if cert.issuer != cert.subject:
            problems.append(f"{who} is issued by {cert.issuer.rfc4514_string()!r}; admins.pem lists admins' own "
                            "self-signed certificates (admin.crt from `fedtune certs init` or `fedtune certs admin`).")
        elif eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku or ExtendedKeyUsageOID.SERVER_AUTH in eku:
            problems.append(f"{who} is not an admin client certificate (extendedKeyUsage must be clientAuth only).")
        elif not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            problems.append(f"{who} is valid only from {utc(cert.not_valid_before_utc)} to "
                            f"{utc(cert.not_valid_after_utc)} and now is {utc(when)}; issue a new one with `fedtune certs admin`.")
    if problems:
        raise ConfigError(problems)
    return certs


def check_admin_credentials(cert_path: Path, key_path: Path, *, at: dt.datetime | None = None) -> x509.Certificate:
    """Check an admin's own ``admin.crt`` / ``admin.key`` before they are used to dial the coordinator.

    Raises:
        ConfigError: a file is missing or unreadable, the key does not belong to the certificate,
            it is not an admin client certificate or not valid at ``at`` (default now).
    """
    when = now_utc(at)
    cert = _load_cert(Path(cert_path))
    try:
        key = serialization.load_pem_private_key(read_bytes(Path(key_path)), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key: {err}.") from None
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}; use the admin.key made with it.")
    eku = _eku(cert)
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ConfigError(f"{cert_path} is not an admin client certificate (no clientAuth in its extendedKeyUsage).")
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise ConfigError(f"{cert_path} is valid only from {utc(cert.not_valid_before_utc)} to "
                          f"{utc(cert.not_valid_after_utc)} and now is {utc(when)}; ask for a new one (`fedtune certs admin`).")
    return cert


def _admin_certificate(
    name: str, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    # The serial-like suffix keeps two admins of the same name apart in the coordinator's logs.
    subject = _name(f"fedtune admin {name} {secrets.token_hex(4)}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # Not a CA: a pinned leaf can vouch for nobody else.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        # clientAuth only: OpenSSL then refuses it as a server certificate and accepts it as a client one.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH())
    )
    return key, cert


def _eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _validate_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"`days` must be a positive integer, got {days!r}.")


def _validate_admin_name(name: str) -> None:
    if not isinstance(name, str) or not name or not all(ch.isalnum() or ch in "-_." for ch in name) or not name.isascii():
        raise ConfigError(f"admin name must be letters, digits, '-', '_' or '.', got {name!r}.")


def _refuse_existing(paths: Sequence[Path], *, overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError([f"{p} already exists; pass overwrite=True (`--overwrite`) to replace it." for p in existing])


def verify_server_certificate(
    ca_path: Path, cert_path: Path, host: str, *, at: dt.datetime | None = None
) -> None:
    """Check that ``cert_path`` is a valid TLS server certificate for ``host`` issued by ``ca_path``.

    Checks, each with its own message (see ``common/tls.py``): the CA is a CA and valid, the
    certificate is signed by it and within its validity period at ``at`` (default: now), ``host`` is
    among its subjectAltNames and it allows serverAuth; then a full RFC 5280 path validation.

    Args:
        ca_path: The CA certificate (PEM), e.g. ``ca.crt``.
        cert_path: The server certificate (PEM), e.g. ``server.crt``.
        host: The DNS name or IP address sites dial.
        at: The moment to check validity for (timezone-aware); default now.

    Raises:
        ConfigError: naming the file, what was found (validity window and now, the names covered,
            the issuer) and what to do.
    """
    ca_path, cert_path = Path(ca_path), Path(cert_path)
    when = now_utc(at)
    ca = _load_cert(ca_path)
    cert = _load_cert(cert_path)
    target = _validate_hosts([host])[0]
    check_server_certificate(
        cert, ca, host=target, at=when, subject=str(cert_path), ca_subject=str(ca_path),
        fix_host=f"create a certificate that names it (`fedtune certs init --host {target}`)",
    )


def check_ca_file(ca_path: Path, *, at: dt.datetime | None = None) -> x509.Certificate:
    """The CA certificate in ``ca_path``, checked: a PEM CA certificate, valid at ``at`` (default now).

    Raises:
        ConfigError: naming the file, what it holds instead or its validity window and now.
    """
    ca = _load_cert(Path(ca_path))
    check_ca_certificate(ca, subject=str(ca_path), at=now_utc(at))
    return ca


def check_served_certificate(
    address: str, ca_path: Path, *, client_cert: Path | None = None, client_key: Path | None = None,
    at: dt.datetime | None = None, timeout: float = 5.0,
) -> None:
    """Check the certificate the server at ``address`` presents against ``ca_path`` and the host dialled.

    Used when a verified TLS connection failed, to say why in the operator's terms (expired, not yet
    valid, another host, another CA) instead of OpenSSL's "certificate verify failed". The handshake
    here does not verify (it only reads the certificate), and sends nothing after it.

    Returns quietly when nothing answers there, or a TLS server hangs up (a listener refusing the
    admin certificate): the caller's own error stands then.

    Raises:
        ConfigError: the presented certificate is wrong, naming the address, what it covers or
            its validity window, and now; or what answers does not speak TLS.
    """
    from fedtune.common.io import parse_host_port

    host, port = parse_host_port(address, where="--coordinator")
    ca = _load_cert(Path(ca_path))
    served = served_certificate(host, port, where="--coordinator", timeout=timeout, client_cert=client_cert, client_key=client_key,
                                not_tls="is the coordinator started with --insecure, or is this not its admin port "
                                        "(`coordinator start --admin-port`)?")
    if served is None:
        return
    check_server_certificate(
        served, ca, host=host, at=now_utc(at),
        subject=f"the certificate {address} presents", ca_subject=str(ca_path),
        fix_host=f"dial a name it covers, or have the coordinator create one that names {host!r} "
                 f"(`fedtune certs init --host {host}`)",
    )


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
    return parse_pem_certificate(read_bytes(path), source=str(path))

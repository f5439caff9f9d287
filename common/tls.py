"""Checks of the X.509 certificates a coordinator, a site or an admin is given, before any process uses them.

Shared by the coordinator (``server/pki.py``: its own ``server.crt``), the site (``client/check.py``: its
``ca.crt`` and the certificate the coordinator presents) and admins: each side must refuse the same
mistakes with the same words. Without these checks the mistake surfaces much later and far from its
cause: Flower's SuperNode retries a handshake that can never succeed ("certificate verify failed"),
and an operator cannot tell an expired certificate from a wrong CA or a wrong host name.

Every message names the file (or the address that presented the certificate), what was found (the
validity window, the names the certificate covers, its issuer), the moment checked ("now", in UTC:
a wrong clock is a common cause of "not valid yet") and what to do. Pure functions of bytes,
certificates and a time, except `served_certificate`, the one place either side reads what a server
presents.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .errors import ConfigError

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def utc(when: dt.datetime) -> str:
    """A moment as messages show it: ``2026-12-01 10:48:05 UTC``."""
    return f"{when.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def now_utc(at: dt.datetime | None = None) -> dt.datetime:
    """``at`` (which must be timezone-aware), or the current time."""
    if at is None:
        return dt.datetime.now(dt.timezone.utc)
    if at.tzinfo is None:
        raise ConfigError(f"`at` must be timezone-aware, got {at!r}.")
    return at


def parse_pem_certificate(data: bytes, *, source: str) -> x509.Certificate:
    """The first certificate of a PEM file's bytes; ConfigError says what the file holds instead.

    Args:
        data: The file's bytes.
        source: How messages name the file (its path, or the flag that gave it).
    """
    if PEM_CERTIFICATE in data:
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as err:
            raise ConfigError(f"{source} has a '-----BEGIN CERTIFICATE-----' block that cannot be read ({err}); "
                              "copy the file again from where it was issued.") from None
    raise ConfigError(f"{source} is not a PEM certificate: {describe_non_certificate(data)}; expected a text file "
                      "starting with '-----BEGIN CERTIFICATE-----' (such as ca.crt from `fedtune certs init`).")


def describe_non_certificate(data: bytes) -> str:
    """What a file that should hold a PEM certificate holds instead, in a few words."""
    if not data.strip():
        return "the file is empty"
    if b"PRIVATE KEY-----" in data:
        return "it holds a private key, not a certificate (never hand out a private key)"
    if b"PUBLIC KEY-----" in data or data.lstrip().startswith((b"ssh-", b"ecdsa-sha2-")):
        return "it holds a public key, not a certificate"
    if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: binary DER
        try:
            x509.load_der_x509_certificate(data)
            return ("it is a DER (binary) certificate; convert it with "
                    "`openssl x509 -inform der -in FILE -out FILE.pem`")
        except ValueError:
            pass
        return "it is binary data (no PEM text)"
    return "it holds no '-----BEGIN CERTIFICATE-----' block"


def check_validity(cert: x509.Certificate, *, subject: str, at: dt.datetime, fix: str) -> None:
    """Refuse a certificate outside its validity window at ``at``, naming the window and ``at``.

    Args:
        cert: The certificate.
        subject: How the message names it, e.g. its path.
        at: The moment checked (timezone-aware).
        fix: What to do, e.g. "create new certificates (`fedtune certs init`)".
    """
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    window = f"it is valid from {utc(start)} to {utc(end)} and now is {utc(at)}"
    if at < start:
        raise ConfigError(f"{subject} is not valid yet: {window}. If this machine's clock is wrong, correct it; "
                          f"otherwise wait, or {fix}.")
    if at > end:
        raise ConfigError(f"{subject} expired on {utc(end)}: {window}; {fix}.")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_ca_certificate(ca: x509.Certificate, *, subject: str, at: dt.datetime) -> None:
    """Refuse a CA file that holds no CA certificate, or one outside its validity window."""
    if not is_ca(ca):
        raise ConfigError(
            f"{subject} is not a CA certificate (its BasicConstraints do not say CA:TRUE; it is "
            f"{ca.subject.rfc4514_string()!r}, issued by {ca.issuer.rfc4514_string()!r}); give the consortium's ca.crt, "
            "not server.crt or admin.crt."
        )
    check_validity(ca, subject=subject, at=at, fix="the coordinator must create new certificates (`fedtune certs init`)")


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's subjectAltName covers (empty without one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def covers_host(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's subjectAltName covers ``host`` (a DNS name or an IP literal), as TLS checks it.

    The common name is ignored, as browsers, OpenSSL's hostname check and gRPC ignore it when a
    subjectAltName is present (RFC 6125); fedtune's certificates always carry one.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    ip = _ip(host)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    return any(_dns_match(pattern, host) for pattern in san.get_values_for_type(x509.DNSName))


def check_server_certificate(
    cert: x509.Certificate, ca: x509.Certificate, *, host: str, at: dt.datetime, subject: str, ca_subject: str,
    fix_host: str,
) -> None:
    """Check that ``cert`` is a valid TLS server certificate for ``host``, issued by ``ca``, at ``at``.

    One message per mistake, in the order an operator can act on: the CA is a CA and valid, the
    certificate is signed by it, valid now, covers ``host``, allows serverAuth; then a full RFC 5280
    path validation (cryptography's verifier) catches anything else.

    Args:
        cert: The server certificate.
        ca: The CA certificate that must have issued it.
        host: The name or address clients dial.
        at: The moment checked (timezone-aware).
        subject: How messages name the certificate ("certs/server.crt", "the certificate 10.0.0.5:9093 presents").
        ca_subject: How messages name the CA (its path).
        fix_host: What to do when ``host`` is not covered.

    Raises:
        ConfigError: naming the certificate, what was found and what is allowed.
    """
    check_ca_certificate(ca, subject=ca_subject, at=at)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ConfigError(
            f"{subject} is not signed by the CA in {ca_subject}: it is issued by {cert.issuer.rfc4514_string()!r}, "
            f"the CA is {ca.subject.rfc4514_string()!r} ({str(err).rstrip('.') or type(err).__name__}). "
            "Use the ca.crt created together with the coordinator's certificate."
        ) from None
    check_validity(cert, subject=subject, at=at, fix="the coordinator must create new certificates (`fedtune certs init`)")
    if not covers_host(cert, host):
        names = certificate_names(cert)
        covered = f"it covers only {names}" if names else "it has no subjectAltName, so it covers no host"
        raise ConfigError(f"{subject} does not name host {host!r}: {covered}; {fix_host}.")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ConfigError(f"{subject} is not a TLS server certificate (no serverAuth in its extendedKeyUsage).")
    ip = _ip(host)
    name = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).time(at).build_server_verifier(name)
    try:
        verifier.verify(cert, [])
    except VerificationError as err:
        raise ConfigError(f"{subject} failed validation against {ca_subject} for {host!r}: {err}") from None


def served_certificate(
    host: str, port: int, *, where: str, not_tls: str, timeout: float = 5.0,
    client_cert: Path | None = None, client_key: Path | None = None,
) -> x509.Certificate | None:
    """The certificate a TLS server at ``host:port`` presents, unverified; None if nothing answers there.

    Read so that a wrong certificate is named precisely (`check_server_certificate`, by the caller)
    instead of OpenSSL's "certificate verify failed". The handshake verifies nothing and nothing is
    sent after it.

    Args:
        host: The host dialled.
        port: Its port.
        where: How messages name the address's setting (``site.coordinator``, ``--coordinator``).
        not_tls: What to ask when something answers without TLS, e.g. which port was meant.
        timeout: Seconds for the connection and the handshake.
        client_cert: A client certificate to present (an admin listener asks for one); with ``client_key``.
        client_key: Its private key. A pair that cannot be loaded is not presented: the server's
            certificate still comes, and the caller names a wrong admin key.

    Raises:
        ConfigError: something accepts the connection but does not complete a TLS handshake (a
            coordinator started with --insecure, or another service on that port).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client_cert is not None and client_key is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError):
            pass
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError):
        # Hung up or silent: a coordinator starting or stopping looks like this; the daemon keeps trying.
        # A listener refusing a client certificate drops the connection the same way.
        return None
    except ssl.SSLError as err:
        if "ALERT" in str(err.reason or ""):  # a TLS alert: it speaks TLS, it refused this handshake
            return None
        # It answered, but not with TLS (an HTTP server replies "400 Bad Request" to a TLS hello).
        raise ConfigError(f"{where} {host}:{port} accepts connections but does not speak TLS ({err.reason or err}); "
                          f"{not_tls}") from None
    except OSError:
        return None
    finally:
        sock.close()
    return x509.load_der_x509_certificate(der) if der else None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        # A wildcard stands for exactly one left-most label (RFC 6125).
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host

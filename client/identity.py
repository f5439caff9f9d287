"""The site's node-authentication key pair, for a SuperLink started with `--enable-supernode-auth`.

```
STATE_DIR/
  node-key       ECDSA P-384 private key, OpenSSH private-key format: secret (0600), never leaves the site
  node-key.pub   its OpenSSH public key line (`ecdsa-sha2-nistp384 AAAA...`): public (0644); the
                 coordinator registers it (`flwr supernode register node-key.pub ...`)
```

The formats are the ones Flower reads: `flower-supernode --auth-supernode-private-key node-key`
loads the private key with cryptography's ``load_ssh_private_key`` (no passphrase, it must be an
elliptic-curve key), and ``flwr supernode register`` loads the public key with
``load_ssh_public_key`` and accepts only NIST curves. Flower generates P-384 keys itself, so we do
too. The private key is unencrypted because the site daemon starts unattended; it is protected by
its file mode instead, which is 0600 from the moment the file exists.

Keys an operator brings (`check_node_private_key`, `check_node_public_key`) are checked before any
Flower process sees them: flower-supernode answers a wrong key with "Unable to parse the private key
file." and the daemon would keep restarting it, and ``flwr supernode register`` with a stack of
exit codes. What is accepted is exactly what both Flower commands accept: an OpenSSH-format ECDSA key
on a NIST curve. OpenSSH's format holds only P-256, P-384 and P-521 (``ssh-keygen -t ecdsa`` makes
P-256), so those three; RSA, Ed25519, DSA, other curves (secp256k1, Brainpool: only in PEM files)
and PEM/PKCS#8 files are refused, each by name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from fedtune.common.errors import ConfigError
from fedtune.common.io import read_bytes, write_file_exclusive

logger = logging.getLogger(__name__)

NODE_KEY_FILE = "node-key"
NODE_PUBLIC_KEY_FILE = "node-key.pub"


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where `create_node_key` wrote the site's key pair."""

    private_key: Path
    public_key: Path


def create_node_key(out_dir: Path, *, overwrite: bool = False) -> NodeKeyPaths:
    """Create the site's ECDSA P-384 node-authentication key pair in OpenSSH format.

    Args:
        out_dir: The site's state folder (created with mode 0700 if missing).
        overwrite: Replace an existing pair (a key rotation); otherwise an existing file is an error.

    Returns:
        The paths of ``node-key`` (0600) and ``node-key.pub`` (0644).

    Raises:
        ConfigError: a file exists and ``overwrite`` is False (nothing is written then).
    """
    out_dir = Path(out_dir)
    paths = NodeKeyPaths(private_key=out_dir / NODE_KEY_FILE, public_key=out_dir / NODE_PUBLIC_KEY_FILE)
    if not overwrite:
        existing = [str(p) for p in (paths.private_key, paths.public_key) if p.exists() or p.is_symlink()]
        if existing:
            raise ConfigError(
                [f"{p} already exists; pass overwrite=True (`--overwrite`) to replace it." for p in existing]
            )

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)
    # Private key first: a public key without its private key would register a node that can never connect.
    write_file_exclusive(paths.private_key, private, mode=0o600, overwrite=overwrite)
    write_file_exclusive(paths.public_key, public + b"\n", mode=0o644, overwrite=overwrite)
    logger.info("Wrote node key %s (%s).", paths.public_key, public_key_fingerprint(paths.public_key))
    return paths


def public_key_fingerprint(pub_path: Path) -> str:
    """The OpenSSH SHA-256 fingerprint of a public key file, as ``ssh-keygen -lf`` prints it.

    Args:
        pub_path: An OpenSSH public key file (``TYPE BASE64 [COMMENT]``).

    Returns:
        ``"SHA256:"`` followed by the unpadded base64 of the SHA-256 of the key blob.

    Raises:
        ConfigError: the file is missing or is not an OpenSSH public key.
    """
    pub_path = Path(pub_path)
    text = read_bytes(pub_path)
    fields = text.split()
    expected = "expected one OpenSSH public key line such as 'ecdsa-sha2-nistp384 AAAA...'"
    if len(fields) < 2:
        raise ConfigError(f"{pub_path} is not an OpenSSH public key: {expected}.")
    try:
        serialization.load_ssh_public_key(b" ".join(fields[:2]))
        blob = base64.b64decode(fields[1], validate=True)
    except (ValueError, UnsupportedAlgorithm, binascii.Error) as err:
        raise ConfigError(f"{pub_path} is not an OpenSSH public key ({err}); {expected}.") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


# The curves both Flower commands accept (flwr.supercore.primitives.asymmetric.uses_nist_ec_curve) that
# OpenSSH's key format can hold.
NODE_KEY_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_REQUIRED = ("an OpenSSH-format ECDSA key on a NIST curve (P-256, P-384 or P-521; `fedtune site init` makes P-384)")


def check_node_private_key(path: Path, *, setting: str = "site.node_key") -> ec.EllipticCurvePrivateKey:
    """Check the site's node-authentication private key as flower-supernode will load it.

    Args:
        path: The key file (``node-key``).
        setting: How messages name where the path came from.

    Returns:
        The key.

    Raises:
        ConfigError: naming the file, what it holds (a public key, a certificate, an RSA or Ed25519
            key, a key in PEM format, a key on another curve, a passphrase-protected key, not a key)
            and what is required.
    """
    path = Path(path)
    data = read_bytes(path)
    where = f"{setting} {path}"
    create = "create a pair with `fedtune site init` (or `ssh-keygen -t ecdsa -b 384 -N '' -f node-key`)"
    if _looks_public(data):
        raise ConfigError(f"{where} is a public key ({_describe(data)}); {setting} must name the private key "
                          f"(node-key, the file beside node-key.pub): {_REQUIRED}.")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except TypeError:
            raise ConfigError(f"{where} is protected by a passphrase; the site daemon starts unattended, so it needs an "
                              f"unencrypted key (protected by its file mode 0600): {create}.") from None
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"{where} is an OpenSSH private key that cannot be read ({err}); {create}.") from None
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in NODE_KEY_CURVES:
            return key
        raise ConfigError(_wrong_key(key, where, create))
    raise ConfigError(f"{where} is not an OpenSSH private key: it holds {_describe(data)}; "
                      f"Flower reads only {_REQUIRED}; {create}.")


def check_node_public_key(path: Path, *, setting: str = "public key") -> ec.EllipticCurvePublicKey:
    """Check a site's public key as ``flwr supernode register`` will load it, before it is sent anywhere.

    Args:
        path: The key file (the site's ``node-key.pub``).
        setting: How messages name where the path came from.

    Returns:
        The key.

    Raises:
        ConfigError: naming the file, what it holds (a private key, which must never leave its site;
            a certificate; an RSA or Ed25519 key; a PEM public key; several keys; not a key) and
            what is required.
    """
    path = Path(path)
    data = read_bytes(path)
    where = f"{setting} {path}"
    required = f"one OpenSSH public key line ('ecdsa-sha2-nistp384 AAAA...'): {_REQUIRED}"
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{where} is a PRIVATE key ({_describe(data)}), which must never leave its site; register the "
                          "site's node-key.pub instead, and as this private key has been copied, have the site make a new "
                          "pair (`fedtune site init --overwrite`).")
    lines = [line for line in data.splitlines() if line.strip() and not line.lstrip().startswith(b"#")]
    if len(lines) > 1 and all(line.lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-")) for line in lines):
        raise ConfigError(f"{where} holds {len(lines)} keys; register each site's key on its own: {required}.")
    if not (len(lines) == 1 and lines[0].lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-"))):
        raise ConfigError(f"{where} is not an OpenSSH public key: it holds {_describe(data)}; expected {required}.")
    fields = lines[0].split()
    try:
        key = serialization.load_ssh_public_key(b" ".join(fields[:2]))
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{where} is not an OpenSSH public key ({err}); expected {required}.") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in NODE_KEY_CURVES:
        return key
    raise ConfigError(_wrong_key(key, where, "the site must create an ECDSA pair (`fedtune site init`)"))


def _wrong_key(key: object, where: str, create: str) -> str:
    return f"{where} holds {_key_kind(key)}; node authentication needs {_REQUIRED}; {create}."


def _key_kind(key: object) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"an ECDSA key on curve {key.curve.name}"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "an Ed25519 key"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "an Ed448 key"
    if isinstance(key, (dsa.DSAPrivateKey, dsa.DSAPublicKey)):
        return "a DSA key"
    if isinstance(key, (x25519.X25519PrivateKey, x25519.X25519PublicKey, x448.X448PrivateKey, x448.X448PublicKey)):
        return "a key-agreement (X25519/X448) key, which cannot sign"
    return f"a {type(key).__name__.lstrip('_')}"


def _looks_public(data: bytes) -> bool:
    head = data.lstrip()
    return (head.startswith((b"ssh-", b"ecdsa-sha2-", b"sk-")) or b"-----BEGIN PUBLIC KEY-----" in data
            or b"-----BEGIN SSH2 PUBLIC KEY-----" in data or b"-----BEGIN RSA PUBLIC KEY-----" in data)


def _describe(data: bytes) -> str:
    """What a key file holds, in a few words; never any of its secret material."""
    if not data.strip():
        return "nothing (the file is empty)"
    head = data.lstrip()
    if head.startswith((b"ssh-", b"ecdsa-sha2-", b"sk-")):
        try:
            return f"an OpenSSH public key line: {_key_kind(serialization.load_ssh_public_key(b' '.join(head.split()[:2])))}"
        except (ValueError, UnsupportedAlgorithm, IndexError):
            return f"an OpenSSH public key line of type {head.split()[0].decode('ascii', 'replace')!r}"
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        try:
            return f"an OpenSSH private key: {_key_kind(serialization.load_ssh_private_key(data, password=None))}"
        except (TypeError, ValueError, UnsupportedAlgorithm):
            return "an OpenSSH private key"
    if b"-----BEGIN CERTIFICATE-----" in data:
        return "a certificate, not a key"
    if b"PRIVATE KEY-----" in data:
        try:
            return f"a PEM private key: {_key_kind(serialization.load_pem_private_key(data, password=None))}"
        except TypeError:
            return "a passphrase-protected PEM private key"
        except (ValueError, UnsupportedAlgorithm):
            return "a PEM private key that cannot be read"
    if b"PUBLIC KEY-----" in data:
        try:
            return f"a PEM public key: {_key_kind(serialization.load_pem_public_key(data))}"
        except (ValueError, UnsupportedAlgorithm):
            return "a PEM public key that cannot be read"
    return "no PEM or OpenSSH key (it is not a key file)"

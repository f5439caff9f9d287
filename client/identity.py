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
from cryptography.hazmat.primitives.asymmetric import ec

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

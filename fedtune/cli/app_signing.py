"""`fedtune app hash | keygen | sign`: the digest of the app bundle `fedtune run` ships, and signatures sites can require."""

from __future__ import annotations

from pathlib import Path

import click

from fedtune.common.errors import ConfigError


@click.group()
def app() -> None:
    """The app bundle `fedtune run` ships: its digest, and Ed25519 signatures sites can require."""


def _shipped_digest() -> str:
    """The app digest of the bundle `fedtune run` ships with this fedtune (built by Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    from fedtune.client.app_guard import bundle_digest
    from fedtune.common.config import RunConfig
    from fedtune.server.coordinator import app_dir

    return bundle_digest(build_fab_from_disk(app_dir(RunConfig().to_flat())))


@app.command("hash")
def app_hash() -> None:
    """Print the app digest sites list in site.toml ([apps] trusted_hashes) to accept this fedtune's runs."""
    click.echo(_shipped_digest())


@app.command("keygen")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for app-signing.key and app-signing.pub.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair.")
def app_keygen(out: Path, overwrite: bool) -> None:
    """Create an Ed25519 key pair for signing app bundles (keep the private key offline)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    from fedtune.client.app_guard import key_fingerprint
    from fedtune.common.io import write_file_exclusive

    key = Ed25519PrivateKey.generate()
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / "app-signing.key", out / "app-signing.pub"
    write_file_exclusive(private, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600, overwrite=overwrite)
    write_file_exclusive(public, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) + b" fedtune-app-signing\n",
                         mode=0o644, overwrite=overwrite)
    click.echo(f"signing key (secret, keep offline): {private}")
    click.echo(f"public key for sites' [apps] trusted_signers: {public}  ({key_fingerprint(key.public_key())})")


@app.command("sign")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM from `fedtune app keygen`, or an unencrypted OpenSSH key).")
@click.option("--digest", default=None, help="The app digest to sign (from `fedtune app hash` on the run machine) [this fedtune's].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Signature file [$FEDTUNE_HOME/fedtune-signatures.json, which `fedtune run` ships].")
def app_sign(key_path: Path, digest: str | None, out: Path | None) -> None:
    """Sign the app digest; `fedtune run` ships the signatures, sites listing the key accept the bundle.

    Signatures of other digests (an older fedtune's bundle) are dropped from the file; one by the
    same key is replaced.
    """
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    from fedtune.client.app_guard import SIGNATURE_FILE, key_fingerprint, sign_digest
    from fedtune.server.coordinator import fedtune_home

    data = key_path.read_bytes() if key_path.is_file() else b""
    try:
        key = load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data else load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--key {key_path}: not an unencrypted PEM or OpenSSH private key ({err}).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"--key {key_path} holds a {type(key).__name__.lstrip('_')}; app signing keys are Ed25519 (`fedtune app keygen`).")
    digest = (digest or _shipped_digest()).strip().lower()
    try:
        entry = sign_digest(digest, key)
    except ValueError as err:
        raise ConfigError(f"--digest: {err}") from None
    out = out or fedtune_home() / SIGNATURE_FILE
    entries = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
    entries = [e for e in entries if e.get("digest") == digest and e.get("public_key") != entry["public_key"]] + [entry]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    click.echo(f"signed app digest {digest} with {key_fingerprint(key.public_key())}: {out} ({len(entries)} signature(s))")

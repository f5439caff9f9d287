"""The site's node key: written in the formats Flower's own loaders accept, with the right modes."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.client.identity import NodeKeyPaths, create_node_key, public_key_fingerprint
from fedtune.common.errors import ConfigError

# Flower's own loaders: the one `flower-supernode --auth-supernode-private-key` runs, and the one
# `flwr supernode register KEY.pub` runs. (Their refusal path is not called here: Flower's exit
# starts a thread that force-ends the whole test process.)
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
    sign_message,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="OpenSSH's ssh-keygen is not installed")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """With no umask, a file created with the default 0666 would be world-readable: modes must be explicit."""
    saved = os.umask(0)
    yield
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _flower_load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    args = argparse.Namespace(auth_supernode_private_key=str(path), auth_supernode_public_key=None)
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    return loaded[0]


def test_flower_loads_the_private_key_as_p384(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)

    private = _flower_load_private(paths.private_key)

    assert isinstance(private.curve, ec.SECP384R1)
    assert paths.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")


def test_flower_registers_the_public_key_and_it_is_the_private_keys(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)

    registered = try_load_public_key(paths.public_key)
    private = _flower_load_private(paths.private_key)

    assert registered == public_key_to_bytes(private.public_key())
    assert paths.public_key.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    assert paths.public_key.read_text().count("\n") == 1


def test_a_timestamp_signed_as_the_supernode_does_verifies_against_the_registered_key(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)
    other = create_node_key(tmp_path / "other")
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat().encode("ascii")

    signature = sign_message(_flower_load_private(paths.private_key), timestamp)

    assert verify_signature(bytes_to_public_key(try_load_public_key(paths.public_key)), timestamp, signature)
    assert not verify_signature(bytes_to_public_key(try_load_public_key(other.public_key)), timestamp, signature)


def test_private_key_is_0600_and_public_key_0644_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    paths = create_node_key(tmp_path / "state")

    assert _mode(paths.private_key) == 0o600
    assert _mode(paths.public_key) == 0o644
    assert _mode(tmp_path / "state") == 0o700
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["node-key", "node-key.pub"]


def test_refuses_to_overwrite_and_names_the_file(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)
    before = (paths.private_key.read_bytes(), paths.public_key.read_bytes())

    with pytest.raises(ConfigError, match="node-key already exists"):
        create_node_key(tmp_path)

    assert (paths.private_key.read_bytes(), paths.public_key.read_bytes()) == before


def test_refuses_when_only_the_public_key_exists_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "node-key.pub").write_text("ecdsa-sha2-nistp384 AAAA-old\n")

    with pytest.raises(ConfigError, match="node-key.pub already exists"):
        create_node_key(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-key.pub"]


def test_overwrite_rotates_the_key_and_restores_the_mode(tmp_path: Path) -> None:
    first = create_node_key(tmp_path)
    old_fingerprint = public_key_fingerprint(first.public_key)
    first.private_key.chmod(0o644)  # loosened by hand since

    second = create_node_key(tmp_path, overwrite=True)

    assert public_key_fingerprint(second.public_key) != old_fingerprint
    assert _mode(second.private_key) == 0o600
    assert try_load_public_key(second.public_key) == public_key_to_bytes(
        _flower_load_private(second.private_key).public_key()
    )


@needs_ssh_keygen
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)

    ours = public_key_fingerprint(paths.public_key)
    theirs = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(paths.public_key)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()

    assert theirs[0] == "384"
    assert theirs[1] == ours
    assert theirs[-1] == "(ECDSA)"


@needs_ssh_keygen
def test_openssh_derives_the_same_public_key_from_the_private_key(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)

    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(paths.private_key)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()

    assert derived[:2] == paths.public_key.read_text().split()[:2]


def test_fingerprint_of_a_file_that_is_not_a_public_key_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "site-a.pub"
    bad.write_text("hello\n")

    with pytest.raises(ConfigError, match="site-a.pub is not an OpenSSH public key"):
        public_key_fingerprint(bad)


def test_node_key_paths_is_frozen(tmp_path: Path) -> None:
    paths = create_node_key(tmp_path)

    with pytest.raises(AttributeError):
        paths.private_key = tmp_path  # type: ignore[misc]
    assert isinstance(paths, NodeKeyPaths)

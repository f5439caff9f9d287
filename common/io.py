"""Atomic, durable file writes: a crash or power loss never leaves a half-written checkpoint or ledger.

Durability takes two fsyncs: the file's (its bytes are on disk) and, after ``os.replace`` or a new
link, its folder's (the name now points at them). Without the second, a power loss after the
replace can bring back the *old* file, e.g. a privacy ledger without the charge of a round that
then trained (ext4 and XFS make no promise about a rename's durability without it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename, link or new file in it) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(folder, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, folder: Path) -> None:
    """Make the finished folder ``tmp`` (its files already fsynced) appear as ``folder``.

    An existing ``folder`` moves aside to ``.NAME.old`` first and is deleted only once the new one is
    in place: a crash between the two renames leaves no ``folder`` but loses neither copy (the old
    one is at ``.NAME.old``, the new one at ``tmp``). The parent is fsynced so the renames survive power loss.
    """
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    fsync_dir(folder.parent)


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new folders survive a power loss (each new one's parent is fsynced)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


# A checkpoint of a MiniLM LoRA adapter is about 0.3 MB: a directory that cannot take 1 MiB cannot
# take the first round's checkpoint either.
PROBE_BYTES = 1 << 20


def check_writable(folder: Path, *, what: str, probe_bytes: int = PROBE_BYTES) -> None:
    """Create ``folder`` if needed and prove it takes ``probe_bytes`` durably: write, fsync, remove.

    A bare ``os.access`` says nothing about a full disk or a read-only mount, and a mode check is
    wrong for root; writing and fsyncing a probe file is what a checkpoint will do. ``what`` names
    the setting in the error ("run directory (--out)").

    Raises:
        ConfigError: naming ``what``, the path, and the operating system's reason.
    """
    folder = Path(folder)
    probe = folder / f".fedtune-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        make_dirs(folder)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view, written = memoryview(b"\0" * probe_bytes), 0
            while written < probe_bytes:
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
    except OSError as err:
        raise ConfigError(
            f"{what} {folder} is not writable: writing and fsyncing a {probe_bytes // 1024} KiB probe file failed "
            f"({err.strerror or err}); choose a folder on a disk with free space that this user may write."
        ) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file is fsynced before the replace and its folder after it, so once this returns the new
    content survives a power loss, and at any moment before, the old content (never a mix) does.
    """
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex, read in 1 MiB blocks (a model's weights never enter memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(path: Path) -> bytes:
    """The file's bytes; a ConfigError names the file when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist.") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read: {err.strerror}.") from None


def parse_host_port(value: str, *, where: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (an IPv6 host in brackets); ConfigError names ``where`` and the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be HOST:PORT, got {value!r}.")
    return host.strip("[]"), int(port)


def read_toml(path: Path, *, what: str, missing_hint: str = "") -> dict[str, Any]:
    """Parse a TOML file; a ConfigError names ``what`` and the file when it is missing or malformed."""
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist{'; ' + missing_hint if missing_hint else ''}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}.") from None


def read_json_object(path: Path, where: str) -> dict[str, Any]:
    """A JSON file that must hold an object; ConfigError naming ``where`` and the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {path.name} is unreadable or not JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path.name} holds a JSON {type(data).__name__}, not an object.")
    return data


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and flush it to disk (a line is either whole or absent)."""
    make_dirs(path.parent)
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if created:  # the new file's name must reach the disk too
        fsync_dir(path.parent)


def write_file_exclusive(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` whole to ``path`` with ``mode``; never readable by others, even briefly.

    The bytes go to a fresh temporary file created 0600 (O_EXCL, so no one can have planted it),
    get their final mode, and then appear at ``path`` in one step: ``os.replace`` when overwriting,
    otherwise ``os.link``, which refuses an existing ``path`` atomically.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view, written = memoryview(data), 0
            while written < len(data):  # os.write may write less than asked
                written += os.write(fd, view[written:])
            os.fchmod(fd, mode)  # the umask never loosens or tightens what we meant
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(f"{path} already exists; pass overwrite=True (`--overwrite`) to replace it.") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)

"""Atomic file writes: a crash or restart never leaves a half-written checkpoint or ledger."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and flush it to disk (a line is either whole or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


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

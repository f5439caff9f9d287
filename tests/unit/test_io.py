"""Durable writes: the file is whole, fsynced, and its folder is fsynced after the rename or link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedtune.common import io
from fedtune.common.errors import ConfigError


class _Journal:
    """Records each real fsync (what the descriptor pointed at) and each rename/link, in order, then does them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int, bool]] = []  # (call, inode, is a folder)
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
            real_fsync(fd)

        def replace(src: str | Path, dst: str | Path) -> None:
            self.events.append(("replace", os.stat(src).st_ino, False))
            real_replace(src, dst)

        def link(src: str | Path, dst: str | Path) -> None:
            self.events.append(("link", os.stat(src).st_ino, False))
            real_link(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)


def _assert_durable(events: list[tuple[str, int, bool]], path: Path, move: str) -> None:
    file_ino, dir_ino = path.stat().st_ino, path.parent.stat().st_ino
    file_sync = events.index(("fsync", file_ino, False))
    moved = events.index((move, file_ino, False))
    dir_sync = max(i for i, e in enumerate(events) if e == ("fsync", dir_ino, True))
    assert file_sync < moved < dir_sync, events


def test_atomic_write_fsyncs_the_file_then_the_folder_after_the_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_bytes(b"old")
    journal = _Journal(monkeypatch)
    data = os.urandom(1 << 20)

    # Execute
    io.atomic_write_bytes(path, data)

    # Assert: whole, no temporary left, and file fsync < replace < folder fsync.
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
    _assert_durable(journal.events, path, "replace")


def test_new_folders_are_made_durable_up_to_an_existing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _Journal(monkeypatch)

    io.atomic_write_json(tmp_path / "a" / "b" / "x.json", {"k": 1})

    synced_dirs = {ino for call, ino, is_dir in journal.events if call == "fsync" and is_dir}
    # Each new folder's entry lives in its parent: tmp_path (for a), a (for b), b (for x.json).
    assert {tmp_path.stat().st_ino, (tmp_path / "a").stat().st_ino, (tmp_path / "a" / "b").stat().st_ino} <= synced_dirs
    assert (tmp_path / "a" / "b" / "x.json").read_text() == '{\n  "k": 1\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_exclusive_write_fsyncs_the_folder_after_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _Journal(monkeypatch)
    path = tmp_path / "node-key"

    io.write_file_exclusive(path, b"secret", mode=0o600, overwrite=False)

    assert path.read_bytes() == b"secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    _assert_durable(journal.events, path, "link")
    with pytest.raises(ConfigError, match="already exists"):
        io.write_file_exclusive(path, b"other", mode=0o600, overwrite=False)


def test_append_jsonl_fsyncs_the_folder_when_it_creates_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _Journal(monkeypatch)
    path = tmp_path / "metrics.jsonl"

    io.append_jsonl(path, {"round": 1})
    first = list(journal.events)
    io.append_jsonl(path, {"round": 2})

    dir_ino = tmp_path.stat().st_ino
    assert ("fsync", path.stat().st_ino, False) in first and ("fsync", dir_ino, True) in first
    assert ("fsync", dir_ino, True) not in journal.events[len(first):]  # an append renames nothing
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'

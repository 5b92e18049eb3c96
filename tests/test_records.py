"""The one atomic-write helper: whole files or nothing, links, modes and special files."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from zero_one_instruction.errors import EnvironmentFailure, ZoiError
from zero_one_instruction.records import atomic_file


def test_a_users_output_link_is_written_through_and_keeps_the_mode(tmp_path: Path) -> None:
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o600)
    link.symlink_to(target.name)
    with atomic_file(link, follow_links=True) as handle:
        handle.write("new\n")
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "target.jsonl"]


def test_a_link_planted_among_the_runs_files_is_replaced_not_followed(tmp_path: Path) -> None:
    outside, shard = tmp_path / "outside.txt", tmp_path / "shard.jsonl"
    outside.write_text("keep\n", encoding="utf-8")
    shard.symlink_to(outside)
    with atomic_file(shard) as handle:
        handle.write("record\n")
    assert not shard.is_symlink() and shard.read_text(encoding="utf-8") == "record\n"
    assert outside.read_text(encoding="utf-8") == "keep\n"


def test_a_special_file_is_never_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for follow in (False, True):
        refused = pytest.raises(ZoiError, match="not a regular file")
        with refused, atomic_file(fifo, follow_links=follow):
            pass
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert list(tmp_path.iterdir()) == [fifo]


def _failing(error: int) -> object:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error))

    return fail


def test_a_full_disk_is_an_environment_failure_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC is the machine's fault, not the user's: exit 1, not the user-error code 2; the
    old file stays whole and no temporary file is left."""
    output = tmp_path / "out.jsonl"
    output.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(os, "fsync", _failing(errno.ENOSPC))
    with pytest.raises(EnvironmentFailure) as raised, atomic_file(output) as handle:
        handle.write("new\n")
    assert raised.value.exit_code == 1 and "No space left" in str(raised.value)
    assert output.read_text(encoding="utf-8") == "old\n" and len(list(tmp_path.iterdir())) == 1


def test_a_cleanup_that_fails_does_not_hide_the_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a read-only file system the temporary file cannot be removed either; the user must
    still get the one line about the write, not the cleanup's raw OSError."""
    monkeypatch.setattr(os, "replace", _failing(errno.EROFS))
    monkeypatch.setattr(Path, "unlink", _failing(errno.EROFS))
    with pytest.raises(ZoiError) as raised, atomic_file(tmp_path / "out.jsonl") as handle:
        handle.write("new\n")
    assert raised.value.exit_code == 2 and "Read-only file system" in str(raised.value)

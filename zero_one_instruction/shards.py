"""Per-chunk shards and their done markers: the filesystem is the source of truth.

A finished chunk is three files plus a marker:

- `<chunk>.jsonl`: the kept records in the output schema, without their `id`. The merger
  splices the id in front of each line, so merging never re-encodes JSON.
- `<chunk>.meta.jsonl`: one line per kept record with its source index and evolution trace.
- `<chunk>.rejects.jsonl`: every dropped prompt with its reason and trace.
- `<chunk>.done`: written last and atomically. It holds each file's size, line count and
  sha256, the funnel, tokens and timings.

A shard without a valid marker does not exist, whatever else is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pipeline import Outcome, Tally
from .records import atomic_file, dumps, original_record
from .rundir import Chunk

MARKER_FORMAT = 1
KINDS = ("records", "meta", "rejects")
_SUFFIX = {"records": ".jsonl", "meta": ".meta.jsonl", "rejects": ".rejects.jsonl"}
_BLOCK = 1 << 20


def path_of(directory: Path, chunk: Chunk, kind: str) -> Path:
    return directory / f"{chunk.id}{_SUFFIX[kind]}"


def marker_path(directory: Path, chunk: Chunk) -> Path:
    return directory / f"{chunk.id}.done"


def record_line(outcome: Outcome, system: str) -> str:
    """A kept record as a shard line: the output record without its id."""
    record = original_record("", outcome.question or "", outcome.answer or "", system)
    del record["id"]
    return dumps(record)


def meta_line(outcome: Outcome) -> str:
    data = outcome.to_dict()
    del data["question"], data["answer"], data["base_prompt"], data["drop_reason"]
    return dumps(data)


def _write_lines(path: Path, lines: Iterable[str]) -> dict[str, Any]:
    """Write, fsync and rename into place; return what the marker records about the file."""
    digest, size, count = hashlib.sha256(), 0, 0
    with atomic_file(path, binary=True) as handle:
        for line in lines:
            data = line.encode("utf-8")
            handle.write(data)
            digest.update(data)
            size += len(data)
            count += 1
    return {"name": path.name, "bytes": size, "lines": count, "sha256": digest.hexdigest()}


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_chunk(
    directory: Path,
    chunk: Chunk,
    outcomes: list[Outcome],
    system: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Commit a finished chunk: the three files, then the marker. `info` (worker, model,
    timings) goes into the marker as is. Returns the marker."""
    directory.mkdir(parents=True, exist_ok=True)
    kept = [o for o in outcomes if o.kept]
    tally = Tally()
    for outcome in outcomes:
        tally.add(outcome)
    dropped = [o for o in outcomes if not o.kept]
    files = {
        "records": _write_lines(
            path_of(directory, chunk, "records"), (record_line(o, system) for o in kept)
        ),
        "meta": _write_lines(path_of(directory, chunk, "meta"), (meta_line(o) for o in kept)),
        "rejects": _write_lines(
            path_of(directory, chunk, "rejects"), (dumps(o.to_dict()) for o in dropped)
        ),
    }
    _fsync_dir(directory)
    marker = {
        "format": MARKER_FORMAT,
        "chunk": chunk.id,
        "start": chunk.start,
        "end": chunk.end,
        "files": files,
        "funnel": tally.as_dict(),
        **info,
    }
    with atomic_file(marker_path(directory, chunk)) as handle:
        handle.write(json.dumps(marker, ensure_ascii=False, indent=1) + "\n")
    _fsync_dir(directory)
    return marker


@dataclass(frozen=True)
class Check:
    """What a marker says about its chunk: `problem` is None when the shard is valid."""

    chunk: Chunk
    marker: dict[str, Any] | None
    problem: str | None

    @property
    def done(self) -> bool:
        return self.marker is not None and self.problem is None


def read_marker(directory: Path, chunk: Chunk) -> tuple[dict[str, Any] | None, str | None]:
    """The marker and, if it is unusable, why. No marker is not a problem: the chunk is just
    not done."""
    path = marker_path(directory, chunk)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"unreadable marker ({exc})"
    valid = (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and (marker.get("start"), marker.get("end")) == (chunk.start, chunk.end)
        and isinstance(marker.get("files"), dict)
        and all(_file_entry(marker["files"].get(kind)) for kind in KINDS)
        and isinstance(marker.get("funnel"), dict)
    )
    return (marker, None) if valid else (None, "marker does not describe this chunk")


def _file_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and {"name", "bytes", "lines", "sha256"} <= entry.keys()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check(directory: Path, chunk: Chunk, deep: bool = True) -> Check:
    """Is this chunk done? `deep` also compares every file's sha256 with the marker."""
    marker, problem = read_marker(directory, chunk)
    if marker is None:
        return Check(chunk, None, problem)
    for kind in KINDS:
        expected = marker["files"][kind]
        path = path_of(directory, chunk, kind)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return Check(chunk, marker, f"{path.name} is missing")
        if size != expected.get("bytes"):
            return Check(
                chunk,
                marker,
                f"{path.name} has {size} bytes, marker says "
                f"{expected.get('bytes')} (truncated or modified)",
            )
        if deep and sha256_of(path) != expected.get("sha256"):
            return Check(chunk, marker, f"{path.name} does not match its checksum")
    return Check(chunk, marker, None)


def set_aside(directory: Path, chunk: Chunk) -> None:
    """Move a bad shard's files out of the way (never delete data), so the chunk can be redone:
    the chunk job trusts a marker it finds. Each setting-aside gets its own suffix."""
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    for path in [marker_path(directory, chunk), *(path_of(directory, chunk, k) for k in KINDS)]:
        if path.exists():
            os.replace(path, path.with_name(f"{path.name}.bad-{stamp}"))


def _signature(directory: Path, chunk: Chunk) -> list[list[int]] | None:
    """What identifies the files as they were hashed: size, mtime and inode of each."""
    paths = [marker_path(directory, chunk), *(path_of(directory, chunk, k) for k in KINDS)]
    try:
        stats = [p.stat() for p in paths]
    except FileNotFoundError:
        return None
    return [[s.st_size, s.st_mtime_ns, s.st_ino] for s in stats]


class Verified:
    """Chunks whose files were hashed and matched their marker, keyed by the files' size,
    mtime and inode. `status` and `enqueue` verify every shard, and this lets them hash only
    what is new or changed: a damaged shard changes its signature and is hashed again.
    It is a hint only; a lost or stale entry just costs a re-hash."""

    FILE = ".verified.json"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self._known = json.loads((directory / self.FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._known = {}
        self._changed = False

    def check(self, chunk: Chunk) -> Check:
        signature = _signature(self.directory, chunk)
        if signature is not None and self._known.get(chunk.id) == signature:
            return check(self.directory, chunk, deep=False)
        result = check(self.directory, chunk, deep=True)
        if result.done and signature is not None and _signature(self.directory, chunk) == signature:
            self._known[chunk.id] = signature
            self._changed = True
        return result

    def save(self) -> None:
        if self._changed and self.directory.is_dir():
            with atomic_file(self.directory / self.FILE) as handle:
                json.dump(self._known, handle)

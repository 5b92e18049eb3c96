"""Per-chunk shards and their done markers: the filesystem is the source of truth.

A finished chunk is three files plus a marker:

- `<chunk>.jsonl`: the kept records in the output schema, without their `id`
  (`encoder.record_line`). The merger's encoder splices the id in front of each line, so the
  default merge never re-encodes JSON.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .encoder import meta_line, record_line
from .pipeline import (
    FUNNEL_COUNTS,
    OPERATOR_COUNTS,
    OPTIONAL_COUNTS,
    TURN_COUNTS,
    Outcome,
    Tally,
)
from .records import atomic_file, dumps
from .rundir import Chunk, Run

MARKER_FORMAT = 1
KINDS = ("records", "meta", "rejects")
_SUFFIX = {"records": ".jsonl", "meta": ".meta.jsonl", "rejects": ".rejects.jsonl"}
_MARKER = ".done"
_BLOCK = 1 << 20


def path_of(directory: Path, chunk: Chunk, kind: str) -> Path:
    return directory / f"{chunk.id}{_SUFFIX[kind]}"


def marker_path(directory: Path, chunk: Chunk) -> Path:
    return directory / f"{chunk.id}{_MARKER}"


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
    run: Run,
    chunk: Chunk,
    outcomes: list[Outcome],
    system: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Commit a finished chunk: the three files, then the marker. `info` (worker, model,
    timings) goes into the marker as is; the run's fingerprint always does, so that the
    shard can never be taken for one of another configuration. Returns the marker."""
    directory = run.shards
    directory.mkdir(exist_ok=True)  # never parents: a run directory deleted mid-run stays gone
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
        "run": run.fingerprint,
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


def read_marker(run: Run, chunk: Chunk) -> tuple[dict[str, Any] | None, str | None]:
    """The marker and, if it is unusable, why. No marker is not a problem: the chunk is just
    not done. This is the one reader of markers: everything that counts or trusts a marker
    (the producer, status, merge, the launcher's progress, the worker) goes through it, so
    a marker of another run or with a damaged funnel is never counted anywhere."""
    path = marker_path(run.shards, chunk)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"unreadable marker ({exc})"
    problem = _marker_problem(marker, chunk, run.fingerprint)
    return (marker, None) if problem is None else (None, problem)


def funnel_of(marker: dict[str, Any]) -> Tally:
    """The funnel of a marker that `read_marker` accepted."""
    return Tally.from_dict(marker["funnel"])


def present_markers(run: Run) -> dict[str, int]:
    """The chunk ids that have a marker file, each with the marker's inode (a marker replaced
    by another has a new one), in one directory scan however many chunks there are. Presence
    only: what a marker says is trusted only through `read_marker`."""
    present: dict[str, int] = {}
    with os.scandir(run.shards) as entries:
        for entry in entries:
            if entry.name.endswith(_MARKER):
                present[entry.name.removesuffix(_MARKER)] = entry.inode()
    return present


def _marker_problem(marker: Any, chunk: Chunk, fingerprint: str) -> str | None:
    """Why a parsed marker cannot be trusted for this chunk of this run, or None."""
    if not (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and (marker.get("start"), marker.get("end")) == (chunk.start, chunk.end)
        and isinstance(marker.get("files"), dict)
        and all(_file_entry(marker["files"].get(kind)) for kind in KINDS)
    ):
        return "marker does not describe this chunk"
    if marker.get("run") != fingerprint:
        # run.json was deleted and remade for other settings: these records were made with
        # another configuration and must not be mixed into this run's output.
        return f"shard of another run ({str(marker.get('run'))[:16]}), not of this one"
    if not _funnel_fits(marker.get("funnel"), len(chunk), marker["files"]["records"]["lines"]):
        return "marker has a damaged funnel"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and _count(entry.get("bytes"))
        and _count(entry.get("lines"))
        and isinstance(entry.get("sha256"), str)
    )


def _funnel_fits(funnel: Any, prompts: int, records: int) -> bool:
    """A funnel that adds up to its chunk: one outcome per prompt of the chunk, each kept
    (one record line) or dropped with a reason."""
    return readable_funnel(funnel) and funnel["prompts"] == prompts and funnel["kept"] == records


def readable_funnel(funnel: Any) -> bool:
    """A funnel that every reader can sum without a KeyError (`Tally.from_dict`), and whose
    outcomes add up: each kept or dropped with a reason. Whatever holds a funnel, a marker
    or a worker's live counters, is data that anyone could have written."""
    if not isinstance(funnel, dict) or not all(_count(funnel.get(k)) for k in FUNNEL_COUNTS):
        return False
    if not all(_count(funnel[k]) for k in OPTIONAL_COUNTS if k in funnel):
        return False
    dropped = funnel.get("dropped")
    if not _counts(dropped):
        return False
    if not all(_counts(funnel[name]) for name in OPERATOR_COUNTS if name in funnel):
        return False  # the depth steps by operator, in funnels of runs that draw them
    if not _turns_fit(funnel):
        return False
    return bool(funnel["kept"] + sum(dropped.values()) == funnel["prompts"])


def _turns_fit(funnel: dict[str, Any]) -> bool:
    """The conversations of a multi-turn run's funnel, where it has them: kept records by
    their number of turns (a number from 1 up), as many as it kept, and the conversations
    that ended early, no more than those records of fewer turns than the most."""
    if not any(name in funnel for name in TURN_COUNTS):
        return True
    if not all(_counts(funnel.get(name)) for name in TURN_COUNTS):
        return False
    records, ended = funnel["turns"], funnel["turns_ended"]
    if not all(n.isascii() and n.isdigit() and not n.startswith("0") for n in records):
        return False
    return sum(records.values()) == funnel["kept"] and sum(ended.values()) <= funnel["kept"]


def _counts(value: Any) -> bool:
    """A mapping of names to counts (drop reasons, operators)."""
    return isinstance(value, dict) and all(
        isinstance(name, str) and _count(n) for name, n in value.items()
    )


def read_lines(path: Path, digest: Any = None) -> Iterator[bytes]:
    """A shard file's lines, one at a time, so a reader of any run holds one line; each is
    fed to `digest` (a hashlib object) if given, so the copy that reads a shard also checks
    it against its marker."""
    with path.open("rb") as handle:
        for line in handle:
            if digest is not None:
                digest.update(line)
            yield line


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check(run: Run, chunk: Chunk, deep: bool = True) -> Check:
    """Is this chunk of this run done? `deep` also compares every file's sha256 with the
    marker."""
    directory = run.shards
    marker, problem = read_marker(run, chunk)
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

    def __init__(self, run: Run) -> None:
        self.run = run
        self.directory = run.shards
        try:
            self._known = json.loads((self.directory / self.FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._known = {}
        self._changed = False

    def check(self, chunk: Chunk) -> Check:
        signature = _signature(self.directory, chunk)
        if signature is not None and self._known.get(chunk.id) == signature:
            return check(self.run, chunk, deep=False)
        result = check(self.run, chunk, deep=True)
        if result.done and signature is not None and _signature(self.directory, chunk) == signature:
            self._known[chunk.id] = signature
            self._changed = True
        return result

    def save(self) -> None:
        if self._changed and self.directory.is_dir():
            with atomic_file(self.directory / self.FILE) as handle:
                json.dump(self._known, handle)

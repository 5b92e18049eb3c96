"""The merger: one output file from the verified shards, the same whoever did what.

Chunks are merged in index order, and ids are assigned here, so the output depends only on the
shards' content, never on which worker ran which chunk or how often something crashed. Each
shard is streamed once. Its checksum is computed while its records are written, and a shard
that does not match its marker is cut back out of the output. The output is written to a
temporary file and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import IO, Any

from . import shards
from .encoder import EncodeOptions, Encoder, duplicates_path
from .errors import ZoiError
from .outputs import check_output, remember_output
from .records import atomic_file
from .rundir import Chunk, Run, open_run


@dataclass(frozen=True)
class MergeOptions(EncodeOptions):
    """How a merge writes the output (the `EncodeOptions`), and whether an unfinished run is
    merged (`allow_partial`) or refused."""

    allow_partial: bool = False


class MergeIncomplete(ZoiError):
    """Chunks are missing or invalid and `--allow-partial` was not given."""

    exit_code = 1


@dataclass
class MergeReport:
    """What a merge did. The chunks left out are kept once, as absent (never done) or damaged
    (with why); the missing ranges and the warnings are views of them."""

    chunks: int = 0
    merged: int = 0
    records: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    sidecar: Path | None = None
    absent: list[Chunk] = field(default_factory=list)
    damaged: list[tuple[Chunk, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def missing(self) -> list[tuple[int, int]]:
        """The base-prompt ranges the output lacks."""
        return index_ranges(self.absent + [chunk for chunk, _ in self.damaged])

    @property
    def problems(self) -> list[str]:
        return [f"chunk {chunk.id}: {problem}" for chunk, problem in self.damaged]


def index_ranges(chunks: list[Chunk]) -> list[tuple[int, int]]:
    """Adjacent chunks joined: [(0, 100), (100, 200)] -> [(0, 200)]."""
    ranges: list[tuple[int, int]] = []
    for chunk in sorted(chunks):
        if ranges and ranges[-1][1] == chunk.start:
            ranges[-1] = (ranges[-1][0], chunk.end)
        else:
            ranges.append((chunk.start, chunk.end))
    return ranges


def describe_ranges(ranges: list[tuple[int, int]], limit: int = 8) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def _copy_chunk(
    run: Run, chunk: Chunk, marker: dict[str, Any], encoder: Encoder, out: IO[bytes]
) -> str | None:
    """Append one chunk's records; return a problem if its files do not match the marker."""
    files = marker["files"]
    if encoder.fast:
        return _splice_chunk(run, chunk, files["records"], encoder, out)
    with_meta = encoder.options.with_meta
    record_digest, meta_digest = hashlib.sha256(), hashlib.sha256()
    records = shards.read_lines(shards.path_of(run.shards, chunk, "records"), record_digest)
    metas: Iterator[bytes | None] = (
        shards.read_lines(shards.path_of(run.shards, chunk, "meta"), meta_digest)
        if with_meta
        else repeat(None)
    )
    count = 0
    for raw, meta in zip(records, metas, strict=False):  # a length mismatch fails the check
        count += 1
        try:
            line = encoder.line(raw, meta)
        except ValueError:  # damage that is no longer a record (`encoder.parse_record`)
            return f"{files['records']['name']} does not match its marker"
        if line is not None:
            out.write(line)
    if (
        record_digest.hexdigest() != files["records"]["sha256"]
        or count != files["records"]["lines"]
    ):
        return f"{files['records']['name']} does not match its marker"
    if with_meta and meta_digest.hexdigest() != files["meta"]["sha256"]:
        return f"{files['meta']['name']} does not match its marker"
    return None


def _splice_chunk(
    run: Run, chunk: Chunk, expected: dict[str, Any], encoder: Encoder, out: IO[bytes]
) -> str | None:
    """The default output: the shard (one chunk, bounded in size) is read whole, verified,
    then spliced (`Encoder.splice`), so a bad shard is refused before a byte of it is
    written."""
    data = shards.path_of(run.shards, chunk, "records").read_bytes()
    if (
        hashlib.sha256(data).hexdigest() != expected["sha256"]
        or data.count(b"\n") != expected["lines"]
        or (data and not data.endswith(b"\n"))
    ):
        return f"{expected['name']} does not match its marker"
    encoder.splice(data, out.write)
    return None


def _plan(run: Run, report: MergeReport) -> list[tuple[Chunk, dict[str, Any]]]:
    """The chunks whose marker and file sizes look right; the others are recorded in the
    report as absent (no marker) or damaged (a marker whose shard fails verification)."""
    ready = []
    for chunk in run.chunks():
        result = shards.check(run, chunk, deep=False)
        if result.done and result.marker is not None:
            ready.append((chunk, result.marker))
        elif result.problem:
            report.damaged.append((chunk, result.problem))
        else:
            report.absent.append(chunk)
    return ready


def _deep_problems(run: Run, ready: list[tuple[Chunk, dict[str, Any]]]) -> list[tuple[Chunk, str]]:
    """Checksum failures among the chunks that looked right, so a refusal names every damaged
    chunk at once rather than one per attempt."""
    found = []
    for chunk, _ in ready:
        result = shards.check(run, chunk, deep=True)
        if result.problem:
            found.append((chunk, result.problem))
    return found


def _refusal(run: Run, report: MergeReport, limit: int = 8) -> MergeIncomplete:
    """One line naming both kinds of hole: chunks never done, and chunks whose shard is
    damaged (which `zoi enqueue` sets aside and queues again)."""
    parts = []
    if report.absent:
        shown = describe_ranges(index_ranges(report.absent), limit)
        parts.append(f"missing base-prompt ranges {shown}")
    if report.damaged:
        first = sorted(report.damaged)[:limit]
        shown = ", ".join(f"[{c.start}, {c.end}) ({problem})" for c, problem in first)
        more = len(report.damaged) - limit
        parts.append(f"damaged shards {shown}" + (f" and {more} more" if more > 0 else ""))
    return MergeIncomplete(
        f"{run.path}: run is not complete; {'; '.join(parts)} (run 'zoi enqueue' to redo them, "
        "or --allow-partial to merge what is there)"
    )


def merge_run(
    run_dir: Path,
    output: Path,
    options: MergeOptions = MergeOptions(),
    *,
    overwrite: bool = False,
) -> MergeReport:
    """`zoi merge`: the output of the run in `run_dir`, checked first (never an input, never
    inside a run, an existing file only with `overwrite` or if this run wrote it) and then
    remembered, so that merging again may replace it."""
    run = open_run(run_dir)
    outputs = [output, duplicates_path(output)] if options.dedup == "near" else [output]
    for path in outputs:
        check_output(path, run.config, run=run.path, overwrite=overwrite)
    report = merge(run, output, options)
    for path in outputs:
        remember_output(run.path, path)
    return report


def merge(run: Run, output: Path, options: MergeOptions = MergeOptions()) -> MergeReport:
    """Write the run's verified shards to `output` in base-prompt order. A chunk that is
    missing, or whose shard no longer matches its marker, refuses the merge (MergeIncomplete)
    unless `options.allow_partial`; then it is left out and named in the report. A near
    dedup writes what it dropped to the sidecar `duplicates_path(output)`."""
    began = time.monotonic()
    report = MergeReport(chunks=len(run.chunks()))
    ready = _plan(run, report)
    if report.missing and not options.allow_partial:
        report.damaged += _deep_problems(run, ready)
        raise _refusal(run, report)
    encoder = Encoder(options)
    with ExitStack() as stack:
        out = stack.enter_context(atomic_file(output, binary=True, follow_links=True))
        files = [out]
        if options.dedup == "near":
            report.sidecar = duplicates_path(output)
            files.append(
                stack.enter_context(atomic_file(report.sidecar, binary=True, follow_links=True))
            )
            encoder.removed = files[-1].write
        for chunk, marker in ready:
            offsets = [f.tell() for f in files]
            problem = _copy_chunk(run, chunk, marker, encoder, out)
            if problem is None:
                encoder.commit()
                report.merged += 1
                continue
            for f, offset in zip(files, offsets, strict=True):
                f.seek(offset)
                f.truncate()
            encoder.rollback()
            report.damaged.append((chunk, problem))
        if report.damaged and not options.allow_partial:
            raise _refusal(run, report)
        report.bytes = out.tell()
    report.records = encoder.records
    report.duplicates, report.near_duplicates = encoder.duplicates, encoder.near_duplicates
    report.seconds = time.monotonic() - began
    return report

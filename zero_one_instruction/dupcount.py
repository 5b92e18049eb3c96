"""The report's duplicate counts, in memory that does not grow with the number of records.

A set of every question's hash, or an LSH index of every question, grows by a hash or a
kilobyte a record: a gigabyte at a million. So nothing is looked up while the records stream
by. Each record's hashes and band keys (`neardup.Bands`) are numbered by the record's place in
the stream (its `seq`) and spilled to temporary files, 256 of a kind, chosen by the hash; its
MinHash signature goes to one file in seq order, read back a row at a time. At the end
each file of keys is counted on its own with numpy: records with the same key are neighbours
once a file is sorted, so the earliest of each is known without any other file.

- An exact duplicate is a record whose question's hash is not the earliest with that hash.
- A near duplicate is a record, not an exact one, that shares a band key with an earlier
  record whose estimated Jaccard similarity to it (`neardup.similarity`, as the merge checks
  it) reaches the threshold. Only the earliest record holding each band key (the band's
  *root*) is checked, so a record has at most one candidate a band and the work stays
  linear; its root is the earliest of its candidates that reaches the threshold. What this
  misses: a record similar enough only to a later holder of a band it shares (one that was
  not itself similar enough to that band's root), which the merge would find. An exact
  repeat never is a root (the question it repeats comes earlier with the same keys), so
  including the exact repeats changes nobody's root, and they are taken out by `seq`.
- A cluster is a root and the near duplicates whose root it is: what a near-dedup merge would
  drop in favour of that root, when nothing in between is dropped first.

The (seq, root) pairs go to files by ranges of `seq`, and from there to files by ranges of
root, read in slices: any one file or slice is bounded, whatever the number of records (a
file of one key repeated millions of times is the exception). What stays in memory is a
buffer of `CHUNK` records, `BATCH` pairs of signatures and the largest clusters. The disk
holds about 200 bytes a record for the keys, 512 for the signature (128 uint32 values) and
each question's example text, in the system's temporary directory, removed at the end.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
import shutil
import struct
import tempfile
import weakref
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .neardup import Bands, similarity

FANOUT = 256  # files per kind of key, by one byte of the key (so 256, no other)
CHUNK = 1 << 16  # records buffered before they are spilled
RANGE = 1 << 16  # seqs per file of (seq, root) pairs
LIMIT = 1 << 23  # bytes of one file read at once; a larger one is split by the next byte
BATCH = 1 << 13  # candidate pairs whose signatures are compared at once (8 MB at 128 values)
ENTRY = np.dtype([("key", "<u8"), ("seq", "<u4")])
PAIR = np.dtype([("seq", "<u4"), ("root", "<u4")])
_TEXT = struct.Struct("<qI")  # a record's index and its example text's length in bytes


def digest(text: str) -> int:
    """A 64-bit hash of the exact text: two different texts share it with a chance of 2**-64."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class Cluster:
    """A root question, how many records its cluster has, and the first of its repeats."""

    root: int
    size: int
    members: list[int] = field(default_factory=list)


@dataclass
class Counts:
    """What `DuplicateCounter.count` finds; clusters name records by their `index`."""

    exact_questions: int
    exact_answers: int
    near_questions: int
    clusters: int
    largest: list[dict[str, Any]]


def _runs(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`entries` sorted by key then seq, and a mask of each key's first (earliest) entry."""
    entries = entries[np.lexsort((entries["seq"], entries["key"]))]
    first = np.ones(len(entries), dtype=bool)
    first[1:] = entries["key"][1:] != entries["key"][:-1]
    return entries, first


class _Spill:
    """Arrays appended to named files in a temporary directory, read back whole or in
    slices."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="zoi-report-"))
        # Removed however the report ends: counted, stopped by a bad line, or interrupted.
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def append(self, name: str, values: np.ndarray) -> None:
        if len(values):
            with self.path(name).open("ab") as handle:
                values.tofile(handle)

    def scatter(self, name: str, entries: np.ndarray, level: int) -> None:
        """Append `entries` to `name/0` .. `name/255` by byte `level` of their key."""
        part = ((entries["key"] >> np.uint64(8 * level)) & np.uint64(0xFF)).astype(np.intp)
        order = np.argsort(part, kind="stable")
        entries, ends = entries[order], np.cumsum(np.bincount(part, minlength=FANOUT))
        for p, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
            self.append(f"{name}-{p}", entries[start:end])

    def slices(self, name: str, dtype: np.dtype, count: int) -> Iterator[np.ndarray]:
        path = self.path(name)
        if not path.exists():
            return
        with path.open("rb") as handle:
            while len(values := np.fromfile(handle, dtype=dtype, count=count)):
                yield values

    def whole(self, name: str, dtype: np.dtype | type) -> np.ndarray:
        """All of a file bounded by construction (one range of seqs), or nothing."""
        path = self.path(name)
        return np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype=dtype)

    def bounded(self, name: str, level: int = 1) -> Iterator[np.ndarray]:
        """The entries of `name`, a file at a time, each file at most `LIMIT` bytes: a larger
        one is split by the next byte of the key (unless the key is used up) and removed."""
        path = self.path(name)
        if not path.exists():
            return
        if path.stat().st_size <= LIMIT or level >= ENTRY["key"].itemsize:
            yield np.fromfile(path, dtype=ENTRY)
        else:
            for values in self.slices(name, ENTRY, LIMIT // ENTRY.itemsize):
                self.scatter(name, values, level)
            for p in range(FANOUT):
                yield from self.bounded(f"{name}-{p}", level + 1)
        path.unlink()

    def close(self) -> None:
        self._remove()


class DuplicateCounter:
    """Fed records in order (`add`), counts exact and near duplicate questions, exact
    duplicate answers and the largest near-duplicate clusters (`count`), holding only a
    buffer of keys in memory."""

    def __init__(self, bands: Bands, clusters: int = 10, examples: int = 5) -> None:
        self.bands = bands
        self.keys_per_record = bands.count
        self.clusters, self.examples = clusters, examples
        self.records = 0
        self._spill = _Spill()
        self._texts: BinaryIO = self._spill.path("texts").open("wb")
        self._signatures: BinaryIO = self._spill.path("signatures").open("wb")
        self._buffers = {kind: array("Q") for kind in ("question", "answer", "band")}
        self._flushed = 0

    def add(self, index: int, question: str, answer: str, example: str) -> None:
        """One record: its index (as reports name it), texts, and the question as an example
        would show it."""
        values = self.bands.signature(question).hashvalues
        # datasketch's values are below 2**32, in uint64 before its version 2.
        self._signatures.write(values.astype(np.uint32).tobytes())
        self._buffers["question"].append(digest(question))
        self._buffers["answer"].append(digest(answer))
        self._buffers["band"].extend(self.bands.band_keys(values))
        text = example.encode("utf-8")
        self._texts.write(_TEXT.pack(index, len(text)) + text)
        self.records += 1
        if self.records - self._flushed >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        per = {"question": 1, "answer": 1, "band": self.keys_per_record}
        for kind, buffer in self._buffers.items():
            keys = np.frombuffer(buffer, dtype=np.uint64)
            entries = np.empty(len(keys), dtype=ENTRY)
            entries["key"] = keys
            entries["seq"] = self._flushed + np.arange(len(keys)) // per[kind]
            self._spill.scatter(kind, entries, 0)
            self._buffers[kind] = array("Q")
        self._flushed = self.records

    def count(self) -> Counts:
        """The counts; the temporary files are gone afterwards."""
        self._flush()
        self._texts.close()
        self._signatures.close()
        try:
            exact_answers = sum(int((~first).sum()) for _, first in self._kind("answer"))
            exact_questions = self._exact_questions()
            near = self._near_pairs()
            clusters, largest = self._largest()
            return Counts(exact_questions, exact_answers, near, clusters, self._named(largest))
        finally:
            self._spill.close()

    def _kind(self, kind: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for p in range(FANOUT):
            for entries in self._spill.bounded(f"{kind}-{p}"):
                yield _runs(entries)

    def _exact_questions(self) -> int:
        """Counts exact repeats and files their seqs by range, to be taken out of the near
        duplicates."""
        count = 0
        for entries, first in self._kind("question"):
            repeats = np.sort(entries["seq"][~first])
            count += len(repeats)
            for r, part in _cut(repeats // RANGE):
                self._spill.append(f"exact-{r}", repeats[part])
        return count

    def _near_pairs(self) -> int:
        """Files every band entry's (seq, earliest seq with that key) by range of seq; then,
        a range at a time, keeps each seq's earliest root similar enough and files (seq, root)
        by range of root, in seq order. Returns the near duplicates."""
        for entries, first in self._kind("band"):
            starts = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
            pairs = np.empty(int((~first).sum()), dtype=PAIR)
            pairs["seq"], pairs["root"] = entries["seq"][~first], entries["seq"][starts][~first]
            pairs = pairs[np.argsort(pairs["seq"], kind="stable")]
            for r, part in _cut(pairs["seq"] // RANGE):
                self._spill.append(f"pairs-{r}", pairs[part])
        near = 0
        for r in range(self._ranges):
            pairs = self._candidates(r)
            pairs = pairs[self._similar(pairs)]
            earliest = np.ones(len(pairs), dtype=bool)
            earliest[1:] = pairs["seq"][1:] != pairs["seq"][:-1]
            pairs = pairs[earliest]
            near += len(pairs)
            pairs = pairs[np.argsort(pairs["root"] // RANGE, kind="stable")]
            for root_range, part in _cut(pairs["root"] // RANGE):
                self._spill.append(f"members-{root_range}", pairs[part])
        return near

    def _candidates(self, r: int) -> np.ndarray:
        """Range `r`'s distinct (seq, root) pairs by seq then root, less the exact repeats
        (a repeat shares every band with the question it repeats: it would always pass)."""
        pairs = np.unique(self._spill.whole(f"pairs-{r}", PAIR))
        return pairs[~np.isin(pairs["seq"], self._spill.whole(f"exact-{r}", np.uint32))]

    def _similar(self, pairs: np.ndarray) -> np.ndarray:
        """Which pairs reach the threshold, `BATCH` at a time, each signature read by itself.
        Not through a memory map: the kernel maps the cached pages around each page a map
        touches (fault-around), so a map's resident size followed the file's, 512 bytes a
        record (421 MB peak at a million records against 200 MB at 100,000)."""
        similar = np.zeros(len(pairs), dtype=bool)
        with self._spill.path("signatures").open("rb") as handle:
            for start in range(0, len(pairs), BATCH):
                part = pairs[start : start + BATCH]
                seqs = self._rows(handle.fileno(), part["seq"])
                found = similarity(seqs, self._rows(handle.fileno(), part["root"]))
                similar[start : start + BATCH] = found >= self.bands.threshold
        return similar

    def _rows(self, fd: int, seqs: np.ndarray) -> np.ndarray:
        """The signatures of `seqs`, one positioned read per distinct seq."""
        wanted, back = np.unique(seqs, return_inverse=True)
        size = self.bands.num_perm * np.dtype(np.uint32).itemsize
        data = b"".join(os.pread(fd, size, seq * size) for seq in wanted.tolist())
        return np.frombuffer(data, dtype=np.uint32).reshape(len(wanted), -1)[back]

    @property
    def _ranges(self) -> int:
        return -(-self.records // RANGE)

    def _largest(self) -> tuple[int, list[Cluster]]:
        """How many clusters there are, and the largest (the earlier root first on a tie)
        with their first members, a range of roots at a time."""
        total, best = 0, []
        for r in range(self._ranges):
            name, base = f"members-{r}", r * RANGE
            sizes = np.zeros(RANGE, dtype=np.int64)
            for part in self._spill.slices(name, PAIR, LIMIT // PAIR.itemsize):
                sizes += np.bincount(part["root"] - base, minlength=RANGE)
            roots = np.flatnonzero(sizes)
            total += len(roots)
            top = roots[np.lexsort((roots, -sizes[roots]))][: self.clusters]
            found = {base + int(i): Cluster(base + int(i), int(sizes[i]) + 1) for i in top}
            self._members(name, found)
            best = heapq.nsmallest(
                self.clusters, [*best, *found.values()], key=lambda c: (-c.size, c.root)
            )
        return total, best

    def _members(self, name: str, clusters: dict[int, Cluster]) -> None:
        """The first `examples` members of each of `clusters`, from the root range's file."""
        wanted = np.fromiter(clusters, dtype=np.uint32, count=len(clusters))
        for part in self._spill.slices(name, PAIR, LIMIT // PAIR.itemsize):
            hits = part[np.isin(part["root"], wanted)]
            for seq, root in zip(hits["seq"].tolist(), hits["root"].tolist(), strict=True):
                members = clusters[root].members
                if len(members) < self.examples:
                    members.append(seq)

    def _named(self, clusters: list[Cluster]) -> list[dict[str, Any]]:
        """The clusters as the report shows them: records by their index, with examples."""
        wanted = {c.root for c in clusters} | {m for c in clusters for m in c.members}
        texts = dict(self._examples(wanted))
        return [
            {
                "first_index": texts[c.root][0],
                "size": c.size,
                "repeats": [{"index": texts[m][0], "question": texts[m][1]} for m in c.members],
            }
            for c in clusters
        ]

    def _examples(self, wanted: set[int]) -> Iterator[tuple[int, tuple[int, str]]]:
        """(seq, (index, example text)) of the `wanted` seqs, reading the texts file once."""
        if not wanted:
            return
        last = max(wanted)
        with self._spill.path("texts").open("rb") as handle:
            for seq in range(last + 1):
                index, size = _TEXT.unpack(handle.read(_TEXT.size))
                if seq in wanted:
                    yield seq, (index, handle.read(size).decode("utf-8"))
                else:
                    handle.seek(size, 1)


def _cut(ranges: np.ndarray) -> Iterator[tuple[int, slice]]:
    """Slices of a sorted array of range numbers, one per range present."""
    cuts = [0, *(np.flatnonzero(np.diff(ranges)) + 1).tolist(), len(ranges)]
    for start, end in itertools.pairwise(cuts):
        if end > start:
            yield int(ranges[start]), slice(start, end)

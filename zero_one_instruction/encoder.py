"""The record encoder: the one place a kept record becomes a line of the output.

A kept record is first a *shard line*: the original schema without its `id` (`record_line`),
beside a *meta line* with its source index and trace (`meta_line`). Workers write those lines
to shards; `zoi generate` makes the same lines from its outcomes in memory. The `Encoder` then
turns each pair into the output line of the chosen format, numbering the ids and dropping
repeated questions, so `generate` and `merge` write the same bytes for the same records.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .detectors import NEAR_THRESHOLD
from .pipeline import Outcome
from .records import dumps, original_record

if TYPE_CHECKING:
    from .neardup import NearDuplicates

Format = Literal["original", "messages"]
FORMATS: tuple[Format, ...] = ("original", "messages")
Dedup = Literal["exact", "near"]
DEDUPS: tuple[Dedup, ...] = ("exact", "near")
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class EncodeOptions:
    """How records are written: ids `record_N` from `id_start`, the `fmt` of each record, the
    source index and trace under `meta`, and questions that repeat an earlier one dropped:
    the same question (`exact`), or also nearly the same (`near`, an estimated Jaccard
    similarity of character trigrams of at least `near_threshold`)."""

    id_start: int = 0
    fmt: Format = "original"
    with_meta: bool = False
    dedup: Dedup | None = None
    near_threshold: float = NEAR_THRESHOLD


def duplicates_path(output: Path) -> Path:
    """The sidecar of a near-dedup output: `out.jsonl` -> `out.duplicates.jsonl`."""
    return output.with_suffix(".duplicates.jsonl")


def record_line(outcome: Outcome, system: str) -> str:
    """A kept record as a shard line: the output record without its id, so that numbering
    is left to whoever puts the records in their final order."""
    question, answer = outcome.question or "", outcome.answer or ""
    record = original_record("", question, answer, system, outcome.later_turns)
    del record["id"]
    return dumps(record)


def meta_line(outcome: Outcome) -> str:
    """A kept record's trace without what the record line already holds (a conversation's
    later turns too: its count stays, as `turns`)."""
    data = outcome.to_dict()
    del data["question"], data["answer"], data["base_prompt"], data["drop_reason"]
    data.pop("later_turns", None)
    return dumps(data)


def id_prefix(record_id: int) -> bytes:
    """The id field that opens every output line in the original format: a shard line with
    its opening brace replaced by this is the output line, with no JSON parsed."""
    return b'{"id":"record_%d",' % record_id


def _is_turn(turn: Any) -> bool:
    if not isinstance(turn, dict):
        return False
    return turn.get("from") in ROLES and isinstance(turn.get("value"), str)


def parse_record(raw: bytes) -> dict[str, Any]:
    """A shard line as a record, or ValueError. A damaged line can still be JSON (a digit
    where the question was), and the merger cuts a damaged shard out on ValueError: an
    unchecked record would fail deeper down with an error nobody expects, as a traceback."""
    record = json.loads(raw)
    if not isinstance(record, dict):
        raise ValueError("a shard line is not a JSON object")
    if not (isinstance(record.get("input"), str) and isinstance(record.get("output"), str)):
        raise ValueError("a shard line's input or output is not text")
    turns = record.get("conversation")
    if not (isinstance(turns, list) and all(_is_turn(turn) for turn in turns)):
        raise ValueError("a shard line's conversation is not a list of turns")
    return record


def _question_key(record: dict[str, Any]) -> bytes:
    return hashlib.blake2b(record["input"].encode("utf-8"), digest_size=16).digest()


class Encoder:
    """Shard lines in, output lines out, in order. Questions seen for `dedup` are pending
    until `commit`, so a caller that takes back lines (a merged shard that fails its
    checksum) can `rollback` them, and the ids with them; the near-duplicate index forgets
    them too. A dropped record goes to `removed` (a sidecar's write), if set, with the id of
    the record it repeats: the caller takes back what it wrote there on a rollback."""

    def __init__(self, options: EncodeOptions = EncodeOptions()) -> None:
        self.options = options
        self.next_id = options.id_start
        self.removed: Callable[[bytes], object] | None = None
        self.dropped: Counter[Dedup] = Counter()
        self._seen: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}
        self._pending_dropped: Counter[Dedup] = Counter()
        self._committed_id = options.id_start
        self._near: NearDuplicates | None = None
        self._near_pending: list[int] = []
        if options.dedup == "near":
            from .neardup import NearDuplicates

            self._near = NearDuplicates(threshold=options.near_threshold)

    @property
    def fast(self) -> bool:
        """The default output needs no JSON parsing: the id is spliced in front."""
        o = self.options
        return o.fmt == "original" and not o.with_meta and not o.dedup

    @property
    def records(self) -> int:
        return self.next_id - self.options.id_start

    @property
    def duplicates(self) -> int:
        """Records `dedup` dropped for repeating a question exactly."""
        return self.dropped["exact"]

    @property
    def near_duplicates(self) -> int:
        """Records `dedup` dropped for nearly repeating a question, exact repeats excluded."""
        return self.dropped["near"]

    def line(self, raw: bytes, meta: bytes | None = None) -> bytes | None:
        """The output line for one shard line (and its meta line, used only `with_meta`),
        or None if `dedup` drops it."""
        if self.fast:
            return self._number(raw)
        record = parse_record(raw)
        if self.options.dedup and self._drop(record):
            return None
        out: dict[str, Any] = {"id": f"record_{self._take_id()}"}
        if self.options.fmt == "messages":
            out["messages"] = [
                {"role": ROLES[turn["from"]], "content": turn["value"]}
                for turn in record["conversation"]
            ]
        else:
            out.update(record)
        if self.options.with_meta and meta is not None:
            out["meta"] = json.loads(meta)
        return dumps(out).encode("utf-8")

    def outcome(self, outcome: Outcome, system: str) -> bytes | None:
        """The output line for a kept outcome: the same bytes a worker's shard lines of it
        would become in a merge."""
        raw = record_line(outcome, system).encode("utf-8")
        meta = meta_line(outcome).encode("utf-8") if self.options.with_meta else None
        return self.line(raw, meta)

    def commit(self) -> None:
        """The lines so far are final: their questions now count for `dedup`."""
        self._seen.update(self._pending)
        self.dropped.update(self._pending_dropped)
        self._pending, self._pending_dropped, self._near_pending = {}, Counter(), []
        self._committed_id = self.next_id

    def rollback(self) -> None:
        """Forget the lines since the last commit: their ids and their questions."""
        if self._near is not None:
            self._near.forget(self._near_pending)
        self._pending, self._pending_dropped, self._near_pending = {}, Counter(), []
        self.next_id = self._committed_id

    def splice(self, data: bytes, write: Callable[[Any], object]) -> None:
        """Write whole shard lines `data` (verified, each ending in a newline) in the fast
        format: no JSON parsed and no line copied (memoryview slices), for a merge that
        streams gigabytes."""
        view, find = memoryview(data), data.find
        start, record_id = 0, self.next_id
        while (end := find(b"\n", start)) >= 0:
            write(id_prefix(record_id))
            write(view[start + 1 : end + 1])  # the record without its opening brace
            start, record_id = end + 1, record_id + 1
        self.next_id = record_id

    def _number(self, raw: bytes) -> bytes:
        return id_prefix(self._take_id()) + raw[1:]

    def _take_id(self) -> int:
        record_id = self.next_id
        self.next_id += 1
        return record_id

    def _drop(self, record: dict[str, Any]) -> bool:
        """Whether `dedup` drops the record; one dropped goes to `removed`."""
        found = self._repeats(record)
        if found is None:
            return False
        kind, of = found
        self._pending_dropped[kind] += 1
        if self.removed is not None:
            entry = {"duplicate_of": f"record_{of}", "kind": kind, **record}
            self.removed(dumps(entry).encode("utf-8"))
        return True

    def _repeats(self, record: dict[str, Any]) -> tuple[Dedup, int] | None:
        """How and which kept record's id the record's question repeats, or None, and then
        the record is indexed under the id it is about to take."""
        key = _question_key(record)
        of = self._seen.get(key, self._pending.get(key))
        if of is not None:
            return "exact", of
        if self._near is not None:
            of = self._near.add_unique(self.next_id, record["input"])
            if of is not None:
                return "near", of
            self._near_pending.append(self.next_id)
        self._pending[key] = self.next_id
        return None

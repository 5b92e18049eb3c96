"""What `zoi report` reads, as one stream of items: a merged JSONL file, or a run's verified
shards with their drops and traces.

Both are read line by line, once, so a report of any size holds one chunk's line at a time.
A run's shards are read only if they match their done marker (as `zoi merge` reads them);
chunks not done or damaged are left out and counted, so a report on an unfinished run says
what it covers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import shards
from .errors import ZoiError
from .pipeline import Tally
from .records import lone_surrogate
from .rundir import Chunk, Run, open_run

# A question in a conversation, in the original format or in `--format messages`.
_ASKED = {("from", "human"), ("role", "user")}
# JSON's escape of a surrogate: the only way a UTF-8 line can hold a lone one once parsed.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class DatasetError(ZoiError):
    """The input is not a merged zoi file or a run directory."""


@dataclass(frozen=True)
class Item:
    """One base prompt's result: a kept record (question and answer) or a drop (its reason).
    `steps` is the trace as `Outcome.to_dict` writes it, or None where the input has none (a
    merged file without `--with-meta`). `question` and `answer` are the first turn; `turns`
    counts the turns of a kept record's conversation (`pipeline.turns`)."""

    index: int
    question: str | None
    answer: str | None
    drop_reason: str | None = None
    fixer_ran: bool = False
    steps: list[dict[str, Any]] | None = None
    turns: int = 1

    @property
    def kept(self) -> bool:
        return self.drop_reason is None


@dataclass
class Coverage:
    """How much of a run the report saw: done chunks are read, the others are named."""

    chunks: int = 0
    read: int = 0
    absent: list[Chunk] = field(default_factory=list)
    damaged: list[tuple[Chunk, str]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "read": self.read,
            "absent": len(self.absent),
            "damaged": [f"{chunk.id}: {problem}" for chunk, problem in self.damaged],
        }


def _texts(record: Any) -> tuple[str, str] | None:
    """Question and answer of a merged record in either output format, or None."""
    if not isinstance(record, dict):
        return None
    question, answer = record.get("input"), record.get("output")
    if isinstance(question, str) and isinstance(answer, str):
        return question, answer
    messages = record.get("messages")
    if isinstance(messages, list):
        by_role: dict[Any, Any] = {}  # the first of each role: the first turn, as `input`
        for message in messages:
            if isinstance(message, dict):
                by_role.setdefault(message.get("role"), message.get("content"))
        question, answer = by_role.get("user"), by_role.get("assistant")
        if isinstance(question, str) and isinstance(answer, str):
            return question, answer
    return None


def _turns(record: dict[str, Any]) -> int:
    """How many turns a record's conversation holds (its questions) in either format: 1 for
    every record of a single-turn run."""
    turns = record.get("conversation", record.get("messages"))
    if not isinstance(turns, list):
        return 1
    asked = [t for t in turns if isinstance(t, dict) and any(t.get(k) == v for k, v in _ASKED)]
    return max(len(asked), 1)


def _parse(path: Path, number: int, line: bytes) -> Any:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise DatasetError(
            f"{path}: line {number} is not JSON; give a merged JSONL file or --run RUN"
        ) from None


def _check_text(path: Path, number: int, line: bytes, record: Any) -> None:
    """Refuse a line whose `\\ud800` escape parsed to half a character: no terminal, file or
    tokenizer can encode it, and the report would fail later with an exception name. Only a
    line with such an escape is searched, as an escaped emoji is a pair and reads whole."""
    if not _SURROGATE_ESCAPE.search(line):
        return
    text = json.dumps(record, ensure_ascii=False)
    position = lone_surrogate(text)
    if position is not None:
        raise DatasetError(
            f"{path}: line {number} holds a lone surrogate (U+{ord(text[position]):04X}, "
            "half of a character); not valid Unicode text"
        )


def _file_item(path: Path, number: int, line: bytes) -> Item:
    record = _parse(path, number, line)
    _check_text(path, number, line, record)
    texts = _texts(record)
    if texts is None:
        raise DatasetError(
            f"{path}: line {number} is not a zoi record (no input/output or messages)"
        )
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    index = meta.get("index")
    steps = meta.get("steps")
    return Item(
        index=index if isinstance(index, int) else number - 1,
        question=texts[0],
        answer=texts[1],
        fixer_ran=bool(meta.get("fixer_ran")),
        steps=steps if isinstance(steps, list) else None,
        turns=_turns(record),
    )


def read_file(path: Path) -> Iterator[Item]:
    """The records of a merged file, in file order; a line that is not one stops the report
    with one line naming it (a report on half a file would mislead)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory; give a run with --run {path}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield _file_item(path, number, line)


def _lines(path: Path) -> Iterator[Any]:
    return map(json.loads, shards.read_lines(path))


def _chunk_items(run: Run, chunk: Chunk) -> Iterator[Item]:
    """A verified chunk's kept records (with their trace), then its drops."""
    records = _lines(shards.path_of(run.shards, chunk, "records"))
    metas = _lines(shards.path_of(run.shards, chunk, "meta"))
    for record, meta in zip(records, metas, strict=True):
        yield Item(
            index=meta["index"],
            question=record["input"],
            answer=record["output"],
            fixer_ran=meta.get("fixer_ran", False),
            steps=meta.get("steps"),
            turns=_turns(record),
        )
    for drop in _lines(shards.path_of(run.shards, chunk, "rejects")):
        yield Item(
            index=drop["index"],
            question=drop.get("question"),
            answer=drop.get("answer"),
            drop_reason=drop.get("drop_reason") or "unknown",
            fixer_ran=drop.get("fixer_ran", False),
            steps=drop.get("steps"),
        )


@dataclass
class RunReader:
    """A run's verified shards as items; `funnel` and `coverage` are complete once `items`
    has been read to the end."""

    run: Run
    funnel: Tally = field(default_factory=Tally)
    coverage: Coverage = field(default_factory=Coverage)

    def items(self) -> Iterator[Item]:
        verified = shards.Verified(self.run)
        chunks = self.run.chunks()
        self.coverage.chunks = len(chunks)
        for chunk in chunks:
            result = verified.check(chunk)
            if result.done and result.marker is not None:
                self.coverage.read += 1
                self.funnel.merge(shards.funnel_of(result.marker))
                yield from _chunk_items(self.run, chunk)
            elif result.problem:
                self.coverage.damaged.append((chunk, result.problem))
            else:
                self.coverage.absent.append(chunk)


def open_reader(run_dir: Path) -> RunReader:
    """The run in `run_dir`, refused with one line if it is not one."""
    return RunReader(open_run(run_dir))

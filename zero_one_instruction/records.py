"""The output record: the original tool's schema, and files that appear whole or not at all."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def original_record(record_id: str, question: str, answer: str, system: str) -> dict[str, Any]:
    """`id`, `input`, `output` and a ShareGPT-style `conversation`, as the original wrote."""
    return {
        "id": record_id,
        "input": question,
        "output": answer,
        "conversation": [
            {"from": "system", "value": system},
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
    }


def dumps(obj: Any) -> str:
    """One JSON line, Japanese kept readable rather than \\u-escaped."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


@contextmanager
def atomic_text(path: Path) -> Iterator[IO[str]]:
    """Write `path.tmp`, fsync, then rename over `path`: readers see the old file or the whole
    new one, never a half-written one. On error the temporary file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

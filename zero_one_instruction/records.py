"""The output record: the original tool's schema, and files that appear whole or not at all."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import ZoiError

# A surrogate code point in a Python string is always a lone one (a pair decodes to one code
# point): half of a character cut in two, e.g. an emoji split by an API that counts UTF-16.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def lone_surrogate(text: str) -> int | None:
    """Where the first character that UTF-8 cannot encode is, or `None`: such text can be
    neither written to a file nor sent to a tokenizer, so it must be caught where it enters."""
    found = _SURROGATE.search(text)
    return None if found is None else found.start()


def writable(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, for traces and messages, which
    must be written even when the text they show is broken."""
    return _SURROGATE.sub(REPLACEMENT, text)


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


def temporary_name(path: Path) -> Path:
    """A sibling name no other process or thread writes to, so two writers racing for the
    same file each produce a whole file and the last rename wins."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """Write a temporary sibling, fsync, then rename over `path`: readers see the old file or
    the whole new one, never a half-written one. On error the temporary file is removed."""
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ZoiError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""The output record: the original tool's schema, and files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import ZoiError, write_failure

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


def original_record(
    record_id: str,
    question: str,
    answer: str,
    system: str,
    later: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """`id`, `input`, `output` and a ShareGPT-style `conversation`, as the original wrote.
    A conversation of more than one turn has the `later` turns after the first in its
    `conversation`; `input` and `output` stay the first turn, so the schema holds."""
    conversation = [
        {"from": "system", "value": system},
        {"from": "human", "value": question},
        {"from": "gpt", "value": answer},
    ]
    for later_question, later_answer in later:
        conversation.append({"from": "human", "value": later_question})
        conversation.append({"from": "gpt", "value": later_answer})
    return {"id": record_id, "input": question, "output": answer, "conversation": conversation}


def dumps(obj: Any) -> str:
    """One JSON line, Japanese kept readable rather than \\u-escaped."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def temporary_name(path: Path) -> Path:
    """A sibling name no other process or thread writes to, so two writers racing for the
    same file each produce a whole file and the last rename wins."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_target(path: Path) -> Path:
    """The file a write to `path` lands in. A symbolic link is followed to its target, so the
    target gets the new content and the link stays a link (renaming over the link itself
    would silently turn it into a regular file and leave the target stale)."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))  # a dangling link: its target is created
    except OSError as exc:
        raise ZoiError(f"{path}: cannot follow the symbolic link ({exc.strerror})") from None


def _replaceable(path: Path, target: Path) -> int | None:
    """The permission bits of the file about to be replaced (kept, so an output made private
    stays private), or None if there is none or it is a link that is replaced as such. Only
    regular files and links are replaced: renaming over a device would destroy it."""
    try:
        info = target.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ZoiError(f"{path}: cannot write ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ZoiError(f"{path}: is {kind}; write to a regular file instead")
    return stat.S_IMODE(info.st_mode)


@contextmanager
def atomic_file(path: Path, binary: bool = False, follow_links: bool = False) -> Iterator[IO[Any]]:
    """Write a temporary sibling, fsync, then rename over `path`: readers see the old file or
    the whole new one, never a half-written one. On error the temporary file is removed.
    A replaced file keeps its mode.

    With `follow_links` (a user's output), a symbolic link is written through to its target.
    Without it (the run's own files), a link is replaced by the file: a link planted in a run
    directory must not make a worker write somewhere else."""
    target = write_target(path) if follow_links else path
    mode = _replaceable(path, target)
    tmp = temporary_name(target)
    try:
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise write_failure(path, exc) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove a temporary file after a failure; on a read-only or vanished directory there is
    nothing to remove, and that must not hide the failure being reported."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)

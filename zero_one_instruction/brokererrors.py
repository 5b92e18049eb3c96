"""The broker's errors, and the one-line messages for what Redis or its data directory refuse.

A `BrokerError` is the user's to fix (a malformed URL, a run directory that cannot be
written: exit 2); a `BrokerEnvironmentError` is the machine's (a full disk, Redis at its
memory limit, a server that does not answer: exit 1). The connection code and the terminal,
for a refusal met in the middle of a command, word Redis's refusals with the same `refusal`.
"""

from __future__ import annotations

import errno
from pathlib import Path

import redis

from .errors import NO_SPACE, ZoiError


class BrokerError(ZoiError):
    """Redis cannot be reached or used."""


class BrokerEnvironmentError(BrokerError):
    """Redis or its data directory failed for a reason outside the user's input (a full
    disk, memory): not the user-error exit code."""

    exit_code = 1


_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def refusal(exc: redis.ResponseError, where: str = "Redis") -> BrokerError | None:
    """One line for a write Redis refused because of its environment, None for any other
    refusal. MISCONF: it could not persist (a full disk) and takes no more changes, not even
    a PING; OOM: it hit its memory limit. redis-py prefixes an error inside a pipeline with
    the whole command, which is noise here."""
    text = str(exc)
    for code in ("MISCONF", "OOM"):
        if code in text:
            text = text[text.index(code) :]
            break
    if text.startswith("MISCONF"):
        return BrokerEnvironmentError(
            f"{where} cannot write its data to disk and refuses changes ({text}); free space "
            "where its data lives (RUN/redis for the run's embedded server) and run the "
            "command again"
        )
    if text.startswith("OOM"):
        return BrokerEnvironmentError(
            f"{where} is out of memory and refuses changes ({text}); raise its maxmemory or "
            "use a larger --chunk-size"
        )
    return None


def unwritable(data_dir: Path, exc: OSError) -> BrokerError:
    """The run's embedded server needs to write its data directory: say which and why."""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        return BrokerEnvironmentError(
            f"{data_dir}: {reason}; the run's embedded Redis keeps its queue there: free "
            "space and run the command again"
        )
    if exc.errno in _NOT_WRITABLE:
        return BrokerError(
            f"{data_dir}: cannot write ({reason}); the run's embedded Redis keeps its queue "
            "there: make the run directory writable, or give --redis-url"
        )
    return BrokerEnvironmentError(f"{data_dir}: {reason} (the run's embedded Redis)")

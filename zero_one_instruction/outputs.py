"""Where a command may write its output: the one check behind `generate`, `run` and `merge`.

An output never replaces one of the command's own inputs (the config, the base prompts, the
templates, the chat template), never lands inside a run directory (where it would replace
`run.json`, a shard or the Redis data), never replaces a device or a directory, and replaces an
existing file only when asked to, or when it is the very file this run wrote last time (so
rerunning `zoi run` on a finished run merges again, as documented).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .config import Config
from .errors import ZoiError
from .records import atomic_file, write_target
from .rundir import RUN_FILE

OUTPUTS_FILE = "outputs.json"


def protected_inputs(config: Config, config_path: Path | None = None) -> dict[Path, str]:
    """Every file the command reads, each with the name a refusal gives it."""
    chat = config.chat_template
    files = {
        "config file": config_path,
        "base-prompt file": config.prompts.file,
        "tasks file": config.prompts.tasks_file,
        "domains file": config.prompts.domains_file,
        "templates file": config.templates,
        "chat-template file": Path(chat) if chat is not None and "{" not in chat else None,
    }
    return {path: label for label, path in files.items() if path is not None}


def _same_file(a: Path, b: Path) -> bool:
    """Same path after links, or the same inode under another name (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_run_directory(path: Path) -> bool:
    return (path / RUN_FILE).is_file() and (path / "shards").is_dir()


def enclosing_run(path: Path, runs: Iterable[Path] = ()) -> Path | None:
    """The run directory `path` lies in: one of `runs` (which may not exist yet), or any
    directory above it that holds a run."""
    real = Path(os.path.realpath(path))
    for run in runs:
        if real.is_relative_to(os.path.realpath(run)):
            return run
    return next((parent for parent in real.parents if _is_run_directory(parent)), None)


def _signature(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


def _written(run: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((run / OUTPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def written_by(run: Path, output: Path) -> bool:
    """Is `output` exactly the file the run wrote last (same inode, size and mtime)? Then
    replacing it loses nothing: the run writes the same records again."""
    try:
        return _written(run).get(os.path.realpath(output)) == _signature(output)
    except OSError:
        return False


def remember_output(run: Path, output: Path) -> None:
    """Note the output the run just wrote. A hint only: if it cannot be saved, a rerun asks
    for --overwrite instead of replacing the file, which is the safe side."""
    try:
        written = _written(run)
        written[os.path.realpath(output)] = _signature(output)
        with atomic_file(run / OUTPUTS_FILE) as handle:
            json.dump(written, handle)
    except (OSError, ZoiError):
        return


def _kind(path: Path) -> str | None:
    """What `path` is once links are followed: None if nothing is there yet."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ZoiError(f"{path}: cannot use as an output ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


SPECIAL = (Path("/dev"), Path("/proc"))


def _through_special(path: Path, hops: int = 40) -> bool:
    """Does `path`, or a link it leads through, lie in /dev or /proc? /dev/stdout is a link
    (via /proc/self/fd) to whatever stdout is; when that is a file, renaming an output over it
    would swap the shell's redirect target behind its back, so such paths are refused."""
    for _ in range(hops):
        path = Path(os.path.abspath(path))
        if any(path.is_relative_to(special) for special in SPECIAL):
            return True
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
    return False


def check_destination(path: Path, runs: Iterable[Path] = ()) -> Path:
    """Refuse a place no output may go, whatever the command and whatever it reads: a
    directory, a device, a path into /dev or /proc, a run directory (one of `runs`, which may
    not exist yet, or any that does), a directory that is not there. Return the file the
    output will really be written to (a symbolic link's target). Checked before the command
    does its work, so a long pass never ends in a refusal."""
    existing = _kind(path)
    if existing == "directory":
        raise ZoiError(f"{path}: is a directory")
    if existing == "other":
        raise ZoiError(f"{path}: is not a regular file (a device, pipe or socket)")
    if _through_special(path):
        raise ZoiError(f"{path}: leads into /dev or /proc; write the output to a regular file")
    target = write_target(path)
    inside = enclosing_run(target, runs)
    if inside is not None:
        raise ZoiError(f"{path}: is inside the run directory {inside}; write the output elsewhere")
    if not target.parent.is_dir():
        raise ZoiError(f"{path}: directory {target.parent} does not exist")
    return target


def check_output(
    path: Path,
    config: Config,
    *,
    config_path: Path | None = None,
    run: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Refuse an output that would destroy something, with one line naming it; return the file
    the output will really be written to (a symbolic link's target). The one check behind
    every command that writes an output, so that none of them forgets a case.

    Never replaced, even with `overwrite`: a file the command reads (`config_path` and the
    files `config` names), anything inside the run directory `run` (which may not exist yet)
    or inside any other run directory. An existing file is replaced with `overwrite`, or when
    `run` wrote it last time (a rerun of `zoi run` or `zoi merge`)."""
    inputs = protected_inputs(config, config_path)
    target = check_destination(path, [run] if run is not None else [])
    for source, label in inputs.items():
        if _same_file(target, source):
            raise ZoiError(f"{path}: is the {label} {source}; an input is never overwritten")
    if target.exists() and not overwrite and not (run and written_by(run, target)):
        raise ZoiError(f"{path}: already exists (pass --overwrite to replace it)")
    return target

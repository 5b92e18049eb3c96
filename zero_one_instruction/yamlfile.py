"""Reading user YAML files with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ZoiError


def read_yaml(path: Path, kind: str, error: type[ZoiError]) -> Any:
    """Parse the YAML file `path` (a `kind` file, for messages), raising `error` on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {kind} file ({exc})") from None
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, source: str, error: type[ZoiError]) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise error(f"{source}:{where}: invalid YAML: {problem}") from None

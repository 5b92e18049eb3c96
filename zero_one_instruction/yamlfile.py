"""Reading user YAML files with errors that name the file and the line.

Duplicate keys are errors: PyYAML would silently keep the last one, and a config with two
`model_name` lines is a mistake whichever one was meant.

Aliases (`*name`) are refused: each one reuses a whole subtree, so a few hundred bytes of
nested aliases expand into gigabytes once the value is printed, frozen into a run or handed to
an engine ("billion laughs"). Nothing zoi reads needs them. Nesting is bounded too, because
PyYAML composes nodes recursively and would die of a `RecursionError` on a deep document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError

from .errors import ZoiError

MAX_DEPTH = 100


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases, duplicate keys or unbounded nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ComposerError(
                None,
                None,
                f"aliases are not supported (*{event.anchor}); write the value out",
                event.start_mark,
            )
        if self._depth >= MAX_DEPTH:
            raise ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, kind: str, error: type[ZoiError]) -> Any:
    """Parse the YAML file `path` (a `kind` file, for messages), raising `error` on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {kind} file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {kind} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {kind} file ({exc})") from None
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, source: str, error: type[ZoiError]) -> Any:
    try:
        return yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise error(f"{source}:{where}: invalid YAML: {problem}") from None

"""Token counts for `zoi report`: the lengths a model sees, from the tokenizer of the run's model.

Characters say how long a text reads; tokens say what it costs and how close it came to
`max_tokens`. Counting them needs the model's own tokenizer (transformers' AutoTokenizer), which
the report loads only from this machine: it never downloads (`local_files_only`), and never runs
a model repository's own code (`trust_remote_code` off). By default a run's tokenizer is used
when it is already here (a model directory, or a hub id in the local cache) and skipped with the
reason otherwise, so the report works without transformers or a model; a tokenizer asked for
by name must load, or the report stops with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis import Tokenizer
from .errors import ZoiError

if TYPE_CHECKING:
    from .rundir import Run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ZoiError):
    """The tokenizer asked for cannot be loaded from this machine."""


@dataclass(frozen=True)
class TokenRequest:
    """What the user asked for: a tokenizer by name or path, the run's own model's if it is on
    this machine (`auto`), or none at all."""

    name: str | None = None
    auto: bool = True


# The default: the run's model's tokenizer when it is on this machine.
AUTO = TokenRequest()


@dataclass(frozen=True)
class Tokens:
    """The counter the report uses, the tokenizer it came from, and why there is none."""

    count: Tokenizer | None
    name: str | None = None
    reason: str | None = None

    def figures(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "not_counted": self.reason}


def run_tokenizer(run: Run) -> tuple[str, str | None]:
    """The tokenizer vLLM loads for `run` (its `engine_kwargs.tokenizer`, else the model) and
    the revision it loads, so a report counts with the tokenizer that made the data."""
    kwargs = run.config.engine_kwargs
    name = kwargs.get("tokenizer") or run.config.model_name
    revision = kwargs.get("tokenizer_revision") or kwargs.get("revision")
    return str(name), str(revision) if revision else None


def _on_this_machine(name: str, revision: str | None) -> bool:
    """Whether `name` is a directory with tokenizer files or a hub id in the local cache,
    looked at without importing transformers (seconds) for a model that is not here."""
    path = Path(name).expanduser()
    if path.is_dir():
        return any((path / file).is_file() for file in TOKENIZER_FILES)
    if path.is_absolute() or name.startswith(".") or name.count("/") != 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(
        isinstance(try_to_load_from_cache(name, file, revision=revision), str)
        for file in TOKENIZER_FILES
    )


def load(name: str, revision: str | None = None) -> Tokenizer:
    """A token counter from the tokenizer `name` (a directory or a hub id already cached)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"tokenizer {name}: needs the 'transformers' package") from None
    directory = Path(name).expanduser()
    source = str(directory) if directory.is_dir() else name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning, no extra cores
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"tokenizer {name}: cannot load it here ({first})") from None

    def count(text: str) -> int:
        # verbose off: a long answer is counted, not warned about as too long for the model.
        return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))

    return count


def choose(request: TokenRequest, run: Run | None, given: Tokenizer | None = None) -> Tokens:
    """The tokens the report counts: a counter the caller `given`, else the tokenizer asked
    for (it must load), else the run's when it is here and loads, else none with the reason,
    which the JSON and the page show."""
    if given is not None:
        return Tokens(given, "given by the caller")
    if request.name is not None:
        return Tokens(load(request.name), request.name)
    if not request.auto:
        return Tokens(None, reason="turned off (--no-tokens)")
    if run is None:
        return Tokens(None, reason="a merged file does not name its model; give --tokenizer")
    name, revision = run_tokenizer(run)
    if not _on_this_machine(name, revision):
        return Tokens(None, reason=f"the run's tokenizer {name} is not on this machine")
    try:
        return Tokens(load(name, revision), name)
    except TokenizerError as exc:
        return Tokens(None, reason=str(exc))

"""Base-prompt sources: an integer index maps to one prompt, deterministically.

Indices past the end wrap around (as the original tool did), so any index range is valid and
index `i` always means the same prompt for the same source. Every source has a content hash so
a run can tell when its source changed underneath it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import Prompts
from .errors import PromptSourceError
from .records import lone_surrogate
from .templates import StepTemplate, render


@dataclass(frozen=True)
class PromptSource:
    """A fixed list of base prompts addressed cyclically by index."""

    description: str
    items: Sequence[str]
    content_hash: str

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, index: int) -> str:
        if index < 0:
            raise IndexError(f"base-prompt index must be >= 0, got {index}")
        return self.items[index % len(self.items)]


def _hash(kind: str, items: Sequence[str]) -> str:
    """Each part is prefixed with its byte length, so no two lists share a hash: with a plain
    separator, a prompt containing the separator would hash like two prompts."""
    digest = hashlib.sha256()
    for part in (kind, *items):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptSourceError(f"{path}: base-prompt file not found") from None
    except OSError as exc:
        raise PromptSourceError(f"{path}: cannot read base-prompt file ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptSourceError(f"{path} line {line}: not valid UTF-8 text") from None


def _lines(text: str) -> list[str]:
    """Split on newlines only: `str.splitlines` also splits on U+2028, form feeds and other
    characters that are legal inside a prompt or a JSON string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_lines(path: Path) -> list[str]:
    """Non-blank lines, stripped. Blank lines are skipped so a trailing newline or a spacer
    line cannot become an empty base prompt."""
    lines = [line.strip() for line in _lines(_decode(path))]
    items = [line for line in lines if line]
    if not items:
        raise PromptSourceError(f"{path}: file has no non-blank lines")
    return items


def _check_text(path: Path, number: int, field: str, value: str) -> None:
    """JSON's `\\ud800` escape yields a lone surrogate, which no file, hash or tokenizer can
    encode: refuse it here, naming the line, rather than fail later with an exception name."""
    position = lone_surrogate(value)
    if position is not None:
        raise PromptSourceError(
            f"{path} line {number}: field {field!r} holds a lone surrogate "
            f"(U+{ord(value[position]):04X}, half of a character); not valid Unicode text"
        )


def read_jsonl(path: Path, field: str) -> list[str]:
    items = []
    for number, line in enumerate(_lines(_decode(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:  # the decoder recurses per level: a line of 10,000 '['s
            raise PromptSourceError(f"{path} line {number}: JSON nested too deeply") from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise PromptSourceError(f"{path} line {number}: no non-empty string field {field!r}")
        _check_text(path, number, field, value)
        items.append(value.strip())
    if not items:
        raise PromptSourceError(f"{path}: file has no records")
    return items


class _CrossProduct(Sequence[str]):
    """Task x domain prompts rendered on demand: 10^4 pairs need not sit in memory as text."""

    def __init__(self, tasks: list[str], domains: list[str], template: StepTemplate) -> None:
        self.tasks, self.domains, self.template = tasks, domains, template

    def __len__(self) -> int:
        return len(self.tasks) * len(self.domains)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        task = self.tasks[index // len(self.domains)]
        domain = self.domains[index % len(self.domains)]
        return render(self.template.user, {"task": task, "domain": domain})


def _builtin_list(name: str) -> list[str]:
    text = resources.files(__package__).joinpath(f"data/{name}").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def cross_product(
    tasks: list[str], domains: list[str], template: StepTemplate, label: str
) -> PromptSource:
    seq = _CrossProduct(tasks, domains, template)
    payload = json.dumps([tasks, domains, template.user], ensure_ascii=False)
    return PromptSource(label, seq, _hash("cross", [payload]))


def tasks_and_domains(settings: Prompts) -> tuple[list[str], list[str], str] | None:
    """The task and domain lists a cross-product source is made of, and its label; None for a
    file source. The report reads them to say how evenly the kept records cover each."""
    if settings.source == "builtin":
        tasks, domains = _builtin_list("tasks_ja.txt"), _builtin_list("domains_ja.txt")
        return tasks, domains, "built-in tasks x domains"
    if settings.source == "tasks_domains":
        if settings.tasks_file is None or settings.domains_file is None:
            raise PromptSourceError(
                "prompts: source 'tasks_domains' needs tasks_file and domains_file"
            )
        tasks, domains = read_lines(settings.tasks_file), read_lines(settings.domains_file)
        return tasks, domains, f"{settings.tasks_file.name} x {settings.domains_file.name}"
    return None


def load_source(settings: Prompts, base_prompt_template: StepTemplate) -> PromptSource:
    """Build the source the config names; every failure is a one-line `PromptSourceError`."""
    lists = tasks_and_domains(settings)
    if lists is not None:
        tasks, domains, label = lists
        return cross_product(tasks, domains, base_prompt_template, label)
    if settings.file is None:
        raise PromptSourceError("prompts: source 'file' needs file")
    path = settings.file
    if path.suffix.lower() == ".jsonl":
        items = read_jsonl(path, settings.field)
        return PromptSource(str(path), items, _hash(f"jsonl:{settings.field}", items))
    items = read_lines(path)
    return PromptSource(str(path), items, _hash("lines", items))

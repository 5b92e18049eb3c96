"""Step prompts: the shipped Japanese templates, user overrides, and safe substitution.

Placeholders are `{name}`. Substitution is one regex pass over the template, so the inserted
text is never scanned again: a base prompt full of braces, `{prompt}` or Jinja syntax arrives in
the model's input exactly as written. `{{` and `}}` write literal braces.

The checker is exact: every brace in a template is either doubled or encloses a placeholder
name. A lone brace, `{0}`, `{prompt:>10}` or `{prompt!r}` look like `str.format` but would be
sent to the model as written, so they are refused by name instead of silently not substituted.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import TemplateError
from .yamlfile import parse_yaml, read_yaml

# `{{`, `}}`, a `{...}` field without braces inside, or a brace left over: the last
# alternative only matches where none of the others could.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_WITH_SUFFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[!:.\[]")
_POSITIONAL = re.compile(r"\d*(?:[!:.\[]|$)")
_CONTEXT = 12


class TemplateSyntaxError(ValueError):
    """A brace in a template that is neither doubled nor a placeholder. The message names
    the offending field; callers add which template it is in."""


# template name -> (required placeholders, optional placeholders)
PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "base_prompt": (frozenset({"domain", "task"}), frozenset()),
    "width": (frozenset({"prompt"}), frozenset()),
    "judge": (frozenset({"prompt"}), frozenset()),
    "fix": (frozenset({"prompt"}), frozenset()),
    "depth": (frozenset({"prompt"}), frozenset()),
    "flatten": (frozenset({"prompt"}), frozenset()),
    "answer": (frozenset({"question"}), frozenset({"refusal_marker"})),
    # The depth operators' templates (`operators`) and the no-gain judge's. They are
    # optional: a run freezes only those its settings send, and a user's file or a run made
    # before them, which has none of them, takes the built-in ones.
    "deepen": (frozenset({"prompt"}), frozenset()),
    "concretize": (frozenset({"prompt"}), frozenset()),
    "reasoning": (frozenset({"prompt"}), frozenset()),
    "complicate_input": (frozenset({"prompt"}), frozenset()),
    "same_request": (frozenset({"before", "after"}), frozenset()),
    # The follow-up question of a multi-turn run (`pipeline.turns`) and its judge, which
    # reads it with the conversation: 「それはなぜですか」 alone is no request at all.
    "follow_up": (frozenset({"conversation"}), frozenset()),
    "follow_up_judge": (frozenset({"conversation", "question"}), frozenset()),
}
OPTIONAL = (
    "deepen",
    "concretize",
    "reasoning",
    "complicate_input",
    "same_request",
    "follow_up",
    "follow_up_judge",
)
KEYS = ("output_system_prompt", *PLACEHOLDERS)
# The templates whose reply is a judge's verdict: constrained to these words, so are their
# examples' replies.
JUDGES = ("judge", "same_request", "follow_up_judge")
# Names a template had before: a user's file may still use them. `base_prompt` was `seed`,
# which now only ever means the random seed.
OLD_NAMES = {"seed": "base_prompt"}
# The names the templates are frozen under (run.json, the run fingerprint): the old ones, so
# that every run made before the rename keeps its fingerprint and can still be resumed.
FROZEN_NAMES = {new: old for old, new in OLD_NAMES.items()}
# What a judge example may reply: the judge is constrained to these two words.
JUDGE_REPLIES = ("はい", "いいえ")
# How `{conversation}` shows who said what: the follow-up templates name these labels, so
# they are scaffolding a follow-up question must not copy (`detectors.scaffolding`).
SPEAKERS = ("ユーザー: ", "アシスタント: ")


def conversation_text(turns: Sequence[tuple[str, str]]) -> str:
    """A conversation as the follow-up templates read it (`{conversation}`): each question
    and answer on its own block after its speaker's label, turns in order, blank lines
    between."""
    user, assistant = SPEAKERS
    return "\n\n".join(f"{user}{question}\n\n{assistant}{answer}" for question, answer in turns)


def _lone_brace(text: str, at: int) -> str:
    brace = text[at]
    before = text[max(0, at - _CONTEXT) : at]
    after = text[at + 1 : at + 1 + _CONTEXT]
    return f"lone {brace!r} in {before + brace + after!r}; write {brace * 2!r} for a literal brace"


def _bad_field(field: str) -> str | None:
    """Why `{field}` is not a placeholder, or None when it is one."""
    shown = f"{{{field}}}"
    if _NAME.fullmatch(field):
        return None
    if _POSITIONAL.match(field):
        return f"positional field {shown} is not supported; placeholders are named, like {{prompt}}"
    suffix = _NAME_WITH_SUFFIX.match(field)
    if suffix:
        return (
            f"{shown}: format specs, conversions and attribute or index lookups are not "
            f"supported; write {{{suffix.group(1)}}}"
        )
    return (
        f"invalid field {shown}: a placeholder is {{name}}; "
        "write '{{' and '}}' for literal braces"
    )


def placeholders(text: str) -> set[str]:
    """The placeholder names in `text`; a brace that is neither doubled nor a placeholder
    raises `TemplateSyntaxError`."""
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        token, field = match.group(0), match.group(1)
        if field is not None:
            problem = _bad_field(field)
            if problem:
                raise TemplateSyntaxError(problem)
            names.add(field)
        elif token in ("{", "}"):
            raise TemplateSyntaxError(_lone_brace(text, match.start()))
    return names


def render(text: str, values: dict[str, str]) -> str:
    """Fill placeholders in a single pass; callers guarantee the text passed `placeholders`
    and every name is in `values`."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return values[match.group(1)]

    return _TOKEN.sub(replace, text)


def _checked(text: str, source: str, name: str) -> set[str]:
    try:
        return placeholders(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{source}: template {name!r}: {exc}") from None


@dataclass(frozen=True)
class Example:
    """One worked example: the values the user message is filled with, and the reply.

    Examples are sent as earlier chat turns, not pasted into the instructions: a small model
    copies whatever framing sits around an example inside its prompt (labels like 「新しい依頼文:」
    ended up in the questions), while a previous assistant turn shows the bare reply."""

    values: tuple[tuple[str, str], ...]
    reply: str


@dataclass(frozen=True)
class StepTemplate:
    """One step's chat: an optional system message, worked examples, and the user message."""

    name: str
    user: str
    system: str | None = None
    examples: tuple[Example, ...] = ()

    def messages(self, **values: str) -> list[tuple[str, str]]:
        chat = [] if self.system is None else [("system", render(self.system, values))]
        for example in self.examples:
            chat.append(("user", render(self.user, dict(example.values))))
            chat.append(("assistant", example.reply))
        chat.append(("user", render(self.user, values)))
        return chat

    def continued(self, earlier: Sequence[tuple[str, str]], **values: str) -> list[tuple[str, str]]:
        """The chat of `messages` with a conversation's earlier turns before its last user
        message: each earlier question filled into the user message as `question` is, then
        its answer as the assistant's. With no earlier turns it is `messages` exactly, so a
        conversation's first answer is asked as every single-turn answer is."""
        chat = self.messages(**values)
        before = []
        for question, answer in earlier:
            before.append(("user", render(self.user, {**values, "question": question})))
            before.append(("assistant", answer))
        return chat[:-1] + before + chat[-1:]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user": self.user}
        if self.system is not None:
            out = {"system": self.system, **out}
        if self.examples:
            out["examples"] = [{**dict(e.values), "reply": e.reply} for e in self.examples]
        return out


@dataclass(frozen=True)
class Templates:
    output_system_prompt: str
    base_prompt: StepTemplate
    width: StepTemplate
    judge: StepTemplate
    fix: StepTemplate
    depth: StepTemplate
    flatten: StepTemplate
    answer: StepTemplate
    deepen: StepTemplate
    concretize: StepTemplate
    reasoning: StepTemplate
    complicate_input: StepTemplate
    same_request: StepTemplate
    follow_up: StepTemplate
    follow_up_judge: StepTemplate

    def step(self, name: str) -> StepTemplate:
        return getattr(self, name)

    def as_dict(self, optional: Collection[str] = ()) -> dict[str, Any]:
        """Plain data under the frozen names, for the run fingerprint and run.json: the
        original seven templates, and of the `OPTIONAL` ones those named in `optional` (the
        ones a run sends), so a run that sends none of them freezes what it always did."""
        out: dict[str, Any] = {"output_system_prompt": self.output_system_prompt}
        for name in PLACEHOLDERS:
            if name not in OPTIONAL or name in optional:
                out[FROZEN_NAMES.get(name, name)] = self.step(name).as_dict()
        return out


def _read_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        source = "built-in templates"
        text = resources.files(__package__).joinpath("templates/ja.yaml").read_text("utf-8")
        data = parse_yaml(text, source, TemplateError)
    else:
        source = str(path)
        data = read_yaml(path, "templates", TemplateError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TemplateError(f"{source}: expected a mapping of template names")
    data = _renamed(data, source)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise TemplateError(f"{source}: unknown template {unknown[0]!r} (known: {', '.join(KEYS)})")
    return data


def _renamed(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A file written before a template was renamed keeps working under the new name; one that
    gives both names is refused, since either choice would silently drop the other's text."""
    out = dict(data)
    for old, new in OLD_NAMES.items():
        if old in out and new in out:
            raise TemplateError(f"{source}: template {old!r} is the old name of {new!r}; keep one")
        if old in out:
            out[new] = out.pop(old)
    return out


def _example(name: str, number: int, raw: Any, used: set[str], source: str) -> Example:
    """An example gives the reply and a value for each placeholder the template uses; judge
    replies must be one of the judge's two words, or the example would teach a third."""
    where = f"{source}: template {name!r} example {number}"
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise TemplateError(f"{where}: must be a mapping of placeholder names to strings")
    reply = raw.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        raise TemplateError(f"{where}: has no reply")
    given = set(raw) - {"reply"}
    if given != used:
        wrong = sorted(given ^ used)[0]
        what = "lacks" if wrong in used else "has unknown key"
        raise TemplateError(f"{where}: {what} {wrong!r} (it gives a value per placeholder)")
    if name in JUDGES and reply not in JUDGE_REPLIES:
        raise TemplateError(f"{where}: a judge example replies はい or いいえ, not {reply!r}")
    values = tuple(sorted((key, value) for key, value in raw.items() if key != "reply"))
    return Example(values=values, reply=reply)


def _examples(name: str, raw: Any, used: set[str], source: str) -> tuple[Example, ...]:
    if raw is None:
        return ()
    if name == "base_prompt":
        raise TemplateError(
            f"{source}: template 'base_prompt' writes the base prompt, not a chat: "
            "it takes no examples"
        )
    if not isinstance(raw, list):
        raise TemplateError(f"{source}: template {name!r}: examples must be a list")
    return tuple(_example(name, n, item, used, source) for n, item in enumerate(raw, start=1))


def _step(name: str, raw: Any, source: str) -> StepTemplate:
    if isinstance(raw, str):
        raw = {"user": raw}
    if not isinstance(raw, dict) or set(raw) - {"system", "user", "examples"}:
        raise TemplateError(
            f"{source}: template {name!r} must be a string or have system/user/examples"
        )
    user, system = raw.get("user"), raw.get("system")
    if not isinstance(user, str) or not user.strip():
        raise TemplateError(f"{source}: template {name!r} has no user message")
    if system is not None and not isinstance(system, str):
        raise TemplateError(f"{source}: template {name!r}: system must be a string")
    if name == "base_prompt" and system is not None:
        raise TemplateError(
            f"{source}: template 'base_prompt' writes the base prompt, not a chat: "
            "it takes no system"
        )
    required, optional = PLACEHOLDERS[name]
    in_user = _checked(user, source, name)  # examples fill the user message only
    found = in_user | _checked(system or "", source, name)
    missing = sorted(required - found)
    if missing:
        raise TemplateError(f"{source}: template {name!r} lacks placeholder {{{missing[0]}}}")
    unknown = sorted(found - required - optional)
    if unknown:
        raise TemplateError(
            f"{source}: template {name!r} uses unknown placeholder {{{unknown[0]}}} "
            f"(write {{{{{unknown[0]}}}}} for literal braces)"
        )
    examples = _examples(name, raw.get("examples"), in_user, source)
    return StepTemplate(name=name, user=user, system=system, examples=examples)


def load_templates(path: Path | None = None, system_prompt: str | None = None) -> Templates:
    """The built-in templates with any subset replaced by the user's file, validated.

    `system_prompt` (from the config) replaces the output conversation's system message.
    """
    merged = _read_yaml(None)
    source = "built-in templates"
    if path is not None:
        merged.update(_read_yaml(path))
        source = str(path)
    system = system_prompt if system_prompt is not None else merged.get("output_system_prompt")
    if not isinstance(system, str) or not system.strip():
        raise TemplateError(f"{source}: output_system_prompt must be a non-empty string")
    if _checked(system, source, "output_system_prompt"):
        raise TemplateError(
            f"{source}: output_system_prompt cannot contain placeholders "
            "(write '{{' and '}}' for literal braces)"
        )
    steps = {name: _step(name, merged.get(name), source) for name in PLACEHOLDERS}
    return Templates(output_system_prompt=render(system, {}), **steps)


def templates_from_dict(data: dict[str, Any], source: str) -> Templates:
    """Rebuild frozen templates (`Templates.as_dict()`, as a run directory keeps them)."""
    if not isinstance(data, dict) or not isinstance(data.get("output_system_prompt"), str):
        raise TemplateError(f"{source}: frozen templates are malformed")
    builtin = _read_yaml(None)
    steps = {}
    for name in PLACEHOLDERS:
        frozen = data.get(FROZEN_NAMES.get(name, name))
        if frozen is None and name in OPTIONAL:  # a template the run never sends
            steps[name] = _step(name, builtin.get(name), "built-in templates")
        else:
            steps[name] = _step(name, frozen, source)
    return Templates(output_system_prompt=data["output_system_prompt"], **steps)

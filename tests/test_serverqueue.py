"""Reading a server's own queue from its Prometheus metrics (`engines/serverqueue.py`): the
page's parsing, and the real `vllm serve`'s page."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from benchmarks.aimd_sim import URL, Phase, Scenario, SimServer
from zero_one_instruction.config import parse_config
from zero_one_instruction.engines import serverqueue
from zero_one_instruction.engines.aimd import Aimd
from zero_one_instruction.engines.openai import OpenAIEngine
from zero_one_instruction.engines.pool import Endpoint
from zero_one_instruction.engines.serverqueue import (
    Queue,
    metrics_url,
    parse,
    read,
    start_watching,
    steer,
    stop_watching,
    watch,
)

from .servedvllm import API_KEY, ServedVLLM
from .test_openai_served import served

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 12.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 12345.0
"""

SGLANG_PAGE = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
"""


def test_the_queue_is_read_from_vllm_and_sglang_pages_summed_over_engines() -> None:
    assert parse(VLLM_PAGE) == Queue(waiting=3.0, running=16.0)
    assert parse(SGLANG_PAGE) == Queue(waiting=2.0, running=7.0)


@pytest.mark.parametrize(
    "page",
    [
        "",
        "# TYPE http_requests_total counter\nhttp_requests_total 3\n",  # another server's
        VLLM_PAGE.replace("waiting", "queued"),  # half of a pair
        "this is { not a metrics page\n",
        VLLM_PAGE.replace("3.0", "NaN"),  # a count that is no number
    ],
)
def test_a_page_without_both_counts_is_no_queue(page: str) -> None:
    assert parse(page) is None


def test_the_metrics_sit_beside_v1_not_under_it() -> None:
    assert metrics_url("http://gpu-1:8000/v1") == "http://gpu-1:8000/metrics"
    assert metrics_url("http://gpu-1:8000/v1/") == "http://gpu-1:8000/metrics"
    assert metrics_url("https://proxy.example/llm") == "https://proxy.example/llm/metrics"


class Pool:
    """Stands for the pools an endpoint serves: counts the slots handed out."""

    def __init__(self) -> None:
        self.dispatched = 0

    def dispatch(self) -> None:
        self.dispatched += 1


def test_a_reading_that_grows_the_limit_hands_the_room_out_at_once() -> None:
    """The requests waiting for a slot get the new room now, not at the next answer."""

    async def check() -> None:
        endpoint = Endpoint("http://x/v1", None, Aimd(maximum=64, limit=16.0, probing=False))
        pool = Pool()
        endpoint.pools.append(pool)  # type: ignore[arg-type]
        for _ in range(16):
            endpoint.aimd.send(0.0)
        steer(endpoint, Queue(waiting=0, running=16))
        assert endpoint.aimd.capacity > 16 and pool.dispatched == 1
        steer(endpoint, Queue(waiting=0, running=16))  # not filled since: no growth
        assert pool.dispatched == 1

    asyncio.run(check())


class FlakyClient:
    """A metrics page whose first reading raises what no HTTP error handler expects."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, url: str, timeout: float) -> httpx.Response:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a client closed under the watcher")
        return httpx.Response(200, text=VLLM_PAGE)


def test_a_reading_that_fails_is_skipped_and_the_watch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serverqueue, "READ_SECONDS", 0.01)

    async def check() -> None:
        client = FlakyClient()
        endpoint = Endpoint("http://x/v1", client, Aimd.starting(8, 64))
        task = asyncio.get_running_loop().create_task(watch(endpoint))
        for _ in range(200):  # bounded: a watcher that died would never read again
            if client.calls >= 3:
                break
            await asyncio.sleep(0.01)
        assert client.calls >= 3
        assert not task.done() and endpoint.aimd.metered(asyncio.get_running_loop().time())

        async def broken() -> None:
            raise RuntimeError("a watcher that died anyway")

        dead = asyncio.get_running_loop().create_task(broken())
        await asyncio.sleep(0)
        await stop_watching([task, dead])  # closing never depends on how they ended
        assert task.cancelled() and dead.done()

    asyncio.run(check())


def _sim_engine(server_queue: bool) -> OpenAIEngine:
    scenario = Scenario("queue, metrics", "queue", (Phase(8, 1.0),), metrics=True)
    openai = {"endpoints": [URL], "judge_constraint": "structured_outputs"}
    openai["server_queue"] = server_queue
    config = parse_config({"model_name": "sim-model", "engine": "openai", "openai": openai}, "test")
    return OpenAIEngine(config, transport=SimServer(scenario))


@pytest.mark.parametrize("server_queue", [True, False])
def test_the_engine_reads_a_reported_queue_only_when_asked_and_stops_on_close(
    server_queue: bool,
) -> None:
    async def check() -> None:
        engine = _sim_engine(server_queue)
        await engine.start()
        await asyncio.sleep(0.1)
        endpoint = engine._endpoints[URL]
        assert endpoint.aimd.metered(asyncio.get_running_loop().time()) == server_queue
        assert engine.stats()[URL].steered_by == ("queue" if server_queue else "latency")
        watchers = list(engine._watchers)
        assert len(watchers) == int(server_queue)
        await engine.aclose()
        assert all(task.done() for task in watchers)

    asyncio.run(check())


def _endpoint(url: str) -> Endpoint:
    client = httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    return Endpoint(url, client, Aimd.starting(8, 64))


@served
def test_the_real_server_reports_its_queue_and_is_watched(vllm_server: ServedVLLM) -> None:
    """`vllm serve` has the two gauges from the start (at zero when idle); the engine starts
    one watcher for it, and none for a URL whose server has no metrics page."""

    async def check() -> None:
        served_endpoint = _endpoint(vllm_server.base_url)
        gone = _endpoint("http://127.0.0.1:9/v1")  # nothing listens on the discard port
        try:
            queue = await read(served_endpoint)
            assert queue is not None and queue.waiting >= 0 and queue.running >= 0
            assert await read(gone) is None
            watchers = await start_watching([served_endpoint, gone])
            assert len(watchers) == 1
            await asyncio.sleep(1.0)  # a reading or two: the limit is steered by them
            assert served_endpoint.aimd.metered(asyncio.get_running_loop().time())
            assert (served_endpoint.stats().steered_by, gone.stats().steered_by) == (
                "queue",
                "latency",
            )  # as `zoi status` shows them
            await stop_watching(watchers)
            assert all(task.done() for task in watchers)
        finally:
            await served_endpoint.client.aclose()
            await gone.client.aclose()

    asyncio.run(check())

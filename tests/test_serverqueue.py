"""Reading a server's own queue from its Prometheus metrics (`engines/serverqueue.py`): the
page's parsing, and the real `vllm serve`'s page."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from zero_one_instruction.engines.aimd import Aimd
from zero_one_instruction.engines.pool import Endpoint
from zero_one_instruction.engines.serverqueue import (
    Queue,
    metrics_url,
    parse,
    read,
    start_watching,
    stop_watching,
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
    ],
)
def test_a_page_without_both_counts_is_no_queue(page: str) -> None:
    assert parse(page) is None


def test_the_metrics_sit_beside_v1_not_under_it() -> None:
    assert metrics_url("http://gpu-1:8000/v1") == "http://gpu-1:8000/metrics"
    assert metrics_url("http://gpu-1:8000/v1/") == "http://gpu-1:8000/metrics"
    assert metrics_url("https://proxy.example/llm") == "https://proxy.example/llm/metrics"


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
            await stop_watching(watchers)
            assert all(task.done() for task in watchers)
        finally:
            await served_endpoint.client.aclose()
            await gone.client.aclose()

    asyncio.run(check())

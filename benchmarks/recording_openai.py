"""Engine openai, recording every chat completion it gets: the exact body sent, when, and how
many tokens came back. The served benchmark replays the recording with a plain client. The
file is named by the ZOI_BENCH_RECORD environment variable.

The recording sits in the HTTP transport, under the engine's own client, so what is recorded
is what went over the wire (and only answers: a try that failed and was retried is not a
request of the workload). Its limits are those the engine gives its own client.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import IO

import httpx

from zero_one_instruction.config import Config
from zero_one_instruction.engines.openai import OpenAIEngine


class RecordingTransport(httpx.AsyncBaseTransport):
    """The network, and a line per chat completion answered."""

    def __init__(self, out: IO[str], limits: httpx.Limits) -> None:
        self._out = out
        self._network = httpx.AsyncHTTPTransport(limits=limits)
        self.limits: Callable[[], list[float]] = list  # the endpoints' limits, once known

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        began = time.time()
        response = await self._network.handle_async_request(request)
        if request.method != "POST" or response.status_code != 200:
            return response
        await response.aread()
        usage = json.loads(response.content).get("usage") or {}
        entry = {
            "body": json.loads(request.content),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "start": began,
            "end": time.time(),
            "limits": self.limits(),  # as the answer left the transport, before it counted
        }
        self._out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._out.flush()  # the worker may end without closing its engine
        return response

    async def aclose(self) -> None:
        await self._network.aclose()


class RecordingOpenAIEngine(OpenAIEngine):
    holds_gpu = False

    def __init__(self, config: Config) -> None:
        self._record = open(os.environ["ZOI_BENCH_RECORD"], "a", encoding="utf-8")  # noqa: SIM115
        most = config.openai.max_in_flight + 1  # as the engine's own client: the queue readings
        limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
        transport = RecordingTransport(self._record, limits)
        super().__init__(config, transport=transport)
        transport.limits = lambda: [e.aimd.limit for e in self._endpoints.values()]

    async def aclose(self) -> None:
        await super().aclose()
        self._record.close()

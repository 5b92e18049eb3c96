"""A reverse proxy on a loopback port that injects the faults a serving fleet really shows.

A client of OpenAI-compatible servers must survive rate limits (429 with `Retry-After`),
server errors, slow answers and connections that die without an answer. A real server
produces none of these on demand, so this proxy stands in front of one (`vllm serve`, or
any HTTP upstream) and scripts them: `fail_429(2)` makes the next two faultable requests
come back 429, `drop(1)` closes the next one's socket without a response, and so on. Faults
are consumed in the order they were scripted; a request with none pending passes through.
Only requests to `faulted_paths` take faults, so a client's start-up check (`/v1/models`)
is not what a test about generation trips over.

It runs on its own event loop in a background thread, so a test can script faults from the
test thread while the client under test runs anywhere (another thread, another process).
`counts()` tells what it did, `events()` in which order, so a test can check that every
injected fault was met and retried, rather than guess it from timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web

LOOPBACK = "127.0.0.1"
# Hop-by-hop headers, and those that describe a body the proxy re-frames: never forwarded.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
DEFAULT_FAULTED = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class Fault:
    """One scripted fault, for one request: `kind` is 429, 500, delay or drop."""

    kind: str
    seconds: float = 0.0  # delay: how long; 429: the Retry-After value
    after_upstream: bool = False  # drop: only after the upstream has answered


def _error_body(status: int, message: str) -> dict[str, Any]:
    """The error shape of OpenAI's API (and vLLM's), so clients parse it as a real one."""
    return {"error": {"message": message, "type": "fault_proxy", "param": None, "code": status}}


def _forwardable(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}


class FaultProxy:
    """A scriptable reverse proxy in front of `upstream` (a base URL such as
    `http://127.0.0.1:8000`), listening on `url`. Use as a context manager, or start/stop."""

    def __init__(
        self,
        upstream: str,
        *,
        faulted_paths: tuple[str, ...] | None = DEFAULT_FAULTED,
        port: int = 0,
        shutdown_timeout: float = 2.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.faulted_paths = faulted_paths  # None: every path takes faults
        self.port = port  # 0: a free port, known after start()
        self.shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._latency = 0.0
        self._counts: Counter[str] = Counter()
        self._events: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The proxy's base URL; `url + "/v1"` is what an OpenAI client takes."""
        return f"http://{LOOPBACK}:{self.port}"

    # --- scripting (from any thread) ---

    def fail_429(self, count: int = 1, retry_after: float = 1.0) -> None:
        """The next `count` faultable requests get 429 with `Retry-After: retry_after`."""
        self._script(count, Fault("429", seconds=retry_after))

    def fail_500(self, count: int = 1) -> None:
        """The next `count` faultable requests get 500 without reaching the upstream."""
        self._script(count, Fault("500"))

    def delay(self, seconds: float, count: int = 1) -> None:
        """The next `count` faultable requests wait `seconds` before they are forwarded."""
        self._script(count, Fault("delay", seconds=seconds))

    def drop(self, count: int = 1, *, after_upstream: bool = False) -> None:
        """The next `count` faultable requests lose their connection without a response:
        before the upstream sees them, or (`after_upstream`) once it has answered, so the
        work was done and the answer is lost, as when a connection dies on the way back."""
        self._script(count, Fault("drop", after_upstream=after_upstream))

    def set_latency(self, seconds: float) -> None:
        """Every faultable request from now on waits `seconds` before it is forwarded."""
        with self._lock:
            self._latency = seconds

    def clear(self) -> None:
        """Forget the faults still pending and the latency."""
        with self._lock:
            self._faults.clear()
            self._latency = 0.0

    def pending(self) -> int:
        """Scripted faults not yet met: 0 once every one has reached a request."""
        with self._lock:
            return len(self._faults)

    def counts(self) -> dict[str, int]:
        """What the proxy did: `requests` (all), `passed` (answered by the upstream),
        `429`, `500`, `delayed`, `dropped`, `502` (the upstream could not be reached)."""
        with self._lock:
            return dict(self._counts)

    def events(self) -> list[tuple[str, str]]:
        """(path, what happened) per request, in arrival order."""
        with self._lock:
            return list(self._events)

    def _script(self, count: int, fault: Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def _take(self, path: str) -> tuple[Fault | None, float]:
        """The fault and the latency for a request that has just arrived."""
        with self._lock:
            self._counts["requests"] += 1
            if self.faulted_paths is not None and not path.startswith(self.faulted_paths):
                return None, 0.0
            return (self._faults.popleft() if self._faults else None), self._latency

    def _note(self, path: str, what: str) -> None:
        with self._lock:
            self._counts[what] += 1
            self._events.append((path, what))

    # --- life cycle ---

    def start(self) -> FaultProxy:
        """Listen, on a loop of its own in a daemon thread; returns once it accepts."""
        if self._thread is not None:
            raise RuntimeError("fault proxy already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        self._call(self._open)
        return self

    def stop(self) -> None:
        """Stop listening, end what is in flight, and end the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._close)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, factory: Callable[[], Any], timeout: float = 60) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout)

    async def _open(self) -> None:
        self._closing = asyncio.Event()
        # No total timeout: a long generation is not a fault; a refused connection is.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _close(self) -> None:
        assert self._closing is not None
        self._closing.set()  # delayed requests stop waiting and are dropped
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # --- serving ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        fault, latency = self._take(path)
        body = await request.read()
        if fault is not None and fault.kind in ("429", "500"):
            return self._refuse(path, fault)
        if fault is not None and fault.kind == "drop" and not fault.after_upstream:
            return self._drop(request, path)
        wait = latency + (fault.seconds if fault is not None and fault.kind == "delay" else 0.0)
        if wait > 0:
            self._note(path, "delayed")
            if await self._closed_within(wait):
                return self._drop(request, path)
        if fault is not None and fault.kind == "drop":
            await self._forward(request, path, body, None)  # the upstream does the work ...
            return self._drop(request, path)  # ... and its answer is lost
        return await self._forward(request, path, body, request)

    def _refuse(self, path: str, fault: Fault) -> web.Response:
        self._note(path, fault.kind)
        if fault.kind == "429":
            retry_after = f"{fault.seconds:g}"
            message = f"fault proxy: rate limited, retry after {retry_after} s"
            return web.json_response(
                _error_body(429, message), status=429, headers={"Retry-After": retry_after}
            )
        return web.json_response(_error_body(500, "fault proxy: internal error"), status=500)

    def _drop(self, request: web.Request, path: str) -> web.Response:
        """Close the connection without a byte of response (a reset, not a clean close)."""
        self._note(path, "dropped")
        if request.transport is not None:
            request.transport.abort()
        return web.Response()  # never sent: the transport is gone

    async def _closed_within(self, seconds: float) -> bool:
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    async def _forward(
        self, request: web.Request, path: str, body: bytes, reply_to: web.Request | None
    ) -> web.StreamResponse:
        """Send the request upstream and stream its answer back to `reply_to` (or read and
        discard it when there is no one to answer). An upstream that cannot be reached is a
        502; one that fails halfway through its answer leaves the client a cut connection."""
        assert self._session is not None
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                self.upstream + str(request.rel_url),
                headers=_forwardable(request.headers),
                data=body,
                allow_redirects=False,
            ) as upstream:
                if reply_to is None:
                    await upstream.read()
                    return web.Response()
                response = web.StreamResponse(
                    status=upstream.status, headers=_forwardable(upstream.headers)
                )
                await response.prepare(reply_to)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                self._note(path, "passed")  # before the last chunk: a client that has its
                await response.write_eof()  # answer finds it counted
        except aiohttp.ClientError as exc:
            if reply_to is None:
                return web.Response()
            if response is not None:  # the status line is out: all that is left is to cut
                self._drop(reply_to, path)
                return response
            self._note(path, "502")
            message = f"fault proxy: upstream {self.upstream} failed: {type(exc).__name__}"
            return web.json_response(_error_body(502, message), status=502)
        return response

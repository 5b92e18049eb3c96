"""Endpoints and pools: where `engine: openai` sends each request, and how many at once.

An endpoint is one base URL with its own HTTP client and its own AIMD limit (`aimd`). A pool is
the endpoints that serve the same models. A request goes to the endpoint of its pool with the
fewest requests outstanding among those with room under their limit and not paused: a slow or
overloaded server gets fewer, a broken one none. An endpoint that refuses a connection, drops
one or answers with a server error is paused (`Lease.faulted`), longer each time it does so
again, and then takes one request at a time until one succeeds: a server that fails fast
always has the fewest requests outstanding, and would otherwise draw every retry of the pool.
A retry also prefers another endpoint than the one it failed on, where one has room.

Requests that find no room wait in one first-come-first-served queue per pool, and each freed
slot goes to the oldest waiter: none is starved by the ones that came later, and nobody polls.
A request that failed waits out its backoff in the pool too (`backoff`): when a pool that had
stopped answering answers again (a server restarted), those waiting since then try again at
once rather than idle out backoffs that had grown while the server was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .aimd import Aimd, Ticket


def clock() -> float:
    """The event loop's clock (monotonic, in seconds): every time the engine keeps is read
    from it, so a loop with a simulated clock (`benchmarks/aimd_sim.py`) drives it all."""
    return asyncio.get_running_loop().time()


@dataclass
class EndpointStats:
    """One endpoint as `zoi status` and the progress line show it: its current limit on
    requests in flight, how many are, how many were sent (retries included), how many of
    those were retries, and the errors by kind (`rate_limited`, `unavailable`, `timeout`,
    `server_error`, `connect`, `dropped`, `rejected`, `bad_response`), and what steers its
    limit now: `queue` (the server's own, read from its metrics) or `latency`."""

    url: str
    limit: int
    in_flight: int
    requests: int
    retries: int
    errors: dict[str, int] = field(default_factory=dict)
    steered_by: str = "latency"


class Endpoint:
    """One server's base URL, the client that talks to it, and its limit."""

    def __init__(self, url: str, client: Any, aimd: Aimd, key_env: str | None = None) -> None:
        self.url = url
        self.client = client  # an httpx.AsyncClient, or any object with its post/get
        self.aimd = aimd
        self.key_env = key_env
        self.requests = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()
        # Faults (refused or dropped connections, server errors) in a row, and when the last
        # one paused the endpoint: the pause after each grows.
        self.faults = 0
        self.faulted_at = -math.inf
        self.pools: list[Pool] = []

    def stats(self) -> EndpointStats:
        return EndpointStats(
            url=self.url,
            limit=self.aimd.capacity,
            in_flight=self.aimd.in_flight,
            requests=self.requests,
            retries=self.retries,
            errors=dict(sorted(self.errors.items())),
            steered_by="queue" if self.aimd.metered(clock()) else "latency",
        )

    def room(self, now: float) -> int:
        """How many more requests it may take at `now`: its limit's room, but one at a time
        (a probe) while its last try failed by its fault, so that a server that fails fast
        costs the pool one failed try per pause, not one per slot."""
        room = self.aimd.room(now)
        return min(room, 1 - self.aimd.in_flight) if self.faults else room

    def freed(self) -> None:
        """A slot may have opened (an answer, a larger limit, a pause over): every pool this
        endpoint serves hands it to its oldest waiter."""
        for pool in self.pools:
            pool.dispatch()


@dataclass
class Lease:
    """One request's slot on one endpoint, from sending to its outcome. The first outcome
    ends it; any later call changes nothing, so a caller may free the slot in a `finally`
    whatever happened before."""

    pool: Pool
    endpoint: Endpoint
    ticket: Ticket
    started: float
    ended: bool = False

    def _end(self) -> bool:
        """Whether this call ends the lease (False: an earlier one did)."""
        if self.ended:
            return False
        self.ended = True
        return True

    def succeeded(self, tokens: int) -> None:
        if not self._end():
            return
        now = clock()
        self.endpoint.aimd.succeeded(self.ticket, now, tokens)
        self.endpoint.faults = 0
        self.pool.answered(now)
        self.endpoint.freed()

    def overloaded(self, pause: float | None = None) -> None:
        """The server refused for load (429, 503): shrink the limit, and pause the endpoint
        for `pause` seconds if it said how long (Retry-After)."""
        if not self._end():
            return
        now = clock()
        self.endpoint.aimd.overloaded(self.ticket, now, pause)
        if pause:
            self.endpoint.aimd.pause(now + pause)
            self.pool.wake_after_pauses()
        self.endpoint.freed()

    def timed_out(self) -> None:
        """No answer in time (a timeout, 408): far past the capacity, halve."""
        if not self._end():
            return
        self.endpoint.aimd.timed_out(self.ticket, clock())
        self.endpoint.freed()

    def faulted(self, pause: float) -> None:
        """No usable answer, by the endpoint's fault: a refused or dropped connection, a
        server error. Pause the endpoint for `pause` seconds so that the pool's other
        endpoints take the requests meanwhile. A burst counts once: a request sent before
        the last pause began failed for the same cause, and neither counts nor extends it."""
        if not self._end():
            return
        endpoint = self.endpoint
        endpoint.aimd.failed(clock())
        if self.started >= endpoint.faulted_at:
            endpoint.faults += 1
            endpoint.faulted_at = clock()
            endpoint.aimd.pause(endpoint.faulted_at + pause)
            self.pool.wake_after_pauses()
        endpoint.freed()

    def failed(self) -> None:
        """Any other end (cancelled, rejected): the slot is free, the limit stays."""
        if not self._end():
            return
        self.endpoint.aimd.failed(clock())
        self.endpoint.freed()


@dataclass
class _Waiter:
    """A request waiting for a slot, and the endpoint it would rather not get (the one its
    last try failed on)."""

    future: asyncio.Future[Lease]
    avoid: Endpoint | None


class Pool:
    """The endpoints serving some models; `label` names them in messages (`openai.endpoints`,
    `openai.models.NAME.endpoints`)."""

    def __init__(self, label: str, endpoints: list[Endpoint]) -> None:
        self.label = label
        self.endpoints = endpoints
        self.last_success = -math.inf  # clock() of the last answer
        self._next_answer: asyncio.Future[None] | None = None  # what backoffs wait for
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        for endpoint in endpoints:
            endpoint.pools.append(self)

    @property
    def urls(self) -> str:
        return ", ".join(endpoint.url for endpoint in self.endpoints)

    def _pick(self, now: float, avoid: Endpoint | None = None) -> Endpoint | None:
        """The endpoint with room and the fewest requests outstanding, `avoid` only if no
        other has room; on a tie, the one with the most room, then the first listed."""
        best: Endpoint | None = None
        best_key: tuple[bool, int, int] | None = None
        for endpoint in self.endpoints:
            room = endpoint.room(now)
            if room <= 0:
                continue
            key = (endpoint is avoid, endpoint.aimd.in_flight, -room)
            if best_key is None or key < best_key:
                best, best_key = endpoint, key
        return best

    def _lease(self, endpoint: Endpoint) -> Lease:
        now = clock()
        return Lease(self, endpoint, endpoint.aimd.send(now), now)

    def try_acquire(self, avoid: Endpoint | None = None) -> Lease | None:
        """A slot now, if one is free and nobody asked before."""
        if self._waiters:
            return None
        endpoint = self._pick(clock(), avoid)
        return None if endpoint is None else self._lease(endpoint)

    async def acquire(self, avoid: Endpoint | None = None) -> Lease:
        """A slot on the best endpoint (another than `avoid` if one has room), as soon as one
        has room, in order of asking."""
        lease = self.try_acquire(avoid)
        if lease is not None:
            return lease
        waiter = _Waiter(asyncio.get_running_loop().create_future(), avoid)
        self._waiters.append(waiter)
        self.wake_after_pauses()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled():
                future.result().failed()  # handed a slot just as it was cancelled
            raise

    def dispatch(self) -> None:
        """Hand free slots to the oldest waiters."""
        now = clock()
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            endpoint = self._pick(now, waiter.avoid)
            if endpoint is None:
                self.wake_after_pauses()
                return
            self._waiters.popleft().future.set_result(self._lease(endpoint))

    def wake_after_pauses(self) -> None:
        """Nothing else would wake a waiter when the only endpoints with room are paused:
        dispatch again when the first pause ends."""
        if not self._waiters:
            return
        now = clock()
        ends = [
            e.aimd.paused_until
            for e in self.endpoints
            if e.aimd.paused_until > now and e.aimd.in_flight < e.aimd.capacity
        ]
        if not ends or min(ends) >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = min(ends)
        self._timer = asyncio.get_running_loop().call_later(self._timer_at - now, self._woken)

    def answered(self, now: float) -> None:
        """An answer came: the requests backing off since the pool stopped answering may try
        again at once."""
        self.last_success = now
        if self._next_answer is not None:
            if not self._next_answer.done():
                self._next_answer.set_result(None)
            self._next_answer = None

    async def backoff(self, seconds: float, failing_since: float) -> None:
        """Wait `seconds` before a request that has been failing since `failing_since` tries
        again, or only until the pool's next answer if it has answered nothing since then: the
        servers were away and are back, and waiting longer would only idle. A request that
        fails while the pool answers others (its own prompt crashes the server, say) waits
        the whole time, as backoff is meant to."""
        if self.last_success > failing_since:
            await asyncio.sleep(seconds)
            return
        if self._next_answer is None:
            self._next_answer = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._next_answer), seconds)

    def _woken(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.dispatch()

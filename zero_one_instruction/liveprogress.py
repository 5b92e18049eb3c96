"""Live counters: the funnel of each chunk in hand, record by record, in Redis.

A done marker comes only when its chunk ends, which on a chunk of a thousand prompts is
minutes away. So the worker publishes the funnel of the records its chunk has finished so far
every few seconds, and the launcher's line and `zoi status` add those of the chunks not yet
done to the markers' figures. The markers stay the truth: a chunk with a marker is counted by
its marker, never by its counters, and the final figures come from the markers alone.

Each chunk's counters are one Redis key with a TTL, listed in a set of the run: a worker that
dies stops refreshing them and they expire (on Redis's clock, whatever the machines' clocks
say), and readers find the chunks in hand without scanning the keyspace. Publishing is a
hint: a Redis failure is logged, never raised into the chunk.

A worker whose engine talks to servers (an engine with `stats()`) also publishes its figures
per endpoint, the same way but per worker rather than per chunk: they describe the engine,
which outlives its chunks. The worker removes its key when it leaves; a killed worker's
expires.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from .engines.endpointstats import EndpointFigures, parse
from .pipeline import Outcome, Tally
from .rundir import Chunk, Run
from .shards import readable_funnel

log = logging.getLogger(__name__)

T = TypeVar("T")
PUBLISH_EVERY = 2.0  # seconds between publications of a chunk's counters, at the most


def index_key(run: Run) -> str:
    """The set of the run's chunk ids that have (or had) live counters."""
    return f"zoi:{run.key}:live"


def counters_key(run: Run, chunk_id: str) -> str:
    """One chunk's live counters: a JSON object with its funnel so far."""
    return f"zoi:{run.key}:live:{chunk_id}"


def endpoints_index_key(run: Run) -> str:
    """The set of the names of the run's workers that publish endpoint figures."""
    return f"zoi:{run.key}:endpoints"


def endpoints_key(run: Run, worker: str) -> str:
    """One worker's endpoint figures: a JSON object of figures by endpoint URL."""
    return f"zoi:{run.key}:endpoints:{worker}"


@dataclass(frozen=True)
class LiveCounters:
    """What a worker published for a chunk in hand: the funnel so far, and when (by the
    worker's clock, as a marker's `started_at` is) the chunk began."""

    funnel: Tally
    started: float


@dataclass
class ChunkCounters:
    """One chunk's counters while it runs. Outcomes arrive on the engine's loop thread and
    are published from the chunk's job thread, so the funnel is guarded by a lock."""

    board: LiveBoard
    chunk: Chunk
    started: float = field(default_factory=time.time)
    funnel: Tally = field(default_factory=Tally)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _failing: bool = field(default=False, init=False)

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.funnel.add(outcome)

    def publish(self) -> None:
        """Publish the funnel so far, refreshing its TTL even when nothing changed: a slow
        record must not make a live chunk's counters expire."""
        with self._lock:
            data = {"funnel": self.funnel.as_dict(), "started": self.started}
        self._quietly("publish", lambda: self.board.write(self.chunk, data))

    def clear(self) -> None:
        """Remove the counters: the chunk's marker counts now, or the chunk failed and its
        outcomes were thrown away."""
        self._quietly("clear", lambda: self.board.remove(self.chunk))

    def _quietly(self, what: str, action: Callable[[], None]) -> None:
        """Live counters are a hint: a Redis hiccup must never fail the chunk. Say so once
        per spell of failures, not every few seconds."""
        try:
            action()
            self._failing = False
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("chunk %s: could not %s live counters (%s)", self.chunk.id, what, exc)
            self._failing = True


@dataclass(frozen=True)
class LiveBoard:
    """Where a worker publishes the counters of its chunks: the run's keys, with `ttl`
    seconds to live. The worker's heartbeat TTL suits: counters live as long as their chunk
    counts as in hand, and are gone when the janitor would give the chunk to another worker."""

    connection: redis.Redis
    run: Run
    ttl: int

    @property
    def every(self) -> float:
        """Seconds between publications: a few per TTL, so one late publication does not let
        the counters of a live chunk expire."""
        return min(PUBLISH_EVERY, self.ttl / 3)

    def counters(self, chunk: Chunk) -> ChunkCounters:
        return ChunkCounters(self, chunk)

    def write(self, chunk: Chunk, data: dict[str, Any]) -> None:
        index = index_key(self.run)
        with self.connection.pipeline() as pipe:
            pipe.set(counters_key(self.run, chunk.id), json.dumps(data), ex=self.ttl)
            pipe.sadd(index, chunk.id)
            pipe.expire(index, self.ttl)  # the index goes when the last worker does
            pipe.execute()

    def remove(self, chunk: Chunk) -> None:
        with self.connection.pipeline() as pipe:
            pipe.delete(counters_key(self.run, chunk.id))
            pipe.srem(index_key(self.run), chunk.id)
            pipe.execute()


def read(connection: redis.Redis, run: Run) -> dict[str, LiveCounters]:
    """The live counters of the run's chunks in hand, by chunk id. Read them before the
    markers: a chunk that ends in between is then counted by its marker, and a reader that
    drops the counters of chunks with a marker never counts a chunk twice. Expired, foreign
    or unreadable entries are left out; an unreachable Redis gives none (a hint only)."""
    return _read_listed(
        connection,
        index_key(run),
        lambda chunk_id: counters_key(run, chunk_id),
        _parse,
        "live counters unreadable (%s); counting done chunks only",
    )


def _read_listed(
    connection: redis.Redis,
    index: str,
    key: Callable[[str], str],
    parse_value: Callable[[bytes | None], T | None],
    failure: str,
) -> dict[str, T]:
    """The members of the set `index`, sorted, each with what `parse_value` makes of its
    key's value; members whose key is gone or unreadable (None) are left out. An unreachable
    Redis gives none, with `failure` logged: live figures are a hint."""
    try:
        names = sorted(member.decode() for member in connection.smembers(index))
        values = connection.mget([key(name) for name in names]) if names else []
    except (redis.RedisError, UnicodeDecodeError) as exc:
        log.warning(failure, exc)
        return {}
    parsed = ((name, parse_value(value)) for name, value in zip(names, values, strict=True))
    return {name: found for name, found in parsed if found is not None}


def _parse(value: bytes | None) -> LiveCounters | None:
    """Counters as a worker wrote them, or None (expired, or not a worker's)."""
    if value is None:
        return None
    try:
        data = json.loads(value)
        funnel, started = data["funnel"], data["started"]
    except (ValueError, TypeError, KeyError):
        return None
    if not readable_funnel(funnel) or type(started) not in (int, float):
        return None
    return LiveCounters(Tally.from_dict(funnel), float(started))


def funnels(counters: dict[str, LiveCounters]) -> dict[str, Tally]:
    """Each chunk's funnel so far, as `progress.Progress.update` takes them."""
    return {chunk_id: live.funnel for chunk_id, live in counters.items()}


class EndpointGauge:
    """A worker's endpoint figures, read from its engine (`read`: JSON-safe figures by URL,
    `EngineHost.stats`) and published every `board.every` seconds on a thread of its own
    until `stop`, which removes them. Neither a failing engine nor Redis ever reaches a
    chunk: failures are logged once per spell."""

    def __init__(
        self, board: LiveBoard, worker: str, read: Callable[[], dict[str, dict[str, Any]]]
    ) -> None:
        self.board, self.worker, self.read = board, worker, read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="endpoint-gauge", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and remove this worker's figures: a worker that left serves no
        endpoint, and the sums must not count it until its key expires."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._quietly(self._remove)

    def publish(self) -> None:
        self._quietly(self._write)

    def _loop(self) -> None:
        while True:
            self.publish()
            if self._stop.wait(self.board.every):
                return

    def _write(self) -> None:
        key = endpoints_key(self.board.run, self.worker)
        index = endpoints_index_key(self.board.run)
        data = json.dumps({"endpoints": self.read()})
        with self.board.connection.pipeline() as pipe:
            pipe.set(key, data, ex=self.board.ttl)
            pipe.sadd(index, self.worker)
            pipe.expire(index, self.board.ttl)
            pipe.execute()

    def _remove(self) -> None:
        with self.board.connection.pipeline() as pipe:
            pipe.delete(endpoints_key(self.board.run, self.worker))
            pipe.srem(endpoints_index_key(self.board.run), self.worker)
            pipe.execute()

    def _quietly(self, action: Callable[[], None]) -> None:
        """Endpoint figures are a hint: anything going wrong (Redis, the engine's `stats()`,
        figures that are not JSON) is logged once per spell of failures and skipped."""
        try:
            action()
            self._failing = False
        except Exception as exc:  # a hint must never take the worker down
            if not self._failing:
                log.warning("worker %s: endpoint figures not published (%s)", self.worker, exc)
            self._failing = True


def read_endpoints(connection: redis.Redis, run: Run) -> dict[str, dict[str, EndpointFigures]]:
    """Each live worker's endpoint figures, by worker name then URL (`endpointstats.fleet`
    adds them up). Expired or malformed entries are left out; an unreachable Redis gives
    none."""
    return _read_listed(
        connection,
        endpoints_index_key(run),
        lambda name: endpoints_key(run, name),
        _parse_endpoints,
        "endpoint figures unreadable (%s)",
    )


def _parse_endpoints(value: bytes | None) -> dict[str, EndpointFigures] | None:
    """One worker's figures as it wrote them, or None (expired, not a worker's, or no
    endpoint in it)."""
    if value is None:
        return None
    try:
        data = json.loads(value)["endpoints"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(data, dict):
        return None
    parsed = (parse(url, figures) for url, figures in data.items())
    return {figures.url: figures for figures in parsed if figures is not None} or None

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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from .pipeline import Outcome, Tally
from .rundir import Chunk, Run
from .shards import readable_funnel

log = logging.getLogger(__name__)

PUBLISH_EVERY = 2.0  # seconds between publications of a chunk's counters, at the most


def index_key(run: Run) -> str:
    """The set of the run's chunk ids that have (or had) live counters."""
    return f"zoi:{run.key}:live"


def counters_key(run: Run, chunk_id: str) -> str:
    """One chunk's live counters: a JSON object with its funnel so far."""
    return f"zoi:{run.key}:live:{chunk_id}"


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
    try:
        ids = sorted(member.decode() for member in connection.smembers(index_key(run)))
        values = connection.mget([counters_key(run, chunk_id) for chunk_id in ids]) if ids else []
    except (redis.RedisError, UnicodeDecodeError) as exc:
        log.warning("live counters unreadable (%s); counting done chunks only", exc)
        return {}
    found = {}
    for chunk_id, value in zip(ids, values, strict=True):
        counters = _parse(value)
        if counters is not None:
            found[chunk_id] = counters
    return found


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

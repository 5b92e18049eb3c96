"""Where a run stands: chunks by state, the funnel, recent throughput, live workers, and
for served models each endpoint's concurrency, requests, retries and errors.

Progress comes from the done markers: they are the truth, and they carry the funnel and
timings. Redis adds what is queued, running or failed, and the live counters of the chunks in
hand (`liveprogress`), so the figures move with every record. It is read without RQ's registry
cleanups, so looking at a run never changes it.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from rq.worker import Worker

from . import shards
from .broker import connect
from .engines.endpointstats import EndpointFigures, fleet
from .errors import ZoiError
from .jobs import chunk_queue
from .liveprogress import LiveCounters, read, read_endpoints
from .merger import index_ranges
from .pipeline import Tally, turn_order
from .producer import job_states
from .progress import Throughput
from .rundir import Chunk, Run, open_run

RECENT = 600.0  # seconds of finished chunks that "recent" throughput averages over


@dataclass
class RunStatus:
    run: str
    fingerprint: str
    range: tuple[int, int]
    chunks: dict[str, int]
    prompts_done: int
    records: int
    fixer_ran: int
    dropped: dict[str, int]
    tokens: dict[str, int]
    recent: Throughput
    eta_seconds: float | None
    missing_ranges: list[tuple[int, int]]
    problems: list[str]
    workers: list[dict[str, Any]] = field(default_factory=list)
    endpoints: list[EndpointFigures] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)
    operators_kept: dict[str, int] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    turns_ended: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """`zoi status --json`. `endpoints` is there only when an engine reports them, and
        the depth steps by operator only for a run that draws operators, so a run on GPUs
        with the default depth step reads as before; the same for the turns, only in a run of
        more than one turn."""
        data = asdict(self)
        del data["endpoints"]
        if not self.operators:
            del data["operators"], data["operators_kept"]
        if not self.turns and not self.turns_ended:
            del data["turns"], data["turns_ended"]
        if self.endpoints:
            data["endpoints"] = [figures.as_dict() for figures in self.endpoints]
        return data


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class _Span:
    """A chunk's work over time: a done chunk's, or the part so far of a chunk in hand."""

    started: float | None
    finished: float | None
    funnel: Tally


def _spans(markers: list[dict[str, Any]], live: list[LiveCounters], now: float) -> list[_Span]:
    """The done chunks' spans, then those of the chunks in hand, whose work so far ends now."""
    done = [
        _Span(
            _timestamp(m.get("started_at")), _timestamp(m.get("finished_at")), shards.funnel_of(m)
        )
        for m in markers
    ]
    return done + [_Span(counters.started, now, counters.funnel) for counters in live]


def _recent(spans: list[_Span], now: float) -> Throughput:
    """Throughput over the work finished in the last RECENT seconds."""
    window = [s for s in spans if (s.finished or 0.0) >= now - RECENT]
    if not window:
        return Throughput()
    first = min(s.started or now for s in window)
    return Throughput.of(_funnel(window), now - first)


def _funnel(spans: list[_Span]) -> Tally:
    funnel = Tally()
    for span in spans:
        funnel.merge(span.funnel)
    return funnel


def _workers(connection: redis.Redis, run: Run) -> list[dict[str, Any]]:
    queue = chunk_queue(connection, run)
    found = []
    for worker in Worker.all(connection=connection, queue=queue):
        found.append(
            {
                "name": worker.name,
                "state": worker.get_state(),
                "last_heartbeat": str(worker.last_heartbeat),
            }
        )
    return found


def status_of(run_dir: Path, redis_url: str | None = None) -> RunStatus:
    """`zoi status`: where the run in `run_dir` stands, with the queue read from `redis_url`
    or, without one, from the run's embedded server (started if it is not running)."""
    run = open_run(run_dir)
    with connect(redis_url, run.path, "status") as connection:
        return status(run, connection)


def status(run: Run, connection: redis.Redis | None) -> RunStatus:
    """Where `run` stands. The figures are the done markers' plus the live counters of the
    chunks in hand; a chunk with a marker is counted by its marker alone."""
    chunks = run.chunks()
    live = read(connection, run) if connection else {}  # before the markers: see `read`
    states: list[str | None] = (
        job_states(connection, run, chunks) if connection else [None] * len(chunks)
    )
    counts: Counter[str] = Counter()
    markers, absent, problems, in_hand = [], [], [], []
    verified = shards.Verified(run)
    for chunk, state in zip(chunks, states, strict=True):
        result = verified.check(chunk)
        if result.done and result.marker is not None:
            counts["done"] += 1
            markers.append(result.marker)
            continue
        absent.append(chunk)
        if chunk.id in live:
            in_hand.append(live[chunk.id])
        if result.problem:  # counted once: bad, whatever Redis says
            problems.append(f"chunk {chunk.id}: {result.problem}")
            counts["bad"] += 1
            continue
        key = {"queued": "queued", "started": "running", "failed": "failed"}.get(state or "")
        counts[key or "missing"] += 1
    with contextlib.suppress(ZoiError, OSError):  # a hint only: a read-only run is readable
        verified.save()
    now = time.time()
    spans = _spans(markers, in_hand, now)
    return _summarise(run, chunks, counts, spans, absent, problems, connection, now)


def _summarise(
    run: Run,
    chunks: list[Chunk],
    counts: Counter[str],
    spans: list[_Span],
    absent: list[Chunk],
    problems: list[str],
    connection: redis.Redis | None,
    now: float,
) -> RunStatus:
    funnel = _funnel(spans)
    recent = _recent(spans, now)
    names = ("done", "queued", "running", "failed", "missing", "bad")
    return RunStatus(
        run=str(run.path),
        fingerprint=run.fingerprint,
        range=(run.start, run.end),
        chunks={"total": len(chunks), **{name: counts[name] for name in names}},
        prompts_done=funnel.prompts,
        records=funnel.kept,
        fixer_ran=funnel.fixer_ran,
        dropped=dict(funnel.dropped.most_common()),
        tokens={"prompt": funnel.prompt_tokens, "completion": funnel.completion_tokens},
        recent=recent,
        eta_seconds=recent.eta(run.end - run.start - funnel.prompts),  # markers: whole chunks
        missing_ranges=index_ranges(absent),
        problems=problems,
        workers=_workers(connection, run) if connection else [],
        endpoints=fleet(read_endpoints(connection, run).values()) if connection else [],
        operators=dict(funnel.operators),
        operators_kept=dict(funnel.operators_kept),
        turns=dict(sorted(funnel.turns.items(), key=turn_order)),
        turns_ended=dict(funnel.turns_ended.most_common()),
    )

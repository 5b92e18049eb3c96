"""The chunk runner: what a worker does with one chunk job.

It refuses a chunk that is not one of its run's, returns at once for a chunk already done,
and otherwise evolves the chunk's prompts on the worker's engine and commits their shard.
The worker binds it to each job it takes (`ChunkJob.bind`) with everything it needs: the run,
the engine host, the job itself and the job's start signal.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rq.job import Job

from . import shards
from .enginehost import EngineHost
from .jobs import RefusedJob
from .liveprogress import LiveBoard
from .pipeline import OPERATOR_COUNTS, TURN_COUNTS, Outcome
from .rundir import Chunk, Run

log = logging.getLogger(__name__)


class WrongRun(RefusedJob):
    """A chunk job of another run, or of no chunk of this run, reached this worker's queue."""


class ChunkTimeout(RuntimeError):
    """A chunk ran past its job timeout."""


class ChunkFailed(RuntimeError):
    """Every record of a chunk failed at a request in the same way: the engine or its
    settings are broken (an unusable chat template, say), not the prompts. Committing the
    chunk would record a permanent hole as done; failing it gets it retried and reported."""


def _request_failure(outcome: Outcome) -> tuple[str, str | None] | None:
    """The reason and error of a record dropped because a request failed, else None."""
    if outcome.drop_reason is None or not outcome.drop_reason.endswith("_failed"):
        return None
    return outcome.drop_reason, outcome.steps[-1].error if outcome.steps else None


def uniform_failure(outcomes: list[Outcome]) -> str | None:
    """Why every record of these failed alike, or None. One record's failure is that
    record's (the engine contract: a RequestError drops one record), so it takes two."""
    causes = [_request_failure(o) for o in outcomes]
    if len(causes) < 2 or None in causes or len(set(causes)) != 1:
        return None
    reason, error = causes[0] or ("", None)
    return f"all {len(outcomes)} records failed alike ({reason}: {error})"


@dataclass(frozen=True)
class ChunkRunner:
    """What a chunk job needs from the worker process that runs it."""

    run: Run
    host: EngineHost
    worker_name: str
    live: LiveBoard  # where the counters of the chunks in hand go while they run

    def for_job(self, job: Job, started: threading.Event) -> Callable[..., dict[str, Any]]:
        """The callable RQ performs for `job`: it takes the job's arguments. `started` is set
        once every record of the chunk has a slot on the engine (or the chunk needs none):
        the worker may then take its next chunk."""
        return functools.partial(self.run_chunk, job, started)

    def run_chunk(
        self, job: Job, started: threading.Event, run_key: Any, start: Any, end: Any
    ) -> dict[str, Any]:
        """Evolve prompts [start, end) and commit their shard.

        Idempotent: a chunk whose marker is valid returns at once, so a duplicate delivery
        costs nothing and never writes a second copy.
        """
        run = self.run
        try:
            chunk = _own_chunk(run, run_key, start, end)
            _check_job_id(run, chunk, job)
        except WrongRun:
            started.set()
            raise
        existing = shards.check(run, chunk)
        if existing.done:
            started.set()
            return {"chunk": chunk.id, "already_done": True}
        if existing.problem:
            log.warning("chunk %s: setting aside a bad shard (%s)", chunk.id, existing.problem)
            shards.set_aside(run.shards, chunk)
        return self._evolve(chunk, started, job.timeout)

    def _evolve(
        self, chunk: Chunk, started: threading.Event, timeout: float | None
    ) -> dict[str, Any]:
        """Evolve the chunk on the engine and commit its shard, unless every record failed
        alike."""
        began, wall = time.monotonic(), datetime.now(timezone.utc)
        live = self.live.counters(chunk)
        try:
            work = self.host.submit(self.host.evolve_chunk(chunk, started, live.add))
            outcomes = _wait(work, timeout, self.live.every, live.publish)
            failure = uniform_failure(outcomes)
            if failure is not None:
                raise ChunkFailed(f"chunk {chunk.id}: {failure}; nothing was committed")
            live.publish()  # the whole chunk, while its shard is written
            info = self._info(time.monotonic() - began, wall)
            marker = shards.write_chunk(self.run, chunk, outcomes, self.host.system_prompt, info)
        finally:
            live.clear()
        _log_chunk(self.run, marker)
        return {"chunk": chunk.id, "kept": marker["funnel"]["kept"], "seconds": info["seconds"]}

    def _info(self, seconds: float, began: datetime) -> dict[str, Any]:
        """Who did the chunk, where and when: the marker keeps it."""
        return {
            "worker": self.worker_name,
            "host": socket.gethostname(),
            "model": self.run.config.model_name,
            "started_at": began.isoformat(timespec="milliseconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "seconds": round(seconds, 3),
            **({"engine": engine} if (engine := self.host.marker_info()) else {}),
        }


def _own_chunk(run: Run, run_key: Any, start: Any, end: Any) -> Chunk:
    """The job's chunk, if it is one of this run's: a job is data that anyone who can write
    to the queue can forge, and a range outside the run's grid must never become a shard."""
    if run_key != run.key:
        raise WrongRun(f"chunk of run {run_key!r} reached the worker of run {run.key}; refused")
    if type(start) is not int or type(end) is not int or not run.owns(Chunk(start, end)):
        raise WrongRun(
            f"[{start!r}, {end!r}) is not a chunk of run {run.key} ([{run.start}, {run.end}) "
            f"in chunks of {run.chunk_size}); refused"
        )
    return Chunk(start, end)


def _check_job_id(run: Run, chunk: Chunk, job: Job) -> None:
    """The job must carry its chunk's id: the producer, the launcher and `zoi status` follow a
    chunk by its job id, and a job named for one chunk that computes another would mark the
    first as finished while its shard is missing."""
    if run.chunk_of_job(job.id) != chunk:
        raise WrongRun(
            f"job {job.id} asks for chunk {chunk.id}, whose job is {run.job_id(chunk)}; refused"
        )


def _log_chunk(run: Run, marker: dict[str, Any]) -> None:
    """One structured line per finished chunk in RUN/logs/chunks.jsonl (a single append, so
    lines of concurrent workers never interleave). `retries` is how many requests the engine
    sent again after a transient failure (a flaky server, a rate limit): they change no
    record, so this is where they show."""
    funnel, seconds = marker["funnel"], max(marker["seconds"], 1e-9)
    retries = funnel.get("retries", 0)  # a funnel leaves out a count of 0
    line = {
        "time": marker["finished_at"],
        "chunk": marker["chunk"],
        "worker": marker["worker"],
        "prompts": funnel["prompts"],
        "records": funnel["kept"],
        "dropped": funnel["dropped"],
        "retries": retries,
        **{name: funnel[name] for name in OPERATOR_COUNTS + TURN_COUNTS if name in funnel},
        "seconds": marker["seconds"],
        "tokens_per_s": round(funnel["completion_tokens"] / seconds, 1),
    }
    log.info(
        "chunk %s: %d/%d kept in %.1f s%s",
        marker["chunk"],
        funnel["kept"],
        funnel["prompts"],
        seconds,
        f", {retries} retries" if retries else "",
    )
    logs = run.path / "logs"
    logs.mkdir(exist_ok=True)
    fd = os.open(logs / "chunks.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _wait(
    future: concurrent.futures.Future[Any],
    timeout: float | None,
    every: float,
    meanwhile: Callable[[], None],
) -> Any:
    """The chunk's outcomes, calling `meanwhile` every `every` seconds until they come (the
    live counters are published from this thread, never from the engine's loop)."""
    deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            future.cancel()
            raise ChunkTimeout(f"chunk exceeded its {timeout} s timeout")
        try:
            return future.result(timeout=every if left is None else min(every, left))
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the chunk's own error, not a wait that ran out
            meanwhile()

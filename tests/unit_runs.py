"""Runs built in-process for the unit tests of shards, merger, producer and status: a run
directory over the scripted config, shards written straight from made-up outcomes (no engine),
and the run's own embedded Redis (no CLI, no subprocess but the server itself)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from rq.job import JobStatus

from zero_one_instruction import shards
from zero_one_instruction.embeddedredis import embedded, release, url_path
from zero_one_instruction.jobs import ChunkJob, chunk_queue
from zero_one_instruction.pipeline import Outcome, StepTrace
from zero_one_instruction.rundir import Chunk, Run, create_or_open

from .scripted_engine import scripted_config

SYSTEM = "あなたは役に立つアシスタントです。"
DROP = "answer_empty"
INFO = {"finished_at": "2000-01-01T00:00:00+00:00", "started_at": "2000-01-01T00:00:00+00:00"}


def outcome(index: int, drop: str | None = None, question: str | None = None) -> Outcome:
    """One prompt's outcome: kept with question `質問N` (or `question`), or dropped for `drop`.
    Its tokens depend on the index, so a funnel that sums the wrong outcomes shows it."""
    step = StepTrace("width", text="text", prompt_tokens=10, completion_tokens=index)
    if drop is not None:
        return Outcome(index, f"base {index}", drop_reason=drop, steps=[step])
    return Outcome(index, f"base {index}", question or f"質問{index}", f"回答{index}", steps=[step])


def make_run(tmp_path: Path, end: int = 6, chunk_size: int = 2, **overrides: Any) -> Run:
    """A run of base prompts [0, end); `overrides` are top-level config keys."""
    return create_or_open(tmp_path / "run", scripted_config(**overrides), 0, end, chunk_size)


def finish(
    run: Run,
    chunk: Chunk,
    dropped: frozenset[int] = frozenset(),
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit `chunk` as a worker would: every prompt kept but those in `dropped`."""
    outcomes = [outcome(i, DROP if i in dropped else None) for i in range(chunk.start, chunk.end)]
    return shards.write_chunk(run, chunk, outcomes, SYSTEM, info or INFO)


def finish_all(run: Run, dropped: frozenset[int] = frozenset()) -> None:
    for chunk in run.chunks():
        finish(run, chunk, dropped)


def flip_a_byte(path: Path, at: int = 5) -> None:
    """Damage a file without changing its size: only a checksum finds it."""
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@contextmanager
def broker(run: Run) -> Iterator[redis.Redis]:
    """The run's embedded Redis for one test, shut down after it, unless a command called
    in-process (the last client of this process to leave) has shut it down already."""
    client = embedded(run.path, "test")
    try:
        yield client
    finally:
        if Path(url_path(client)).exists():
            release(client, run.path)
        else:
            client.close()


def leave_queue_as(connection: redis.Redis, run: Run, index: int, status: JobStatus) -> str:
    """Take chunk `index`'s queued job off the queue with `status`, and into the registry a
    worker would leave a failed or finished job in; its job id."""
    queue = chunk_queue(connection, run)
    job_id = run.job_id(run.chunks()[index])
    job = ChunkJob.fetch(job_id, connection=connection, serializer=queue.serializer)
    queue.remove(job_id)
    job.set_status(status)
    registry = {
        JobStatus.FAILED: queue.failed_job_registry,
        JobStatus.FINISHED: queue.finished_job_registry,
    }.get(status)
    if registry is not None:
        registry.add(job, ttl=600)
    return job_id

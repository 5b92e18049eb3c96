"""The producer: put every chunk that is not done on the queue, exactly once.

Done markers on disk decide what is done; Redis only says what is already waiting or
running. Re-enqueueing a job id that RQ still holds can run it twice or make it vanish, so
each missing chunk is handled by its job's state: queued or running ones are left alone, and
failed, finished-without-shard or vanished ones are cleared and enqueued afresh. A lock in
Redis makes concurrent enqueues take turns, so two of them never push the same chunk twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from redis.exceptions import LockError
from rq import Retry
from rq.queue import Queue

from . import rqinternals, shards
from .errors import ZoiError
from .jobs import CHUNK_FUNCTION, ChunkJob, chunk_args, chunk_queue
from .policy import JobPolicy
from .rundir import Chunk, Run

ACTIVE = {"queued", "started", "scheduled", "deferred"}
BATCH = 1000


@dataclass
class EnqueueReport:
    chunks: int = 0
    done: int = 0
    active: int = 0
    enqueued: int = 0
    replaced: dict[str, int] = field(default_factory=dict)  # previous job state -> count
    bad_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


def job_states(connection: redis.Redis, run: Run, chunks: list[Chunk]) -> list[str | None]:
    """Each chunk's job status as RQ stores it, `None` when there is no job. Read-only: unlike
    RQ's registry counts, this never runs cleanups."""
    return rqinternals.job_statuses(connection, [run.job_id(chunk) for chunk in chunks])


@contextmanager
def enqueue_lock(connection: redis.Redis, run: Run, wait: float = 120.0) -> Iterator[None]:
    """Enqueues of one run take turns. The work under the lock is a few pipelined reads and
    writes (shards are hashed before it is taken), far within its expiry; the release only
    deletes a lock that is still ours."""
    lock = connection.lock(f"zoi:{run.key}:enqueue-lock", timeout=300, blocking_timeout=wait)
    if not lock.acquire():
        raise ZoiError(f"another enqueue into {run.path} holds the lock; try again")
    try:
        yield
    finally:
        with contextlib.suppress(LockError):
            lock.release()


def _clear(queue: Queue, job_ids: list[str]) -> None:
    for job_id in job_ids:
        try:
            ChunkJob.fetch(
                job_id, connection=queue.connection, serializer=queue.serializer
            ).delete()
        except Exception:  # a half-written or foreign hash: remove the key itself
            rqinternals.delete_job_hash(queue.connection, job_id)


def _push(queue: Queue, run: Run, chunks: list[Chunk], policy: JobPolicy) -> None:
    for offset in range(0, len(chunks), BATCH):
        batch = [
            Queue.prepare_data(
                CHUNK_FUNCTION,
                args=chunk_args(run, chunk),
                job_id=run.job_id(chunk),
                timeout=policy.timeout,
                result_ttl=policy.result_ttl,
                failure_ttl=policy.failure_ttl,
                retry=Retry(max=policy.retries) if policy.retries else None,
                description=f"zoi chunk {chunk.id} of {run.path}",
            )
            for chunk in chunks[offset : offset + BATCH]
        ]
        queue.enqueue_many(batch)


def enqueue(connection: redis.Redis, run: Run, policy: JobPolicy | None = None) -> EnqueueReport:
    """Make the queue hold exactly the chunks that are neither done nor already in hand."""
    policy = policy or JobPolicy()
    began = time.monotonic()
    report = EnqueueReport()
    queue = chunk_queue(connection, run)
    chunks = run.chunks()
    verified = shards.Verified(run)
    for chunk in chunks:  # the hashing, outside the lock; below, only what changed since
        verified.check(chunk)
    with enqueue_lock(connection, run):
        report.chunks = len(chunks)
        # States first, markers second: a job that finishes in between is then seen as done.
        states = job_states(connection, run, chunks)
        todo: list[Chunk] = []
        stale: list[str] = []
        for chunk, state in zip(chunks, states, strict=True):
            if state in ACTIVE:
                report.active += 1
                continue
            result = verified.check(chunk)
            if result.done:
                report.done += 1
                continue
            if result.problem:
                report.bad_shards.append(f"{chunk.id}: {result.problem}")
                shards.set_aside(run.shards, chunk)
            if state is not None:
                stale.append(run.job_id(chunk))
                report.replaced[state] = report.replaced.get(state, 0) + 1
            todo.append(chunk)
        _clear(queue, stale)
        _push(queue, run, todo, policy)
        report.enqueued = len(todo)
    verified.save()
    report.seconds = time.monotonic() - began
    return report

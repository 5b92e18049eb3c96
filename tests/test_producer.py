"""The producer, in-process over the run's embedded Redis: `enqueue` queues exactly the chunks
that are neither done nor in hand, under their job ids, and changes nothing when repeated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq.job import JobStatus

from zero_one_instruction import shards
from zero_one_instruction.jobs import CHUNK_FUNCTION, ChunkJob, chunk_queue
from zero_one_instruction.producer import JobPolicy, enqueue, job_states
from zero_one_instruction.rundir import Run

from .unit_runs import broker, finish, leave_queue_as, make_run


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return make_run(tmp_path, end=10, chunk_size=3)  # four chunks, the last one short


@pytest.fixture
def connection(run: Run) -> Iterator[redis.Redis]:
    with broker(run) as client:
        yield client


def _queued(connection: redis.Redis, run: Run) -> list[str]:
    return chunk_queue(connection, run).get_job_ids()


def test_enqueue_queues_every_chunk_under_its_job_id(connection: redis.Redis, run: Run) -> None:
    report = enqueue(connection, run)
    assert (report.chunks, report.done, report.active, report.enqueued) == (4, 0, 0, 4)
    assert report.replaced == {} and report.bad_shards == []
    expected = [f"zoi-{run.fingerprint[:16]}-{c.id}" for c in run.chunks()]
    assert _queued(connection, run) == expected
    queue = chunk_queue(connection, run)
    jobs = [ChunkJob.fetch(i, connection=connection, serializer=queue.serializer) for i in expected]
    assert [job.args for job in jobs] == [
        [run.key, 0, 3],
        [run.key, 3, 6],
        [run.key, 6, 9],
        [run.key, 9, 10],
    ]
    assert {job.func_name for job in jobs} == {CHUNK_FUNCTION}
    assert job_states(connection, run, run.chunks()) == ["queued"] * 4


def test_enqueue_again_changes_nothing(connection: redis.Redis, run: Run) -> None:
    enqueue(connection, run)
    again = enqueue(connection, run)
    assert (again.active, again.enqueued, again.done, again.replaced) == (4, 0, 0, {})
    assert _queued(connection, run) == [run.job_id(c) for c in run.chunks()]


def test_done_chunks_are_not_queued(connection: redis.Redis, run: Run) -> None:
    first, second, third, fourth = run.chunks()
    finish(run, second)
    finish(run, fourth)
    report = enqueue(connection, run)
    assert (report.done, report.enqueued) == (2, 2)
    assert _queued(connection, run) == [run.job_id(first), run.job_id(third)]


def test_failed_and_finished_without_a_shard_are_replaced(
    connection: redis.Redis, run: Run
) -> None:
    """A job RQ holds must be cleared before its chunk is queued again; a finished one whose
    shard is done is left as it is."""
    enqueue(connection, run)
    failed = leave_queue_as(connection, run, 0, JobStatus.FAILED)
    lost = leave_queue_as(connection, run, 1, JobStatus.FINISHED)
    done = leave_queue_as(connection, run, 2, JobStatus.FINISHED)
    finish(run, run.chunks()[2])
    report = enqueue(connection, run)
    assert report.replaced == {"failed": 1, "finished": 1}
    assert (report.enqueued, report.done, report.active) == (2, 1, 1)
    assert sorted(_queued(connection, run)) == sorted([run.job_id(run.chunks()[3]), failed, lost])
    assert job_states(connection, run, run.chunks()) == ["queued", "queued", "finished", "queued"]
    assert done not in _queued(connection, run)
    queue = chunk_queue(connection, run)
    assert queue.failed_job_registry.get_job_ids(cleanup=False) == []  # cleared, not doubled
    assert queue.finished_job_registry.get_job_ids(cleanup=False) == [done]


def test_a_vanished_job_is_queued_again(connection: redis.Redis, run: Run) -> None:
    enqueue(connection, run)
    gone = leave_queue_as(connection, run, 3, JobStatus.FINISHED)
    connection.delete(f"rq:job:{gone}")
    report = enqueue(connection, run)
    assert (report.enqueued, report.active, report.replaced) == (1, 3, {})
    assert _queued(connection, run)[-1] == gone


def test_a_bad_shard_is_set_aside_and_its_chunk_queued(connection: redis.Redis, run: Run) -> None:
    first = run.chunks()[0]
    finish(run, first)
    shards.path_of(run.shards, first, "meta").unlink()
    report = enqueue(connection, run)
    assert report.bad_shards == [f"{first.id}: {first.id}.meta.jsonl is missing"]
    assert (report.done, report.enqueued) == (0, 4)
    assert not shards.marker_path(run.shards, first).exists()
    assert len(list(run.shards.glob(f"{first.id}.*.bad-*"))) == 3  # marker, records, rejects


def test_a_queued_chunk_is_left_alone_even_if_its_shard_is_bad(
    connection: redis.Redis, run: Run
) -> None:
    """A job in hand will find and set aside the bad shard itself; enqueue must not move
    files under a worker that may be writing them."""
    enqueue(connection, run)
    first = run.chunks()[0]
    finish(run, first)
    shards.path_of(run.shards, first, "records").write_text("torn", encoding="utf-8")
    report = enqueue(connection, run)
    assert (report.active, report.enqueued, report.bad_shards) == (4, 0, [])
    assert shards.marker_path(run.shards, first).exists()


def test_the_job_policy_is_what_the_jobs_carry(connection: redis.Redis, run: Run) -> None:
    enqueue(connection, run, JobPolicy(retries=2, timeout=60, result_ttl=30, failure_ttl=90))
    queue = chunk_queue(connection, run)
    first = run.job_id(run.chunks()[0])
    job = ChunkJob.fetch(first, connection=connection, serializer=queue.serializer)
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (60, 30, 90)
    assert (job.retries_left, job.retry_intervals) == (2, [0])
    enqueue(connection, run)  # the policy of the first enqueue stays: nothing is re-queued
    plain = ChunkJob.fetch(job.id, connection=connection, serializer=queue.serializer)
    assert plain.timeout == 60

"""`zoi status`'s library, in-process: chunks counted by what the markers and the queue say,
the funnel from the done markers only, and the recent pace and ETA."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from rq.job import JobStatus

from zero_one_instruction import shards
from zero_one_instruction import status as status_module
from zero_one_instruction.producer import enqueue
from zero_one_instruction.progress import Throughput
from zero_one_instruction.rundir import Run
from zero_one_instruction.status import RunStatus, status, status_of

from .unit_runs import DROP, broker, finish, leave_queue_as, make_run

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return make_run(tmp_path, end=12, chunk_size=2)


@pytest.fixture
def connection(run: Run) -> Iterator[redis.Redis]:
    with broker(run) as client:
        yield client


@pytest.fixture
def mixed(run: Run, connection: redis.Redis) -> Run:
    """Six chunks, one in each state: queued, running, done (prompt 4 dropped), failed, no
    job at all, and a shard of another run whose job is still queued."""
    enqueue(connection, run)
    leave_queue_as(connection, run, 1, JobStatus.STARTED)
    finish(run, run.chunks()[2], dropped=frozenset({4}))
    leave_queue_as(connection, run, 2, JobStatus.FINISHED)
    leave_queue_as(connection, run, 3, JobStatus.FAILED)
    connection.delete(f"rq:job:{leave_queue_as(connection, run, 4, JobStatus.FINISHED)}")
    foreign = run.chunks()[5]
    finish(run, foreign)
    marker = shards.marker_path(run.shards, foreign)
    marker.write_text(marker.read_text(encoding="utf-8").replace(run.fingerprint, "9" * 64))
    return run


def _counts(done: int, queued: int, running: int, failed: int, missing: int) -> dict[str, int]:
    """What status reports for the six chunks of `mixed`: the foreign shard is always bad."""
    return {
        "total": 6,
        "done": done,
        "queued": queued,
        "running": running,
        "failed": failed,
        "missing": missing,
        "bad": 1,
    }


def _problem_of_the_foreign_shard(run: Run) -> list[str]:
    return [f"chunk {run.chunks()[5].id}: shard of another run (9999999999999999), not of this one"]


def test_each_chunk_is_counted_once_by_its_state(mixed: Run, connection: redis.Redis) -> None:
    found = status(mixed, connection)
    assert found.chunks == _counts(done=1, queued=1, running=1, failed=1, missing=1)
    assert found.missing_ranges == [(0, 4), (6, 12)]
    assert found.problems == _problem_of_the_foreign_shard(mixed)
    assert (found.run, found.fingerprint) == (str(mixed.path), mixed.fingerprint)
    assert found.range == (0, 12)
    assert found.workers == []


def test_the_funnel_comes_from_the_trusted_markers_only(
    mixed: Run, connection: redis.Redis
) -> None:
    found = status(mixed, connection)
    assert (found.prompts_done, found.records, found.fixer_ran) == (2, 1, 0)
    assert found.dropped == {DROP: 1}
    assert found.tokens == {"prompt": 20, "completion": 9}  # prompts 4 and 5: 4 + 5 tokens
    assert found.recent == Throughput() and found.eta_seconds is None  # finished long ago


def test_without_redis_every_chunk_not_done_is_missing(mixed: Run) -> None:
    found = status(mixed, None)
    assert found.chunks == _counts(done=1, queued=0, running=0, failed=0, missing=4)
    assert found.problems == _problem_of_the_foreign_shard(mixed)


def test_status_of_reads_the_runs_embedded_queue(mixed: Run, connection: redis.Redis) -> None:
    """Last in the test: leaving, `status_of` stops the embedded server, since no other
    process holds it."""
    expected = status(mixed, connection).as_dict()
    found = status_of(mixed.path)
    assert isinstance(found, RunStatus)
    assert found.as_dict() == expected
    assert found.chunks["queued"] == 1 and found.chunks["running"] == 1


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def test_recent_pace_and_eta_come_from_chunks_of_the_last_ten_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path, end=6, chunk_size=2)
    old, recent, _ = run.chunks()
    finish(run, old)  # finished in 2000: in the totals, not in the pace
    began, ended = NOW - timedelta(seconds=10), NOW - timedelta(seconds=5)
    finish(run, recent, info={"started_at": _iso(began), "finished_at": _iso(ended)})
    monkeypatch.setattr(status_module, "time", SimpleNamespace(time=NOW.timestamp))
    found = status(run, None)
    assert (found.prompts_done, found.records) == (4, 4)
    assert found.recent == Throughput(prompts_per_s=0.2, records_per_s=0.2, tokens_per_s=0.5)
    assert found.eta_seconds == pytest.approx(10.0)  # two prompts left at 0.2 per second
    assert found.chunks["done"] == 2 and found.missing_ranges == [(4, 6)]


def test_a_finished_run_has_no_eta_left(tmp_path: Path) -> None:
    run = make_run(tmp_path, end=4, chunk_size=2)
    for chunk in run.chunks():
        finish(run, chunk)
    found = status(run, None)
    assert found.eta_seconds == 0.0 and found.missing_ranges == [] and found.problems == []
    assert found.chunks["done"] == found.chunks["total"] == 2

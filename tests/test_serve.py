"""One burst `worker.serve`, in-process, over the run's embedded Redis and the scripted engine:
it empties the queue into shards that merge to `zoi generate`'s output, skips a chunk already
done, and fails loudly when chunks run out of retries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from zero_one_instruction import generator, shards
from zero_one_instruction.config import load_config
from zero_one_instruction.jobs import ChunkJob, chunk_queue
from zero_one_instruction.merger import merge_run
from zero_one_instruction.producer import JobPolicy, enqueue, job_states
from zero_one_instruction.rundir import Run, create_or_open
from zero_one_instruction.status import status
from zero_one_instruction.worker import WorkerStopped, serve

from .queue_helpers import scripted_config
from .unit_runs import broker, finish, make_run

N, CHUNK = 12, 3
pytestmark = pytest.mark.usefixtures("signals")  # tests/conftest.py
FAST = {"heartbeat_interval": 0.3, "heartbeat_ttl": 2, "janitor_interval": 0.5}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return scripted_config(tmp_path, delay=0.0)


@pytest.fixture
def run(tmp_path: Path, config: Path) -> Run:
    return create_or_open(tmp_path / "run", load_config(config), 0, N, CHUNK)


@pytest.fixture
def connection(run: Run) -> Iterator[redis.Redis]:
    with broker(run) as client:
        yield client


def test_a_burst_worker_turns_the_queue_into_generates_output(
    run: Run, connection: redis.Redis, config: Path, tmp_path: Path
) -> None:
    assert enqueue(connection, run).enqueued == N // CHUNK
    assert serve(connection, run, name="unit", burst=True, **FAST) is True

    assert all(shards.check(run, chunk).done for chunk in run.chunks())
    assert chunk_queue(connection, run).get_job_ids() == []
    assert job_states(connection, run, run.chunks()) == ["finished"] * (N // CHUNK)
    markers = [shards.read_marker(run, chunk)[0] or {} for chunk in run.chunks()]
    assert {m["worker"].rsplit("-", 2)[0] for m in markers} == {"unit"}
    assert status(run, connection).chunks["done"] == N // CHUNK

    expected = tmp_path / "generated.jsonl"
    generator.generate(config, 0, N, expected)
    out = tmp_path / "out.jsonl"
    report = merge_run(run.path, out)
    assert out.read_bytes() == expected.read_bytes()
    assert report.records == len(expected.read_bytes().splitlines()) > 0

    assert serve(connection, run, burst=True, **FAST) is False  # nothing left to do


def test_a_chunk_done_before_its_job_runs_is_not_redone(run: Run, connection: redis.Redis) -> None:
    enqueue(connection, run)
    first = run.chunks()[0]
    marker = shards.marker_path(run.shards, first)
    finish(run, first, info={"worker": "earlier"})
    before = marker.read_bytes()
    assert serve(connection, run, burst=True, **FAST) is True
    assert marker.read_bytes() == before  # not written again
    queue = chunk_queue(connection, run)
    job = ChunkJob.fetch(run.job_id(first), connection=connection, serializer=queue.serializer)
    assert job.return_value() == {"chunk": first.id, "already_done": True}
    later = ChunkJob.fetch(
        run.job_id(run.chunks()[1]), connection=connection, serializer=queue.serializer
    )
    assert (later.return_value() or {}).get("kept", 0) > 0


def test_chunks_that_run_out_of_retries_fail_the_burst(tmp_path: Path) -> None:
    run = make_run(
        tmp_path, end=4, chunk_size=2, engine_kwargs={"rules": {"none": {"width": "!error"}}}
    )
    with broker(run) as connection:
        enqueue(connection, run, JobPolicy(retries=0))
        with pytest.raises(WorkerStopped, match="2 chunks failed after all their retries"):
            serve(connection, run, burst=True, **FAST)
        assert job_states(connection, run, run.chunks()) == ["failed", "failed"]
        assert status(run, connection).chunks["failed"] == 2
    assert shards.present_markers(run) == {}  # a chunk whose every request failed is no shard

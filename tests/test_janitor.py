"""The janitor on a real (embedded) Valkey: abandoned and stranded chunks come back once."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from rq import Retry
from rq.job import Job, JobStatus

from zero_one_instruction.janitor import MAX_ABANDONED, Janitor
from zero_one_instruction.jobs import CHUNK_FUNCTION, chunk_queue
from zero_one_instruction.rundir import create_or_open, open_run
from zero_one_instruction.worker import ChunkWorker

from .queue_helpers import ENV, ZOI, Broker, enqueue_run, ok, scripted_config, zoi


@pytest.fixture
def queue_and_broker(tmp_path: Path):
    config = scripted_config(tmp_path)
    from zero_one_instruction.config import load_config

    run = create_or_open(tmp_path / "run", load_config(config), 0, 10, 10)
    broker = Broker(run.path)
    yield chunk_queue(broker.client, run), run
    broker.close()


def _abandoned_job(queue, job_id: str = "zoi-test-chunk") -> Job:
    """A job that a worker started and then died on: started, with an expired heartbeat."""
    job = queue.enqueue(CHUNK_FUNCTION, "key", 0, 10, job_id=job_id, retry=Retry(max=3))
    queue.connection.lrem(queue.key, 1, job.id)
    job.set_status(JobStatus.STARTED)
    queue.connection.zadd(queue.started_job_registry.key, {f"{job.id}:exec1": time.time() - 5})
    return job


def test_two_janitors_at_once_queue_an_abandoned_chunk_once(queue_and_broker) -> None:
    queue, _ = queue_and_broker
    job = _abandoned_job(queue)
    janitors = [Janitor(queue, ttl=1) for _ in range(4)]
    threads = [threading.Thread(target=j.sweep) for j in janitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert queue.connection.lrange(queue.key, 0, -1) == [job.id.encode()]
    again = Job.fetch(job.id, connection=queue.connection, serializer=queue.serializer)
    assert again.get_status() == JobStatus.QUEUED
    assert again.retries_left == 3, "a dead worker must not cost the chunk a retry"
    assert again.meta["abandoned"] == 1


def test_a_chunk_abandoned_too_often_spends_its_retries(queue_and_broker) -> None:
    queue, _ = queue_and_broker
    job = _abandoned_job(queue)
    job.meta["abandoned"] = MAX_ABANDONED
    job.save_meta()
    Janitor(queue, ttl=1).sweep()
    again = Job.fetch(job.id, connection=queue.connection, serializer=queue.serializer)
    assert again.retries_left == 2  # RQ's cleanup retried it, spending one


def test_a_killed_janitor_blocks_the_others_for_a_heartbeat_ttl_only(queue_and_broker) -> None:
    """Every worker's RQ maintenance waits for the janitor lock: one left by a janitor killed
    mid-sweep must expire with the dead worker's chunks, not a minute later."""
    queue, _ = queue_and_broker
    with Janitor(queue, ttl=7).exclusive() as held:
        assert held
        left = queue.connection.pttl(f"zoi:janitor:{queue.name}")
        with Janitor(queue, ttl=7).exclusive() as second:
            assert not second, "two janitors held the lock at once"
    assert 0 < left <= 7000


def test_stranded_after_dequeue_goes_back_after_a_ttl(queue_and_broker) -> None:
    queue, _ = queue_and_broker
    job = queue.enqueue(CHUNK_FUNCTION, "key", 0, 10, job_id="zoi-stranded")
    queue.connection.lmove(queue.key, queue.intermediate_queue_key)  # a worker died right here
    poison = "zoi-poison"
    queue.connection.rpush(queue.intermediate_queue_key, poison)  # no job hash at all
    janitor = Janitor(queue, ttl=0.3)
    janitor.sweep()
    assert queue.connection.llen(queue.key) == 0  # too early: maybe a live worker's
    time.sleep(0.4)
    janitor.sweep()
    assert queue.connection.lrange(queue.key, 0, -1) == [job.id.encode()]
    assert queue.connection.llen(queue.intermediate_queue_key) == 0
    assert not janitor.busy()


def test_dead_engine_stops_the_worker_and_its_chunk_is_retried(tmp_path: Path) -> None:
    config = tmp_path / "dead.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.scripted_engine:ScriptedEngine'\n"
        "prompts: {file: p.txt}\nengine_kwargs: {rules: {dead: {flatten: '!dead'}}}\n",
        encoding="utf-8",
    )
    (tmp_path / "p.txt").write_text("case=dead\n", encoding="utf-8")
    run = tmp_path / "run"
    ok("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "4")
    done = subprocess.run(
        [ZOI, "worker", "--run", str(run), "--burst"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "zoi: error: engine failed" in done.stderr
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["chunks"]["queued"] == 1, "the chunk went back to the queue for a retry"
    merge = zoi("merge", "--run", str(run), "-o", str(tmp_path / "o.jsonl"))
    assert merge.returncode == 1 and "[0, 4)" in merge.stderr


def test_burst_worker_reports_chunks_that_ran_out_of_retries(tmp_path: Path) -> None:
    config = tmp_path / "bug.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.scripted_engine:ScriptedEngine'\n"
        "prompts: {file: p.txt}\nengine_kwargs: {rules: {bug: {depth: '!raise'}}}\n",
        encoding="utf-8",
    )
    (tmp_path / "p.txt").write_text("case=ok\ncase=bug\n", encoding="utf-8")
    run = tmp_path / "run"
    enqueue_run(config, run, 4, 1, "--retries", "0")
    done = subprocess.run(
        [ZOI, "worker", "--run", str(run), "--burst"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "2 chunks failed after all their retries" in done.stderr
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert (state["chunks"]["done"], state["chunks"]["failed"]) == (2, 2)


def test_a_worker_started_after_another_died_takes_no_retry_of_its_chunk(tmp_path: Path) -> None:
    """RQ's maintenance at a worker's start retries expired chunks, spending a retry on each,
    before the worker's first janitor sweep; a worker restarted after a crash must let its
    janitor put the dead worker's chunk back first. The janitor here sweeps only after 30 s,
    so only the worker's start can have put the chunk back."""
    run_path = tmp_path / "run"
    enqueue_run(scripted_config(tmp_path), run_path, 4, 4)
    broker = Broker(run_path)
    try:
        queue = chunk_queue(broker.client, open_run(run_path))
        (job_id,) = queue.get_job_ids()
        job = Job.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
        queue.connection.lrem(queue.key, 1, job.id)  # a worker took it, started it and died
        job.set_status(JobStatus.STARTED)
        expired = time.time() - 5
        queue.connection.zadd(queue.started_job_registry.key, {f"{job.id}:dead": expired})
        done = zoi("worker", "--run", str(run_path), "--burst", "--heartbeat", "30", timeout=120)
        assert done.returncode == 0, done.stderr
        again = Job.fetch(job.id, connection=queue.connection, serializer=queue.serializer)
        assert again.get_status() == JobStatus.FINISHED
        assert again.retries_left == 3, "a dead worker must not cost the chunk a retry"
        assert again.meta["abandoned"] == 1
    finally:
        broker.close()


class _BrokenJanitor:
    """A janitor whose lock is free and whose sweep fails, as one on an unreadable chunk."""

    swept = 0

    @contextlib.contextmanager
    def exclusive(self, wait: float = 0.0) -> Iterator[bool]:
        yield True

    def sweep_held(self) -> None:
        self.swept += 1
        raise ValueError("a registry entry no chunk can be read from")


def test_a_failing_sweep_before_rqs_maintenance_does_not_stop_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RQ's main loop ends the worker on an exception from its maintenance; the janitor's
    sweep there must fail as it does in the heartbeat thread: logged, tried again next time,
    and RQ's cleanup (which would spend retries) left out this time. The worker stands in
    as a bare object: reaching RQ's own cleanup would raise TypeError here."""
    janitor = _BrokenJanitor()
    worker = types.SimpleNamespace(janitors=[janitor])
    with caplog.at_level(logging.ERROR, logger="zero_one_instruction.worker"):
        ChunkWorker.clean_registries(worker)  # type: ignore[arg-type]
    assert janitor.swept == 1
    assert "janitor sweep before RQ's maintenance failed" in caplog.text

"""Whoever can write to the queue: jobs with webhooks, forged chunk ranges and foreign failed
jobs must make workers send nothing, write no shard outside the run's grid, and leave the
run's own accounting of failures alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from zero_one_instruction.jobs import CHUNK_FUNCTION, chunk_queue
from zero_one_instruction.launcher import REENQUEUE_ROUNDS, Launcher
from zero_one_instruction.rundir import open_run

from .queue_helpers import Broker, done_chunks, enqueue_run, ok, scripted_config, stop, worker

N, CHUNK = 40, 10
FORGED_RANGES: list[tuple[Any, Any]] = [
    (100, 101),  # outside the run
    (30, 31),  # inside, but not as long as the grid makes it
    (5, 15),  # off the grid
    (35, 40),  # off the grid, ending at the run's end
    (40, 50),  # just past the end
    (-10, 0),  # before the start
    (0.0, 10.0),  # the right numbers as JSON floats
    ("0", "10"),  # and as strings
    (True, 10),  # a bool is no index
]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """config, run dir (enqueued), and the reference output of `zoi generate`."""
    config = scripted_config(tmp_path, delay=0.005)
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(reference))
    run = tmp_path / "run"
    enqueue_run(config, run, N, CHUNK)
    return config, run, reference


@contextmanager
def listener() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request it gets; webhooks must never reach it."""
    received: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def _record(self) -> None:
            received.append(f"{self.command} {self.path}")
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST = _record

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _hooks(url: str) -> list[Webhook]:
    return [
        Webhook(url + "-finished", "finished"),
        Webhook(url + "-failed", "failed", method="POST"),
    ]


def test_queue_writers_make_workers_send_nothing_and_write_no_foreign_shard(
    setup, tmp_path: Path
) -> None:
    _, run, reference = setup
    key = open_run(run).key
    grid = {f"{s:010d}-{min(s + CHUNK, N):010d}" for s in range(0, N, CHUNK)}
    broker = Broker(run)
    try:
        with listener() as (url, received):
            queue = Queue(
                open_run(run).queue_name, connection=broker.client, serializer=JSONSerializer
            )
            hooks = _hooks(url)
            queue.enqueue("os.system", "true", job_id="hostile-1", webhooks=hooks)
            forged = [
                queue.enqueue(
                    CHUNK_FUNCTION,
                    key,
                    start,
                    end,
                    job_id=f"forged-{n}",
                    webhooks=hooks,
                    retry=Retry(max=3),
                )
                for n, (start, end) in enumerate(FORGED_RANGES)
            ]
            forged.append(
                queue.enqueue(CHUNK_FUNCTION, key, 0, CHUNK, job_id="forged-name", webhooks=hooks)
            )
            queue.enqueue(CHUNK_FUNCTION, key, 0, CHUNK, 1, job_id="forged-args", webhooks=hooks)
            hooked = Job.fetch(
                f"zoi-{key}-{min(grid)}", connection=broker.client, serializer=JSONSerializer
            )
            hooked.webhooks = hooks  # a real chunk job, given webhooks after it was enqueued
            hooked.save()
            proc = worker(run, "--burst")
            assert proc.wait(timeout=120) == 0, stop(proc)
            assert received == [], "a worker sent a webhook"
        for job in forged:
            job.refresh()
            assert job.get_status() == "failed", job.args
            assert "refused" in (job.latest_result().exc_string or ""), job.args
            assert job.retries_left == 0, "a refused job was retried"
    finally:
        broker.close()
    assert done_chunks(run) == grid, "a shard outside the run's grid was written"
    out = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(out))
    assert out.read_bytes() == reference.read_bytes()


def _fail_foreign_jobs(run: Path, broker: Broker) -> None:
    """Jobs that are not the run's chunk jobs, some named like them, failed by a worker."""
    key = open_run(run).key
    queue = Queue(open_run(run).queue_name, connection=broker.client, serializer=JSONSerializer)
    for job_id in (f"zoi-{key}-0000000100-0000000101", f"zoi-{key}-x", "hostile-2"):
        queue.enqueue("os.system", "true", job_id=job_id)
    worker(run, "--burst").communicate(timeout=120)
    assert len(done_chunks(run)) == N // CHUNK
    assert chunk_queue(broker.client, open_run(run)).failed_job_registry.count == 3


def test_foreign_failed_jobs_do_not_fail_a_burst_worker(setup) -> None:
    _, run, _ = setup
    broker = Broker(run)
    try:
        _fail_foreign_jobs(run, broker)
        again = worker(run, "--burst")
        _, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
    finally:
        broker.close()


def test_foreign_failed_jobs_are_not_chunks_that_keep_failing(setup) -> None:
    """The launcher's check for chunks that ran out of retries, after its last round: foreign
    failed jobs are not its chunks, so its reconciliation neither gives up nor queues them."""
    _, run, _ = setup
    broker = Broker(run)
    try:
        _fail_foreign_jobs(run, broker)
        events: list[str] = []
        launcher = Launcher(open_run(run), broker.client, "", [], events.append, lambda _: None)
        launcher.rounds = REENQUEUE_ROUNDS  # one more failing chunk would end the run
        assert launcher._failed_chunks() == []
        launcher._reconcile()  # raises LaunchError if it takes them for the run's chunks
        assert launcher.rounds == REENQUEUE_ROUNDS and events == [], events
    finally:
        broker.close()

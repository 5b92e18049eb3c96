"""RQ's insides that zoi relies on, pinned to the installed RQ on a real (embedded) Valkey.

`zero_one_instruction/rqinternals.py` is the only module that reaches inside RQ. Each test
here fails naming the private member, hook or piece of Redis layout that changed, so an RQ
upgrade says what to look at instead of breaking workers in odd ways.
"""

from __future__ import annotations

import inspect
import math
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import rq
from rq import Callback
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker

from zero_one_instruction import rqinternals
from zero_one_instruction.config import load_config
from zero_one_instruction.embeddedredis import embedded, release
from zero_one_instruction.jobs import CHUNK_FUNCTION, ChunkJob, chunk_queue
from zero_one_instruction.producer import enqueue
from zero_one_instruction.rqinternals import StoppableWorker
from zero_one_instruction.rundir import Run, create_or_open

from .queue_helpers import scripted_config

ROOT = Path(__file__).resolve().parent.parent

# (class, member, its parameters, who in zoi relies on it). Public names, most of them, but
# hooks RQ does not document: ChunkWorker overrides or calls them.
HOOKS: list[tuple[type, str, list[str], str]] = [
    (SimpleWorker, "_shutdown", ["self"], "rqinternals.StoppableWorker overrides it"),
    (SimpleWorker, "request_stop", ["self", "signum", "frame"], "RQ's warm-stop handler"),
    (SimpleWorker, "set_shutdown_requested_date", ["self"], "StoppableWorker._shutdown"),
    (SimpleWorker, "execute_job", ["self", "job", "queue"], "ChunkWorker overrides it"),
    (SimpleWorker, "prepare_execution", ["self", "job"], "ChunkWorker.execute_job"),
    (SimpleWorker, "perform_job", ["self", "job", "queue", "execution"], "ChunkWorker._perform"),
    (SimpleWorker, "maintain_heartbeats", ["self", "job", "execution"], "the heartbeat thread"),
    (SimpleWorker, "heartbeat", ["self", "timeout", "pipeline"], "the heartbeat thread"),
    (SimpleWorker, "get_heartbeat_ttl", ["self", "job", "working_time"], "ChunkWorker"),
    (
        SimpleWorker,
        "dequeue_job_and_maintain_ttl",
        ["self", "timeout", "max_idle_time"],
        "ChunkWorker overrides it",
    ),
    (SimpleWorker, "teardown", ["self"], "ChunkWorker overrides it"),
    (SimpleWorker, "clean_registries", ["self"], "ChunkWorker overrides it: janitors first"),
    (BaseDeathPenalty, "setup_death_penalty", ["self"], "worker._NoDeathPenalty"),
    (BaseDeathPenalty, "cancel_death_penalty", ["self"], "worker._NoDeathPenalty"),
    (Job, "perform", ["self"], "ChunkJob overrides it"),
    (Job, "restore", ["self", "raw_data"], "ChunkJob overrides it"),
    (Job, "send_webhooks", ["self", "status", "exc_string"], "ChunkJob overrides it"),
    (Queue, "push_job_id", ["self", "job_id", "pipeline", "at_front"], "requeue_started"),
]
JOB_PROPERTIES = ["func", "success_callback", "failure_callback", "stopped_callback"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _rq_pin() -> tuple[str, str]:
    """The bounds of the `rq` requirement in pyproject.toml (`"rq>=A,<B"`)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pins = re.findall(r'"rq>=([\d.]+),<([\d.]+)"', text)
    assert len(pins) == 1, "pyproject.toml should pin rq as a range of one major: rq>=A,<B"
    return pins[0]


def test_installed_rq_is_within_the_pin_these_internals_were_read_from() -> None:
    low, high = _rq_pin()
    for what, version in (("installed RQ", rq.__version__), ("RQ_CHECKED", rqinternals.RQ_CHECKED)):
        assert _version(low) <= _version(version) < _version(high), (
            f"{what} {version} is outside pyproject's pin rq>={low},<{high}"
        )


@pytest.mark.parametrize(
    ("owner", "name", "params", "user"), HOOKS, ids=[f"{o.__name__}.{n}" for o, n, _, _ in HOOKS]
)
def test_rq_hooks_keep_their_signatures(
    owner: type, name: str, params: list[str], user: str
) -> None:
    member = getattr(owner, name, None)
    assert callable(member), f"RQ {rq.__version__} has no {owner.__name__}.{name} ({user})"
    found = list(inspect.signature(member).parameters)
    assert found == params, (
        f"RQ {rq.__version__} changed {owner.__name__}.{name}{inspect.signature(member)}; "
        f"zoi expects ({', '.join(params)}): {user}"
    )


def test_rq_work_loop_takes_the_keywords_the_worker_passes() -> None:
    params = inspect.signature(SimpleWorker.work).parameters
    for name in ("burst", "logging_level", "with_scheduler"):
        assert name in params, f"RQ {rq.__version__}: SimpleWorker.work has no {name}="


def test_job_members_chunk_job_overrides_are_properties() -> None:
    for name in JOB_PROPERTIES:
        assert isinstance(inspect.getattr_static(Job, name, None), property), (
            f"RQ {rq.__version__}: Job.{name} is no longer a property; ChunkJob overrides it"
        )


def test_rq_statuses_are_the_strings_zoi_compares() -> None:
    """The producer's ACTIVE set and the janitor's Lua script compare raw status strings."""
    expected = {"QUEUED": "queued", "STARTED": "started", "SCHEDULED": "scheduled"}
    for member, value in {**expected, "DEFERRED": "deferred"}.items():
        assert getattr(JobStatus, member).value == value, f"JobStatus.{member} is not {value!r}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[Run, redis.Redis]]:
    """A run of two chunks and a client of its embedded server."""
    run = create_or_open(tmp_path / "run", load_config(scripted_config(tmp_path)), 0, 20, 10)
    client = embedded(run.path, "test")
    try:
        yield run, client
    finally:
        release(client, run.path)


def _worker(queue: Queue, cls: type[StoppableWorker] = StoppableWorker) -> StoppableWorker:
    return cls([queue], connection=queue.connection, job_class=ChunkJob, serializer=JSONSerializer)


def _keeping_signal_handlers(action: Callable[[], Any]) -> Any:
    """RQ installs its own SIGINT/SIGTERM handlers; pytest's must come back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return action()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_rq_signal_handler_reaches_the_warm_stop_step(broker) -> None:
    run, client = broker
    worker = _worker(chunk_queue(client, run))
    assert worker._stop_requested is False, "RQ's worker has no _stop_requested flag"
    with pytest.raises(StopRequested):
        _keeping_signal_handlers(lambda: worker.request_stop(signal.SIGTERM, None))
    assert worker.stop_requested, "RQ's request_stop no longer goes through _shutdown"

    class Busy(StoppableWorker):
        def stop_at_once(self) -> bool:
            return False

    busy = _worker(chunk_queue(client, run), Busy)
    _keeping_signal_handlers(lambda: busy.request_stop(signal.SIGTERM, None))
    assert busy.stop_requested


def test_rq_work_loop_honours_a_stop_request_and_leave_loop(broker) -> None:
    run, client = broker
    queue = chunk_queue(client, run)
    enqueue(client, run)
    ids = queue.get_job_ids()
    stopped = _worker(queue)
    stopped.ask_to_stop()
    worked = _keeping_signal_handlers(lambda: stopped.work(burst=True, logging_level="WARNING"))
    assert not worked and queue.get_job_ids() == ids, "RQ's loop ignores _stop_requested"

    class Leaving(StoppableWorker):
        def execute_job(self, job: Job, queue: Queue) -> None:
            self.leave_loop()

    leaving = _worker(queue, Leaving)
    worked = _keeping_signal_handlers(lambda: leaving.work(burst=True, logging_level="WARNING"))
    assert not worked and queue.get_job_ids() == ids[1:], (
        "RQ's loop does not end on StopRequested raised by execute_job"
    )


def test_rq_tears_down_in_the_finally_of_its_loop_with_a_cold_stop_in_flight(broker) -> None:
    """ChunkWorker's teardown abandons the chunks in hand on a cold stop and waits for them on
    a warm one; it tells them apart by the SystemExit RQ's loop lets through to its
    `finally`. Were RQ to catch it, or tear down elsewhere, a worker whose launcher died
    would wait for its chunks again."""
    run, client = broker
    queue = chunk_queue(client, run)
    enqueue(client, run)

    seen: list[bool] = []

    class Recording(StoppableWorker):
        def teardown(self) -> None:
            seen.append(self.cold_stopping())
            super().teardown()

    class Killed(Recording):
        def dequeue_job_and_maintain_ttl(
            self, timeout: int | None, max_idle_time: int | None = None
        ) -> Any:
            raise SystemExit(1)  # as the launcher's death or RQ's second signal raises it

    with pytest.raises(SystemExit):
        _keeping_signal_handlers(
            lambda: _worker(queue, Killed).work(burst=True, logging_level="WARNING")
        )
    assert seen == [True], "RQ no longer tears down with the SystemExit in flight"
    stopped = _worker(queue, Recording)
    stopped.ask_to_stop()
    _keeping_signal_handlers(lambda: stopped.work(burst=True, logging_level="WARNING"))
    assert seen == [True, False], "a warm stop reads as a cold one"
    assert not StoppableWorker.cold_stopping()


def test_job_callback_names_are_where_rqinternals_reads_them(broker) -> None:
    run, client = broker
    queue = chunk_queue(client, run)
    job = queue.enqueue(
        CHUNK_FUNCTION,
        run.key,
        0,
        10,
        job_id="callbacks",
        on_success=Callback("os.getcwd"),
        on_failure=Callback("os.getpid"),
        on_stopped=Callback("os.getppid"),
    )
    again = ChunkJob.fetch(job.id, connection=client, serializer=JSONSerializer)
    assert rqinternals.callback_names(again) == {
        "success": "os.getcwd",
        "failure": "os.getpid",
        "stopped": "os.getppid",
    }, "RQ keeps a job's callback names elsewhere than _<kind>_callback_name"


def test_redis_layout_is_what_rq_writes_for_a_real_chunk_job(broker) -> None:
    """The producer enqueues the run's two chunks; a worker dequeues and starts the first, as
    RQ's own loop does; rqinternals then reads and moves them through RQ's keys."""
    run, client = broker
    queue = chunk_queue(client, run)
    enqueue(client, run)
    first, second = (run.job_id(chunk) for chunk in run.chunks())
    statuses = rqinternals.job_statuses(client, [first, second, "zoi-no-such-job"])
    assert statuses == ["queued", "queued", None], (
        "RQ no longer keeps a job's status in the 'status' field of the hash Job.key_for(id)"
    )

    worker = _worker(queue)
    job = _dequeue(worker, first)
    assert rqinternals.intermediate_job_ids(queue) == {first}, (
        "RQ's dequeue no longer parks a job on the list Queue.intermediate_queue_key"
    )
    assert rqinternals.intermediate_count(queue) == 1
    assert rqinternals.requeue_stranded(queue, first), (
        "a queued job stranded after dequeue did not go back: RQ changed the job hash "
        "('status', 'data') or the intermediate list's name"
    )
    assert queue.get_job_ids() == [first, second], "a stranded job goes back to the front"
    assert rqinternals.intermediate_count(queue) == 0

    job = _dequeue(worker, first)
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    assert rqinternals.job_statuses(client, [first]) == ["started"]
    entry = f"{first}:{execution.id}".encode()
    assert rqinternals.expired_executions(queue, math.inf) == [(entry, first)], (
        "RQ's started registry no longer holds '<job id>:<execution id>' scored by deadline"
    )
    assert rqinternals.expired_executions(queue, time.time()) == [], "a live deadline expired"
    assert rqinternals.expire_worker_executions(queue, worker.name[:-1]) == 1, (
        "RQ no longer names the worker that started a job in its hash field 'worker_name'"
    )
    assert rqinternals.expired_executions(queue, time.time()) == [(entry, first)]

    job.meta["abandoned"] = 1
    rqinternals.requeue_started(queue, job, entry)
    assert queue.get_job_ids() == [first, second], "a started job goes back to the front"
    assert queue.started_job_registry.get_job_ids(cleanup=False) == []
    again = ChunkJob.fetch(first, connection=client, serializer=JSONSerializer)
    assert again.get_status() == JobStatus.QUEUED and again.meta == {"abandoned": 1}, (
        "RQ no longer reads a job's meta from the hash field 'meta'"
    )
    assert again.retries_left == 3 and again.args == [run.key, 0, 10]

    rqinternals.delete_job_hash(client, second)
    assert not ChunkJob.exists(second, connection=client), "a job hash is not Job.key_for(id)"


def _dequeue(worker: StoppableWorker, expected: str) -> Job:
    result = worker.dequeue_job_and_maintain_ttl(None)
    assert result is not None and result[0].id == expected
    return result[0]

"""Every place zoi reaches inside RQ, in one module.

RQ's public API enqueues jobs, runs them one at a time, and cleans its registries. zoi needs a
few things it does not offer, and reaches for RQ's private attributes and its layout in Redis
to get them. Only this module does that, so an RQ upgrade has one place to check, and
tests/test_rqinternals.py pins each touch to the installed RQ (the pyproject pin is
`rq>=3.0,<4`; these were read from RQ 3.0.0):

- the worker's stop protocol (`_shutdown`, `_stop_requested`, `StopRequested`): a worker that
  runs chunks in threads must take a warm stop without being interrupted while it hands a
  chunk to its thread, and must leave RQ's loop when its engine died; and its teardown, which
  RQ calls in the `finally` of its loop, must tell a cold stop (a SystemExit in flight) from
  a warm one;
- a job's callback names (`_success_callback_name` and the others): a chunk job runs no
  callback, and says which one it ignored;
- job hash fields (`status`, `worker_name`, `meta`, `data` of `rq:job:<id>`): the producer and
  `zoi status` read thousands of statuses in one pipeline, where fetching each job would
  deserialize it and RQ's registry counts would run cleanups;
- the started-job registry (a sorted set of `<job id>:<execution id>` scored by heartbeat
  deadline): the janitor returns a dead worker's chunk to the queue without spending a retry,
  which RQ's cleanup does not offer;
- the intermediate list (`<queue key>:intermediate`, where RQ's dequeue moves a job before it
  starts) and a Lua script over it: a job stranded there by a worker killed right after its
  dequeue goes back to the queue after one heartbeat TTL, not RQ's minute.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import redis
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.worker import SimpleWorker

RQ_CHECKED = "3.0.0"  # the RQ release these touches were read from
STATUS_BATCH = 1000  # job statuses read per pipeline


# --- the worker's stop protocol ------------------------------------------------------------
class StoppableWorker(SimpleWorker):
    """A SimpleWorker whose warm stop its subclass shapes through public names.

    RQ's signal handler `request_stop` calls the private `_shutdown`, which stops at once
    (raises `StopRequested` out of the handler) unless the worker is BUSY, and otherwise sets
    `_stop_requested`, which the work loop reads before each dequeue. A worker that runs jobs
    in threads is not BUSY while it dequeues with jobs in hand, and must not be interrupted
    while it hands a job to its thread: `stop_at_once` decides instead."""

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for: RQ's loop takes no further job."""
        return self._stop_requested

    def ask_to_stop(self) -> None:
        """Take no further job: RQ's loop breaks before its next dequeue."""
        self._stop_requested = True

    def leave_loop(self) -> NoReturn:
        """Leave RQ's work loop now, from inside it (a hook such as `execute_job`): the loop
        catches `StopRequested`, breaks and tears the worker down."""
        raise StopRequested()

    def stop_at_once(self) -> bool:
        """Whether a warm stop may leave the loop from the signal handler, right now."""
        return True

    @staticmethod
    def cold_stopping() -> bool:
        """Whether the worker is leaving on a cold stop, asked from its `teardown`: RQ's loop
        lets a SystemExit through (its second signal's, or one a handler of ours raised) and
        tears the worker down in its `finally`, where that exception is still in flight."""
        return isinstance(sys.exc_info()[1], SystemExit)

    def _shutdown(self) -> None:
        """RQ's warm-stop step: always remember the stop, and leave at once if allowed."""
        self.ask_to_stop()
        self.set_shutdown_requested_date()
        if self.stop_at_once():
            self.leave_loop()


# --- a job's callbacks ---------------------------------------------------------------------
def callback_names(job: Job) -> dict[str, str | None]:
    """The dotted names of the callbacks a job carries, by kind, never imported: RQ's public
    properties import them."""
    return {
        "success": job._success_callback_name,
        "failure": job._failure_callback_name,
        "stopped": job._stopped_callback_name,
    }


# --- job hashes ------------------------------------------------------------------------------
def job_statuses(connection: redis.Redis, job_ids: list[str]) -> list[str | None]:
    """Each job's status as its hash stores it, `None` where there is no job: pipelined
    reads, no deserialization, no registry cleanup."""
    statuses: list[str | None] = []
    for offset in range(0, len(job_ids), STATUS_BATCH):
        with connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids[offset : offset + STATUS_BATCH]:
                pipe.hget(Job.key_for(job_id), "status")
            statuses += [s.decode() if s else None for s in pipe.execute()]
    return statuses


def delete_job_hash(connection: redis.Redis, job_id: str) -> None:
    """Remove a job's hash that no job can be read from (half-written, or foreign), which
    `Job.delete` cannot fetch first."""
    connection.delete(Job.key_for(job_id))


# --- the started-job registry --------------------------------------------------------------
def expired_executions(queue: Queue, until: float) -> list[tuple[bytes, str]]:
    """(registry entry, job id) of the executions whose heartbeat deadline is before `until`.
    RQ's `get_expired_job_ids` drops the execution part, which removing one entry needs."""
    entries = queue.connection.zrangebyscore(queue.started_job_registry.key, 0, until)
    return [(entry, _job_id_of(entry)) for entry in entries]


def _job_id_of(entry: bytes) -> str:
    return entry.decode().split(":", 1)[0]


def requeue_started(queue: Queue, job: Job, entry: bytes) -> None:
    """Put a started job back at the front of its queue, with its meta, in one transaction
    and without spending a retry: RQ's cleanup would spend one (`Job.retry`)."""
    with queue.connection.pipeline() as pipe:
        pipe.zrem(queue.started_job_registry.key, entry)
        job.set_status(JobStatus.QUEUED, pipeline=pipe)
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        queue.push_job_id(job.id, pipeline=pipe, at_front=True)
        pipe.execute()


def expire_worker_executions(queue: Queue, name_prefix: str) -> int:
    """Make the executions of a worker known to be dead (its name starts with `name_prefix`)
    expire now, not after their heartbeat TTL; how many there were. The job hash names the
    worker that started it (RQ's `worker_name` field)."""
    connection, key = queue.connection, queue.started_job_registry.key
    dead = []
    for entry in connection.zrange(key, 0, -1):
        owner = connection.hget(Job.key_for(_job_id_of(entry)), "worker_name")
        if owner is not None and owner.decode().startswith(name_prefix):
            dead.append(entry)
    if dead:
        connection.zadd(key, dict.fromkeys(dead, 0))
    return len(dead)


# --- the intermediate list -----------------------------------------------------------------
# Atomically take a job off the intermediate list, and put it back on the queue only if it
# never started: otherwise its registry entry (and the registry cleanup) accounts for it.
_REQUEUE_STRANDED = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  if redis.call('HGET', KEYS[3], 'status') == 'queued'
     and redis.call('HEXISTS', KEYS[3], 'data') == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[1])
    return 1
  end
end
return 0
"""


def intermediate_job_ids(queue: Queue) -> set[str]:
    """Jobs RQ's dequeue took off the queue whose start has not yet removed them."""
    return set(queue.intermediate_queue.get_job_ids())


def intermediate_count(queue: Queue) -> int:
    """How many jobs are between RQ's dequeue and their start."""
    return int(queue.connection.llen(queue.intermediate_queue_key))


def requeue_stranded(queue: Queue, job_id: str) -> bool:
    """Take a job off the intermediate list; put it back at the front of the queue if it
    never started (a whole job hash, still queued). Whether it went back."""
    script = queue.connection.register_script(_REQUEUE_STRANDED)
    keys = [queue.intermediate_queue_key, queue.key, Job.key_for(job_id)]
    return bool(script(keys=keys, args=[job_id]))

"""The janitor: returns the chunks of dead workers to the queue, quickly.

RQ notices an abandoned job only when someone cleans its started-job registry, and a job
stranded between dequeue and start only after a minute. Every worker runs a janitor between
heartbeats, and so does the `zoi run` launcher, so a dead worker's chunks come back within
about a heartbeat TTL plus one sweep interval. RQ's own maintenance, which would spend a retry
on each of them, runs in a worker under the janitor's lock and after its sweep
(`ChunkWorker.clean_registries`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from redis.exceptions import LockError
from rq.job import Job, JobStatus
from rq.queue import Queue

from . import rqinternals

log = logging.getLogger(__name__)
MAX_ABANDONED = 10
MIN_LOCK_SECONDS = 5.0  # a live sweep on a loaded machine keeps its lock at least this long


def _fetch(queue: Queue, job_id: str) -> Job | None:
    try:
        return queue.job_class.fetch(
            job_id, connection=queue.connection, serializer=queue.serializer
        )
    except Exception:  # vanished, or a hash no job can be read from
        return None


class Janitor:
    def __init__(
        self, queue: Queue, ttl: float, ours: Callable[[], list[str]] = lambda: []
    ) -> None:
        """`ttl`: how long a job may sit between dequeue and start; `ours`: job ids the
        caller is running itself, never stranded."""
        self.queue, self.ttl, self.ours = queue, ttl, ours
        self._first_seen: dict[str, float] = {}

    @contextlib.contextmanager
    def exclusive(self, wait: float = 0.0) -> Iterator[bool]:
        """The queue's janitor lock, held by one janitor (or one RQ maintenance) at a time,
        waiting up to `wait` seconds for it; yields whether it is held. RQ's registry cleanup
        reads a job and then retries it, so two cleanups at once would put an abandoned chunk
        on the queue twice. A janitor killed while it holds the lock holds it for a heartbeat
        TTL, as long as a dead worker holds its chunks, not longer: every worker's maintenance
        waits for it."""
        lock = self.queue.connection.lock(
            f"zoi:janitor:{self.queue.name}",
            timeout=max(self.ttl, MIN_LOCK_SECONDS),
            blocking=wait > 0,
            blocking_timeout=wait if wait > 0 else None,
        )
        held = lock.acquire()
        try:
            yield held
        finally:
            if held:
                with contextlib.suppress(LockError):
                    lock.release()

    def sweep(self) -> None:
        """One sweep, unless another janitor is sweeping right now."""
        with self.exclusive() as held:
            if held:
                self.sweep_held()

    def sweep_held(self) -> None:
        """One sweep, by the holder of `exclusive`: the dead workers' chunks go back without
        spending a retry before RQ's cleanup, which would spend one, sees them."""
        self._requeue_abandoned()
        self.queue.started_job_registry.cleanup()
        self._sweep_intermediate()

    def _requeue_abandoned(self) -> None:
        """Put chunks whose worker died back at the front of the queue without spending a
        retry: a killed or preempted worker is not the chunk's fault, and a few crashes
        would otherwise exhaust its retries. A chunk abandoned more than MAX_ABANDONED times
        is left to RQ's own cleanup, which spends its retries and finally fails it."""
        queue = self.queue
        for entry, job_id in rqinternals.expired_executions(queue, time.time()):
            job = _fetch(queue, job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue  # RQ's cleanup drops such leftovers
            abandoned = int(job.meta.get("abandoned", 0)) + 1
            if abandoned > MAX_ABANDONED:
                continue
            job.meta["abandoned"] = abandoned
            rqinternals.requeue_started(queue, job, entry)
            log.warning("chunk job %s: its worker died; queued again (%d)", job_id, abandoned)

    def _sweep_intermediate(self) -> None:
        """A worker killed between RQ's dequeue and the job's start leaves the job on the
        intermediate list. One that stays a whole TTL, neither started nor ours, goes back to
        the front of the queue if it never started."""
        queue, now = self.queue, time.monotonic()
        present = rqinternals.intermediate_job_ids(queue)
        started = set(queue.started_job_registry.get_job_ids(cleanup=False))
        suspects = present - started - set(self.ours())
        self._first_seen = {j: self._first_seen.get(j, now) for j in suspects}
        for job_id, since in list(self._first_seen.items()):
            if now - since < self.ttl:
                continue
            moved = rqinternals.requeue_stranded(queue, job_id)
            log.warning(
                "job %s was stranded after dequeue; %s",
                job_id,
                "queued again" if moved else "dropped from the intermediate list",
            )
            del self._first_seen[job_id]

    def release_worker(self, name_prefix: str) -> int:
        """Treat a worker known to be dead (its name starts with `name_prefix`) as abandoned
        now, rather than after its heartbeat TTL: its chunks go back to the queue (through
        their retries) at once."""
        released = rqinternals.expire_worker_executions(self.queue, name_prefix)
        if released:
            self.sweep()
        return released

    def busy(self) -> bool:
        """Whether any chunk is running or stranded: a burst worker must not leave yet."""
        queue = self.queue
        return bool(
            queue.started_job_registry.get_job_count(cleanup=False)
            or rqinternals.intermediate_count(queue)
        )

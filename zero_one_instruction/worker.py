"""The worker: one engine for the process's whole life, chunks from the queue, shards on disk.

Three kinds of threads share the process:

- The engine loop thread runs one asyncio loop (`enginehost`). The engine lives on it, and
  every record of every chunk is evolved there. A global limit on records in flight keeps the
  engine's batch full, and it is shared by all chunks.
- A job thread per chunk runs RQ's own `perform_job` (status, retries, registries) around the
  chunk runner (`runner`), bound to the job. The runner hands the chunk to the loop and
  writes the shard when it is done.
- The main thread is RQ's work loop. It takes the next chunk as soon as every record of the
  current one has started, so the next chunk's records fill the engine while the current
  chunk's last records finish. The chunk boundary no longer leaves the engine idle.

A heartbeat thread keeps every running chunk alive in Redis; a plain SimpleWorker sends none,
so a long chunk would be declared abandoned and run twice. The same thread also runs the
janitor, which returns chunks of dead workers to the queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.worker import WorkerStatus

from . import shards
from .enginehost import EngineHost
from .engines.base import EngineDead
from .errors import ZoiError
from .janitor import Janitor
from .jobs import ChunkJob, chunk_queue, failed_chunks
from .liveprogress import EndpointGauge, LiveBoard
from .merger import describe_ranges, index_ranges
from .policy import HEARTBEAT_SECONDS, SWEEP_SECONDS, default_heartbeat_ttl
from .rqinternals import StoppableWorker
from .rundir import Run
from .runner import ChunkRunner

log = logging.getLogger(__name__)
MAINTENANCE_WAIT = 10.0  # seconds RQ's maintenance waits for a janitor's sweep to end


class WorkerStopped(ZoiError):
    """RQ's work loop gave up for a reason other than a stop request or an empty queue."""

    exit_code = 1


class _NoDeathPenalty(BaseDeathPenalty):
    """Chunks run in job threads, where RQ's SIGALRM timeout cannot work; the chunk runner
    enforces the job timeout itself."""

    def setup_death_penalty(self) -> None:
        return None

    def cancel_death_penalty(self) -> None:
        return None


class ChunkWorker(StoppableWorker):
    """An RQ SimpleWorker that keeps its engine, overlaps chunks, and sends heartbeats."""

    death_penalty_class = _NoDeathPenalty

    def __init__(
        self,
        queues: list[Queue],
        runner: ChunkRunner,
        heartbeat_interval: float = HEARTBEAT_SECONDS,
        heartbeat_ttl: int = 60,
        janitor_interval: float = SWEEP_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(queues, job_class=ChunkJob, serializer=JSONSerializer, **kwargs)
        self.runner = runner
        self.host = runner.host
        self.heartbeat_interval = heartbeat_interval
        # RQ stores heartbeat deadlines in whole seconds, so a deadline can be up to a second
        # early: the TTL must cover the interval plus that rounding, or a live chunk looks dead.
        self.heartbeat_ttl = max(heartbeat_ttl, math.ceil(heartbeat_interval) + 2)
        self.janitor_interval = janitor_interval
        self._active: dict[str, tuple[Job, Execution, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._beats = threading.Event()
        self._in_execute = False
        self._burst = False
        self._torn_down = False
        self.drained = False  # a burst worker found nothing left to do
        self.revive: Callable[[], None] | None = None  # restarts an embedded Redis that died
        self.janitors = [Janitor(q, self.heartbeat_ttl, self.active_jobs) for q in self.queues]

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl

    # --- running chunks in job threads -------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:
        self._in_execute = True
        try:
            execution = self.prepare_execution(job)
            started = threading.Event()
            thread = threading.Thread(
                target=self._perform,
                args=(job, queue, execution, started),
                name=f"job-{job.id}",
                daemon=True,
            )
            with self._lock:
                self._active[execution.id] = (job, execution, thread)
            thread.start()
        finally:
            self._in_execute = False
        while not started.wait(0.2):
            if not thread.is_alive() or self.stop_requested:
                break
        if self.host.dead is not None:
            self.ask_to_stop()
        if self.stop_requested:
            self.leave_loop()

    def _perform(
        self, job: ChunkJob, queue: Queue, execution: Execution, started: threading.Event
    ) -> None:
        """RQ's `perform_job` around the chunk runner, bound to this job."""
        job.bind(self.runner.for_job(job, started))
        try:
            self.perform_job(job, queue, execution)
        finally:
            started.set()
            with self._lock:
                self._active.pop(execution.id, None)

    def active_jobs(self) -> list[str]:
        with self._lock:
            return [job.id for job, _, _ in self._active.values()]

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's loop, made for one job at a time, says idle whenever it listens for the next
        job; this worker listens while its chunks run, and is busy until they end (`zoi
        status` shows it). The heartbeat says idle again once the last one has ended."""
        if state == WorkerStatus.IDLE and self.active_jobs():
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline)

    def _join_active(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [thread for _, _, thread in self._active.values()]
            threads = [thread for thread in threads if thread.ident is not None]  # started
            if not threads:
                return
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            threads[0].join(remaining if remaining is not None else 0.5)
            if deadline is not None and time.monotonic() >= deadline:
                return

    # --- stopping ------------------------------------------------------------------------
    def stop_at_once(self) -> bool:
        """Warm stop: take no new chunk; the chunks in hand finish (see `teardown`). It
        leaves the loop at once unless a chunk is being handed to its thread."""
        return not self._in_execute

    def teardown(self) -> None:
        """Leaving RQ's loop: a warm stop lets the chunks in hand finish; a cold stop (a
        SystemExit on its way out: the launcher is gone, or RQ's second Ctrl+C) abandons
        them, or a chunk whose requests wait on a server that does not answer would hold the
        worker, its engine and the embedded server for the whole retry deadline."""
        if self.cold_stopping():
            self._release_chunks()
        else:
            self._join_active()
        super().teardown()
        self._torn_down = True

    def _release_chunks(self) -> None:
        """Cold stop: abandon the chunks in hand (their jobs fail, and RQ retries them) and
        give their threads a moment to record that."""
        self.host.cancel_all()
        self._join_active(timeout=COLD_STOP_SECONDS)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """In burst mode, an empty queue is not the end while chunks are still running: a
        worker that dies returns its chunks to the queue, and someone must take them."""
        while True:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None:
                return result
            if not self._burst or not self._chunks_running():
                self.drained = self._burst
                return result
            time.sleep(min(self.janitor_interval, 1.0))

    def _chunks_running(self) -> bool:
        return bool(self.active_jobs()) or any(janitor.busy() for janitor in self.janitors)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._burst = bool(kwargs.get("burst"))
        self._beats.clear()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        self._torn_down = False
        try:
            return super().work(*args, **kwargs)
        except SystemExit:  # a cold stop before RQ's loop, whose `finally` tears down
            if not self._torn_down:
                self.teardown()
            raise
        finally:
            self._beats.set()
            beat.join(timeout=10)

    # --- heartbeats and the janitor ----------------------------------------------------
    def clean_registries(self) -> None:
        """RQ's maintenance, which its loop runs first thing and then every ten minutes,
        under the janitors' locks and after their sweeps. RQ's cleanup of the started-job
        registry retries every chunk whose heartbeat expired, spending a retry, and a fresh
        worker runs it before its first sweep: a worker started after another died (a
        restart, a replacement) would charge the dead worker's chunks a retry each, and a few
        crashes fail them. Under the lock, no janitor sweeps during RQ's cleanup either, so
        no chunk is queued twice."""
        with contextlib.ExitStack() as stack:
            for janitor in self.janitors:
                if not stack.enter_context(janitor.exclusive(wait=MAINTENANCE_WAIT)):
                    return  # a janitor that holds the lock a long time: the next loop tries again
            try:
                for janitor in self.janitors:
                    janitor.sweep_held()
            except redis.ConnectionError:
                raise  # RQ's loop handles it as it handled its own cleanup's
            except Exception:
                # Here in RQ's main loop, anything else would stop the worker, where the
                # heartbeat thread's sweep logs it and tries again: do the same, and leave
                # RQ's cleanup (which would spend the chunks' retries) for the next loop.
                log.exception("janitor sweep before RQ's maintenance failed; trying again")
                return
            super().clean_registries()

    def _heartbeat_loop(self) -> None:
        last_sweep = 0.0
        while not self._beats.wait(self.heartbeat_interval):
            try:
                with self._lock:
                    active = [(job, execution) for job, execution, _ in self._active.values()]
                for job, execution in active:
                    self.maintain_heartbeats(job, execution)
                if not active:
                    self.heartbeat()
                    if self.get_state() == WorkerStatus.BUSY:
                        self.set_state(WorkerStatus.IDLE)
                if time.monotonic() - last_sweep >= self.janitor_interval:
                    last_sweep = time.monotonic()
                    for janitor in self.janitors:
                        janitor.sweep()
            except redis.ConnectionError as exc:
                log.warning("Redis is unreachable (%s)", exc)
                if self.revive is not None:
                    self.revive()
            except Exception:  # the thread must outlive any one bad beat or sweep
                log.exception("heartbeat or janitor sweep failed; trying again")


# How long a cold stop waits for the chunks it abandoned to be handed back (their jobs
# failed, to be retried); a chunk not handed back by then is the janitor's, once its
# heartbeat expires.
COLD_STOP_SECONDS = 30.0
PARENT_POLL = 1.0  # seconds between checks that the launcher still runs
RESTOP_SECONDS = 0.05  # a cold stop a finaliser dropped is sent again after this
_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int) -> None:
    """Stop at once (a cold stop) when the launcher `parent` is gone, even if it was killed
    with SIGKILL: a worker runs in its own session, so nothing else would ever stop it, and
    it would hold its engine, its GPUs and the embedded server forever. Linux sends SIGHUP
    on the parent's death (PR_SET_PDEATHSIG); a thread that polls the parent pid covers the
    other systems and a parent that died before this ran. The chunks in hand go back to the
    queue, and the engine reaper takes the engine's processes down with the worker."""
    signal.signal(signal.SIGHUP, _parent_gone)
    _keep_the_stop(sys.unraisablehook)
    _set_parent_death_signal(signal.SIGHUP)
    watcher = threading.Thread(
        target=_watch_parent, args=(parent,), name="parent-watch", daemon=True
    )
    watcher.start()


def _set_parent_death_signal(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("no parent-death signal (%s); polling the parent instead", exc)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os.kill(os.getpid(), signal.SIGHUP)


# Set once the cold stop's SystemExit is raised: later signals must not interrupt the
# clean-up it runs (returning the chunks in hand, closing the engine, leaving the server).
_stopping = threading.Event()


def _parent_gone(signum: int, frame: object) -> None:
    """A cold stop, once."""
    if _stopping.is_set():
        return
    _stopping.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    log.warning(
        "the launcher is gone or hung up: stopping at once; the chunks in hand go back to the queue"
    )
    raise SystemExit(1)


def _keep_the_stop(previous: Callable[[Any], object]) -> None:
    """A signal's handler runs wherever the main thread is, a finaliser included (a weakref
    callback, a `__del__`), and there Python prints the SystemExit and drops it: the worker
    ran on with its launcher gone (seen in CI, waiting for its chunks without end). Such a
    stop is sent again, and lands a moment later, outside the finaliser."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit) and _stopping.is_set():
            log.warning("the stop landed in a finaliser, which dropped it: stopping again")
            _stopping.clear()
            # From another thread, a moment later: sent from here, it would land here again.
            threading.Timer(RESTOP_SECONDS, os.kill, (os.getpid(), signal.SIGHUP)).start()
            return
        previous(unraisable)

    sys.unraisablehook = hook


def worker_name(name: str | None) -> str:
    """Unique per process: RQ refuses a name that a dead worker's key still holds, and in a
    restarted container the pid is often the same as before. `<name>-<pid>-<random>`."""
    base = name or f"zoi-{socket.gethostname()}"
    return f"{base}-{os.getpid()}-{secrets.token_hex(3)}"


def serve(
    connection: redis.Redis,
    run: Run,
    name: str | None = None,
    burst: bool = False,
    heartbeat_interval: float = HEARTBEAT_SECONDS,
    heartbeat_ttl: int | None = None,
    janitor_interval: float = SWEEP_SECONDS,
    revive: Callable[[], None] | None = None,
) -> bool:
    """Build the engine, then process chunks until stopped (or, with `burst`, until the queue
    is empty). Returns whether any chunk ran. Raises `EngineDead` if the engine died.
    `revive` is called when Redis cannot be reached: it restarts the run's embedded server,
    whose append-only file still holds the queue."""
    host = EngineHost(run)
    unique_name = worker_name(name)
    ttl = heartbeat_ttl or default_heartbeat_ttl(heartbeat_interval)
    board = LiveBoard(connection, run, ttl)
    worker = ChunkWorker(
        [chunk_queue(connection, run)],
        ChunkRunner(run, host, unique_name, board),
        heartbeat_interval=heartbeat_interval,
        heartbeat_ttl=ttl,
        janitor_interval=janitor_interval,
        connection=connection,
        name=unique_name,
    )
    worker.revive = revive
    gauge = _gauge(host, board, unique_name)
    try:
        worked = _work(worker, burst)
    finally:
        if gauge is not None:
            gauge.stop()
        host.close()
    if host.dead is not None:
        held = describe_ranges(index_ranges(host.dead_chunks), 5)
        raise EngineDead(f"the engine died: {host.dead} (chunks in hand: {held})")
    if not (worker.drained or worker.stop_requested):
        # RQ's loop ends quietly on an unexpected error; a supervisor must see a failure.
        raise WorkerStopped("the worker loop ended unexpectedly; its log has the cause")
    if worker.drained:
        _check_nothing_failed(connection, run)
    return worked


def _gauge(host: EngineHost, board: LiveBoard, worker: str) -> EndpointGauge | None:
    """The publisher of the engine's endpoint figures, started, if the engine keeps any."""
    if not host.keeps_stats:
        return None
    gauge = EndpointGauge(board, worker, host.stats)
    gauge.start()
    return gauge


def _work(worker: ChunkWorker, burst: bool, attempts: int = 5) -> bool:
    """RQ's loop, entered again when it gave up because Redis went away and came back (an
    embedded server the worker restarted): the engine is still loaded, so it carries on."""
    worked = False
    for _ in range(attempts):
        worked = worker.work(burst=burst, logging_level="WARNING", with_scheduler=False) or worked
        if worker.drained or worker.stop_requested or worker.host.dead is not None:
            return worked
        if worker.revive is None or not _reachable(worker.connection):
            return worked
        log.warning("Redis came back; the worker carries on")
    return worked


def _reachable(connection: redis.Redis, wait: float = 15.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            return bool(connection.ping())
        except redis.ConnectionError:
            time.sleep(0.2)
    return False


def _check_nothing_failed(connection: redis.Redis, run: Run) -> None:
    """A burst worker that found nothing left to do has not finished the run if chunks ran
    out of retries: say so with a non-zero exit, not a quiet success."""
    failed = failed_chunks(chunk_queue(connection, run), run)
    undone = [c for c in failed if not shards.check(run, c, deep=False).done]
    if undone:
        raise WorkerStopped(
            f"{len(undone)} chunks failed after all their retries (first {run.job_id(undone[0])}); "
            "'zoi enqueue' queues them again, 'zoi status' shows them"
        )

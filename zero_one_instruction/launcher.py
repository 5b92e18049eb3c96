"""The launcher: one machine's worker processes for a run, supervised until every chunk is done.

It is given a run that its caller created or reopened (`machine.run`, behind `zoi run`). It
enqueues the chunks that are not done, starts the planned worker processes (one per GPU group,
or thin ones) and supervises them: a worker that dies is restarted with backoff, a janitor
returns abandoned chunks, and chunks that the queue lost or that ran out of retries are queued
again (a few times, then the run is declared stuck). Progress is computed from the done
markers, and from the workers' live counters of the chunks in hand (`liveprogress`) while they
run, with the served models' figures per endpoint where the engine keeps them. When every
chunk is done, it stops the workers and returns the progress; it does not merge, its caller
does. On a run whose chunks are all done it returns at once, without starting a worker.

Workers run in their own sessions: a Ctrl-C at the terminal reaches only the launcher, which
then asks each worker for a warm stop (and, on a second Ctrl-C, a cold one).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis

from . import shards
from .engines.endpointstats import fleet
from .errors import ZoiError
from .janitor import Janitor
from .jobs import chunk_queue, failed_chunks
from .liveprogress import funnels, read, read_endpoints
from .merger import describe_ranges, index_ranges
from .policy import HEARTBEAT_SECONDS, SWEEP_SECONDS, JobPolicy, default_heartbeat_ttl
from .producer import EnqueueReport, enqueue
from .progress import Progress
from .rundir import Chunk, Run
from .workerplan import WorkerSpec

log = logging.getLogger(__name__)

MAX_QUICK_FAILURES = 5  # consecutive deaths within QUICK seconds before a group is given up
QUICK = 60.0
REENQUEUE_ROUNDS = 2  # times failed chunks are queued again before the run is declared stuck
RECONCILE_MIN = 10.0  # seconds between checks that the queue still holds every missing chunk
REVIVALS = 3  # consecutive restarts of the embedded server before the launcher gives up
USER_ERROR = 2  # a worker's exit code for input it cannot use (ZoiError)
ERROR_PREFIX = "zoi: error: "


class LaunchError(ZoiError):
    """The run cannot complete: every worker failed, or chunks keep failing."""

    exit_code = 1


class WorkerRefused(LaunchError):
    """A worker exited 2: what it was given is unusable, and a restart would only repeat it."""

    exit_code = USER_ERROR


@dataclass
class _Slot:
    spec: WorkerSpec
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    log_offset: int = 0  # where this process's output begins in the log
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False
    refusal: str | None = None  # the worker's own line when it exited USER_ERROR
    last_error: str | None = None  # the worker's own line at its last death
    restarts: int = 0


class Launcher:
    def __init__(
        self,
        run: Run,
        connection: redis.Redis,
        worker_url: str | None,
        specs: list[WorkerSpec],
        on_event: Callable[[str], None],
        on_progress: Callable[[Progress], None],
        heartbeat: float = HEARTBEAT_SECONDS,
        policy: JobPolicy | None = None,
        revive: Callable[[], None] | None = None,
        output: Path | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.run, self.connection, self.worker_url = run, connection, worker_url
        self.config_path = config_path
        self.on_event, self.on_progress = on_event, on_progress
        self.heartbeat, self.policy = heartbeat, policy or JobPolicy()
        self.revive, self.output = revive, output
        self.queue = chunk_queue(connection, run)
        self.janitor = Janitor(self.queue, ttl=default_heartbeat_ttl(heartbeat))
        self.grid = {chunk.id: chunk for chunk in run.chunks()}
        self.progress = Progress(len(self.grid), run.end - run.start)
        # Unique per launcher: two runs (or two launchers of one run) never share a log.
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        logs = run.path / "logs"
        self.slots = [_Slot(spec, logs / f"worker-{spec.name}-{stamp}.log") for spec in specs]
        self.rounds = 0  # times chunks that ran out of retries were queued again
        self.revivals = 0  # consecutive restarts of the embedded server
        self._logs: list[IO[bytes]] = []

    # --- the whole run --------------------------------------------------------------------
    def execute(self) -> Progress:
        """Enqueue, run workers until every chunk is done, stop them. Raises LaunchError if
        the run cannot complete, KeyboardInterrupt (after stopping the workers) if asked to,
        HangUp (after a cold stop) when the terminal went away."""
        self._report(enqueue(self.connection, self.run, self.policy))
        self.progress.update(self.run, self.grid)
        if self._complete():
            return self.progress
        previous = signal.signal(signal.SIGHUP, _hang_up)
        stop = signal.SIGTERM
        try:
            for slot in self.slots:
                self._start(slot)
            self._supervise()
        except HangUp:
            stop = signal.SIGHUP  # a worker's cold stop: its chunks go back to the queue
            raise
        except KeyboardInterrupt:
            self._interrupt()
            raise
        finally:
            signal.signal(signal.SIGHUP, previous)
            self._stop_all(stop, wait=60)
            for handle in self._logs:
                handle.close()
        return self.progress

    def _complete(self) -> bool:
        """Every chunk has a marker, and every shard matches it (hashed once per shard: the
        verification cache remembers what was already checked)."""
        if len(self.progress.counted) != self.progress.total_chunks:
            return False
        verified = shards.Verified(self.run)
        complete = all(verified.check(chunk).done for chunk in self.grid.values())
        verified.save()
        return complete

    def _supervise(self) -> None:
        last_sweep, last_reconcile, interval = 0.0, time.monotonic(), RECONCILE_MIN
        while True:
            if not self.run.shards.is_dir():  # deleted under us: nothing can be kept now
                raise LaunchError(f"{self.run.path}: the run directory was removed during the run")
            live = funnels(read(self.connection, self.run))  # before the markers: see `read`
            endpoints = fleet(read_endpoints(self.connection, self.run).values())
            self.progress.update(self.run, self.grid, live, endpoints)
            self.on_progress(self.progress)
            if self._complete():
                return
            if all(slot.given_up for slot in self.slots):
                refusals = [slot.refusal for slot in self.slots if slot.refusal]
                if len(refusals) == len(self.slots):
                    raise WorkerRefused(refusals[0])
                raise LaunchError(self._all_failed_message())
            now = time.monotonic()
            try:
                for slot in self.slots:
                    self._tend(slot)
                if now - last_sweep >= min(self.heartbeat, SWEEP_SECONDS):
                    last_sweep = now
                    self.janitor.sweep()
                since = now - last_reconcile
                if since >= interval or (since >= 2.0 and self._stuck()):
                    self._reconcile()
                    last_reconcile = time.monotonic()
                    # a large run's reconciliation costs more: keep it a small share of time
                    interval = max(RECONCILE_MIN, 20 * (last_reconcile - now))
                self.revivals = 0
            except redis.ConnectionError as exc:
                self._lost_redis(exc)
            time.sleep(0.5)

    def _stuck(self) -> bool:
        """Whether waiting cannot help: every chunk is counted but the run is not complete
        (a shard was damaged after its marker was written), or chunks ran out of retries."""
        if len(self.progress.counted) == self.progress.total_chunks:
            return True
        return bool(failed_chunks(self.queue, self.run))

    def _reconcile(self) -> None:
        """Make the queue match the disk again: chunks that are neither done nor in hand
        (Redis lost them, their shard was damaged, they ran out of retries) are queued
        afresh. Failed chunks are queued again only a few times before the run gives up."""
        failed = self._failed_chunks()
        if failed and self.rounds >= REENQUEUE_ROUNDS:
            raise LaunchError(self._failing_message(failed))
        report = enqueue(self.connection, self.run, self.policy)
        self._report(report)
        if report.replaced.get("failed"):
            self.rounds += 1

    def _report(self, report: EnqueueReport) -> None:
        """Say what an enqueue changed: nothing is set aside or queued again silently."""
        for bad in report.bad_shards:
            self.on_event(f"set aside damaged chunk {bad}; it runs again")
        failed = report.replaced.get("failed", 0)
        if failed:
            self.on_event(f"queued {failed} failed chunks again")
        again = report.enqueued - failed - len(report.bad_shards)
        if again > 0 and self.slots[0].process is not None:
            self.on_event(f"queued {again} chunks again that the queue had lost")

    def _failed_chunks(self) -> list[Chunk]:
        """This run's chunks that ran out of retries and are still not done."""
        failed = failed_chunks(self.queue, self.run)
        return [c for c in failed if c.id not in self.progress.counted]

    def _all_failed_message(self) -> str:
        """Every group was given up: say why in the workers' own words (an engine that dies
        names the chunks it had in hand, where a prompt may be what kills it), how to resume,
        and how to get the records of the other chunks."""
        last = next((s.last_error for s in self.slots if s.last_error), None)
        why = f" (last: {last})" if last else ""
        return (
            f"every worker kept failing{why}; see {self.run.path / 'logs'}; rerun the same "
            f"command to resume, or {self._way_out()} writes the chunks that are done"
        )

    def _way_out(self) -> str:
        output = self.output if self.output is not None else "OUTPUT"
        return f"'zoi merge --run {self.run.path} -o {output} --allow-partial'"

    def _failing_message(self, failed: list[Chunk]) -> str:
        done = len(self.progress.counted)
        way_out = self._way_out()
        chunks = describe_ranges(index_ranges(failed), 5)
        return (
            f"chunks {chunks} keep failing after {REENQUEUE_ROUNDS} rounds of "
            f"retries (see {self.run.path / 'logs'} and 'zoi status --run {self.run.path}'); "
            f"{done} of {self.progress.total_chunks} chunks are done, and {way_out} writes "
            "their records without the failing ones"
        )

    def _lost_redis(self, exc: redis.ConnectionError) -> None:
        """The run's embedded server died: start it again (its append-only file still holds
        the queue) and carry on. A server given by URL is the user's to restart."""
        if self.revive is None or self.revivals >= REVIVALS:
            raise exc
        self.revivals += 1
        self.on_event(f"lost Redis ({exc}); restarting the run's embedded server")
        self.revive()

    # --- workers ---------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        slot.log_file.parent.mkdir(exist_ok=True)
        handle = slot.log_file.open("ab")
        self._logs.append(handle)
        slot.log_offset = handle.tell()
        slot.process = subprocess.Popen(
            slot.spec.command(
                self.run.path.resolve(), self.heartbeat, parent=os.getpid(), config=self.config_path
            ),
            env=slot.spec.environment(dict(os.environ), self.worker_url),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        slot.started, slot.restart_at = time.monotonic(), None

    def _tend(self, slot: _Slot) -> None:
        """Restart a dead worker, after a backoff that grows while it keeps dying quickly.
        A worker that exits 2 was given something unusable: restarting cannot help, so its
        group is given up at once with the worker's own line. Only that group: the others
        may be fine (one group's bad GPU), and when every group refused (a config error hits
        them all) the run stops with that line."""
        if slot.given_up:
            return
        now = time.monotonic()
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            return
        if slot.process is None or slot.process.poll() is None:
            return
        code = slot.process.returncode
        released = self.janitor.release_worker(f"{slot.spec.name}-{slot.process.pid}-")
        if released:
            self.on_event(f"returned {released} chunks of worker {slot.spec.name} to the queue")
        slot.last_error = self._last_error(slot, code)
        if code == USER_ERROR:
            slot.given_up, slot.refusal = True, slot.last_error
            self.on_event(f"{slot.refusal}; giving worker {slot.spec.name} up")
            return
        quick = now - slot.started < QUICK
        slot.quick_failures = slot.quick_failures + 1 if quick else 1
        if slot.quick_failures >= MAX_QUICK_FAILURES:
            slot.given_up = True
            self.on_event(
                f"worker {slot.spec.name} died {slot.quick_failures} times in a row "
                f"(exit {code}); giving it up (log: {slot.log_file})"
            )
            return
        delay = min(2.0 ** (slot.quick_failures - 1), 60.0)
        slot.restart_at = now + delay
        self.on_event(
            f"worker {slot.spec.name} exited with code {code}; restarting in "
            f"{delay:.0f} s (log: {slot.log_file})"
        )

    def _last_error(self, slot: _Slot, code: int) -> str:
        """The worker's own error line, from what this process wrote to its log."""
        try:
            with slot.log_file.open("rb") as handle:
                handle.seek(slot.log_offset)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        errors = [line for line in text.splitlines() if line.startswith(ERROR_PREFIX)]
        if errors:
            return f"worker {slot.spec.name}: {errors[-1].removeprefix(ERROR_PREFIX)}"
        return f"worker {slot.spec.name} exited with code {code}; see {slot.log_file}"

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(sig)

    def _stop_all(self, sig: int, wait: float) -> None:
        self._signal_all(sig)
        deadline = time.monotonic() + wait
        for slot in self.slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()

    def _interrupt(self) -> None:
        """First Ctrl-C: warm stop (the chunks in hand finish). Second: cold stop (they go
        back to the queue). Workers ignore a second signal within a second of the first."""
        self.on_event("stopping: the chunks in hand finish (Ctrl-C again to stop at once)")
        self._signal_all(signal.SIGTERM)
        try:
            for slot in self.slots:
                if slot.process is not None:
                    slot.process.wait()
        except KeyboardInterrupt:
            self.on_event("stopping at once: the chunks in hand go back to the queue")
            time.sleep(1.1)
            self._signal_all(signal.SIGTERM)


class HangUp(ZoiError):
    """The launcher's terminal went away (SIGHUP): the workers were stopped at once."""

    exit_code = 129


def _hang_up(signum: int, frame: object) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # one cold stop, however many hang-ups
    raise HangUp(
        "hung up: the workers stopped at once and their chunks go back to the queue "
        "(rerun the same command to resume)"
    )

"""`zoi run`: one machine's whole job in one command.

The launcher creates or reopens the run and enqueues it. It starts one worker process per GPU
group and supervises them: a worker that dies is restarted with backoff, and a janitor returns
abandoned chunks. Progress is computed from the done markers. When every chunk is done, it
stops the workers and merges. Rerun after Ctrl-C, a crash or a reboot, it resumes; on a
finished run it only merges.

Workers run in their own sessions: a Ctrl-C at the terminal reaches only the launcher, which
then asks each worker for a warm stop (and, on a second Ctrl-C, a cold one).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import redis

from . import shards
from .errors import ZoiError
from .janitor import Janitor
from .jobs import chunk_queue, failed_chunks
from .producer import JobPolicy, enqueue
from .rundir import Run

log = logging.getLogger(__name__)

MAX_QUICK_FAILURES = 5  # consecutive deaths within QUICK seconds before a group is given up
QUICK = 60.0
REENQUEUE_ROUNDS = 2  # times failed chunks are queued again before the run is declared stuck


class LaunchError(ZoiError):
    """The run cannot complete: every worker failed, or chunks keep failing."""

    exit_code = 1


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its GPUs (none: a CPU worker) and tensor-parallel size."""

    name: str
    gpus: tuple[str, ...]
    tp: int

    def environment(self, base: dict[str, str], redis_url: str) -> dict[str, str]:
        env = {**base, "ZOI_REDIS_URL": redis_url}  # never on the command line: passwords
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def command(self, run: Path, heartbeat: float, config: Path | None = None) -> list[str]:
        """`config` gives the worker this invocation's hardware settings; without it, a
        worker takes those frozen in run.json when the run was created."""
        hardware = ["--config", str(config)] if config is not None else []
        return [
            sys.executable,
            "-m",
            "zero_one_instruction",
            "worker",
            "--run",
            str(run),
            "--name",
            self.name,
            "--tp",
            str(self.tp),
            "--heartbeat",
            str(heartbeat),
            *hardware,
        ]


def plan(gpu_groups: list[list[str]]) -> list[WorkerSpec]:
    """Worker specs for GPU groups; no group at all means one CPU worker."""
    if not gpu_groups:
        return [WorkerSpec("cpu0", (), 1)]
    return [WorkerSpec("gpu" + "-".join(group), tuple(group), len(group)) for group in gpu_groups]


@dataclass
class _Slot:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False
    restarts: int = 0


@dataclass
class Progress:
    """What the markers say, read incrementally: each marker is read once."""

    total_chunks: int
    total_prompts: int
    began: float = field(default_factory=time.time)
    done: set[str] = field(default_factory=set)
    prompts: int = 0
    records: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    fixer_ran: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    recent_prompts: int = 0
    recent_records: int = 0
    recent_tokens: int = 0

    def update(self, run: Run) -> None:
        for marker_path in run.shards.glob("*.done"):
            chunk_id = marker_path.name.removesuffix(".done")
            if chunk_id in self.done:
                continue
            chunk = shards.chunk_of_id(chunk_id)
            marker = shards.read_marker(run, chunk)[0] if chunk else None
            if marker is None:
                continue  # being replaced, foreign or damaged: the producer redoes it
            self._add(chunk_id, marker)

    def _add(self, chunk_id: str, marker: dict[str, Any]) -> None:
        self.done.add(chunk_id)
        funnel = marker["funnel"]
        self.prompts += funnel["prompts"]
        self.records += funnel["kept"]
        self.completion_tokens += funnel["completion_tokens"]
        self.prompt_tokens += funnel["prompt_tokens"]
        self.fixer_ran += funnel["fixer_ran"]
        for reason, count in funnel["dropped"].items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        if self._finished_after_start(marker):
            self.recent_prompts += funnel["prompts"]
            self.recent_records += funnel["kept"]
            self.recent_tokens += funnel["completion_tokens"]

    def _finished_after_start(self, marker: dict[str, Any]) -> bool:
        try:
            return datetime.fromisoformat(marker["finished_at"]).timestamp() >= self.began
        except (KeyError, ValueError):
            return False

    def line(self) -> str:
        elapsed = max(time.time() - self.began, 1e-9)
        rate = self.recent_prompts / elapsed
        left = self.total_prompts - self.prompts
        eta = f"{left / rate / 60:.1f} min" if rate > 0 and left else ("0 min" if not left else "?")
        kept = 100.0 * self.records / self.prompts if self.prompts else 0.0
        return (
            f"chunks {len(self.done)}/{self.total_chunks} | records {self.records} "
            f"({kept:.0f}% kept) | {self.recent_records / elapsed:.2f} records/s | "
            f"{self.recent_tokens / elapsed:.0f} tokens/s | ETA {eta}"
        )


class Launcher:
    def __init__(
        self,
        run: Run,
        connection: redis.Redis,
        worker_url: str,
        specs: list[WorkerSpec],
        on_event: Callable[[str], None],
        on_progress: Callable[[Progress], None],
        heartbeat: float = 10.0,
        policy: JobPolicy | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.run, self.connection, self.worker_url = run, connection, worker_url
        self.config_path = config_path
        self.slots = [_Slot(spec) for spec in specs]
        self.on_event, self.on_progress = on_event, on_progress
        self.heartbeat, self.policy = heartbeat, policy or JobPolicy()
        self.queue = chunk_queue(connection, run)
        self.janitor = Janitor(self.queue, ttl=3 * heartbeat + 5)
        self.progress = Progress(len(run.chunks()), run.end - run.start)
        self._logs: list[IO[bytes]] = []

    # --- the whole run --------------------------------------------------------------------
    def execute(self) -> Progress:
        """Enqueue, run workers until every chunk is done, stop them. Raises LaunchError if
        the run cannot complete, KeyboardInterrupt (after stopping the workers) if asked to."""
        enqueue(self.connection, self.run, self.policy)
        self.progress.update(self.run)
        if self._complete():
            return self.progress
        try:
            for slot in self.slots:
                self._start(slot)
            self._supervise()
        except KeyboardInterrupt:
            self._interrupt()
            raise
        finally:
            self._stop_all(signal.SIGTERM, wait=60)
            for handle in self._logs:
                handle.close()
        return self.progress

    def _complete(self) -> bool:
        """Every chunk has a marker, and every shard matches it (hashed once per shard: the
        verification cache remembers what was already checked)."""
        if len(self.progress.done) != self.progress.total_chunks:
            return False
        verified = shards.Verified(self.run)
        complete = all(verified.check(chunk).done for chunk in self.run.chunks())
        verified.save()
        return complete

    def _supervise(self) -> None:
        rounds, last_sweep, last_failed_check = 0, 0.0, time.monotonic()
        while True:
            self.progress.update(self.run)
            self.on_progress(self.progress)
            if self._complete():
                return
            for slot in self.slots:
                self._tend(slot)
            if all(slot.given_up for slot in self.slots):
                raise LaunchError(
                    f"every worker kept failing; see {self.run.path / 'logs'} "
                    "(rerun the same command to resume)"
                )
            now = time.monotonic()
            if now - last_sweep >= min(self.heartbeat, 15.0):
                last_sweep = now
                self.janitor.sweep()
            if now - last_failed_check >= 5.0:
                last_failed_check = now
                rounds = self._requeue_failed(rounds)
            time.sleep(0.5)

    def _requeue_failed(self, rounds: int) -> int:
        """Chunks whose retries ran out: queue them afresh a few times, then give up."""
        if not failed_chunks(self.queue, self.run):
            return rounds
        if rounds >= REENQUEUE_ROUNDS:
            raise LaunchError(
                f"chunks keep failing after {REENQUEUE_ROUNDS} rounds of retries; see "
                f"{self.run.path / 'logs'} and 'zoi status --run {self.run.path}'"
            )
        report = enqueue(self.connection, self.run, self.policy)
        if report.enqueued:
            self.on_event(f"queued {report.enqueued} failed chunks again")
        return rounds + 1

    # --- workers ---------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        logs = self.run.path / "logs"
        logs.mkdir(exist_ok=True)
        handle = (logs / f"worker-{slot.spec.name}.log").open("ab")
        self._logs.append(handle)
        slot.process = subprocess.Popen(
            slot.spec.command(self.run.path, self.heartbeat, self.config_path),
            env=slot.spec.environment(dict(os.environ), self.worker_url),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        slot.started, slot.restart_at = time.monotonic(), None

    def _tend(self, slot: _Slot) -> None:
        """Restart a dead worker, after a backoff that grows while it keeps dying quickly."""
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
        quick = now - slot.started < QUICK
        slot.quick_failures = slot.quick_failures + 1 if quick else 1
        log_file = self.run.path / "logs" / f"worker-{slot.spec.name}.log"
        if slot.quick_failures >= MAX_QUICK_FAILURES:
            slot.given_up = True
            self.on_event(
                f"worker {slot.spec.name} died {slot.quick_failures} times in a row "
                f"(exit {code}); giving it up (log: {log_file})"
            )
            return
        delay = min(2.0 ** (slot.quick_failures - 1), 60.0)
        slot.restart_at = now + delay
        self.on_event(
            f"worker {slot.spec.name} exited with code {code}; restarting in "
            f"{delay:.0f} s (log: {log_file})"
        )

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

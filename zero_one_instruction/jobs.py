"""The chunk job as RQ sees it: queue, job id, serializer, and a job class that runs nothing
else.

Jobs travel as JSON, never pickle, and `ChunkJob` resolves exactly one function: whoever can
write to Redis can ask for chunks to be computed, but cannot make a GPU node run code. Nor can
they make it send anything: RQ 3 stores webhooks (URLs to call when a job ends) in the job's
hash, and a chunk job drops them unread. A refused job is refused on every attempt, so it is
never retried.

What a chunk job does is not found by its name: the worker binds its chunk runner to each job
it takes (`ChunkJob.bind`), with everything the runner needs, and RQ calls it. The name is a
label that a job must carry to be run at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from . import rqinternals
from .rundir import Chunk, Run

# The label every chunk job carries, queues of earlier versions included; never imported.
CHUNK_FUNCTION = "zero_one_instruction.worker.run_chunk"
CHUNK_ARGS = ("run_key", "start", "end")
log = logging.getLogger(__name__)


class RefusedJob(PermissionError):
    """A job on the queue that is not a chunk job of this tool."""


class ChunkJob(Job):
    """An RQ job that can only be the chunk job, and never runs callbacks or webhooks."""

    runner: Callable[..., Any] | None = None

    def bind(self, runner: Callable[..., Any]) -> None:
        """What runs this job: a callable that takes the job's arguments (run key, start,
        end) and has everything else bound, the worker's run and engine and this job's own
        signals. RQ performs the job by calling it."""
        self.runner = runner

    @property
    def func(self) -> Any:
        if self.func_name != CHUNK_FUNCTION or self.instance is not None:
            log.error("refused job %s: %r is not the chunk job", self.id, self.func_name)
            raise RefusedJob(f"job {self.id} names {self.func_name!r}, not the chunk job; refused")
        args = self.args
        if self.kwargs or not isinstance(args, (list, tuple)) or len(args) != len(CHUNK_ARGS):
            raise RefusedJob(f"job {self.id}: the chunk job takes exactly {CHUNK_ARGS}; refused")
        if self.runner is None:
            raise RuntimeError(f"job {self.id}: chunk jobs run only inside `zoi worker`")
        return self.runner

    def perform(self) -> Any:
        try:
            return super().perform()
        except RefusedJob:
            self.retries_left = 0  # a refused job would be refused again: no retries
            raise

    def restore(self, raw_data: Any) -> Any:
        restored = super().restore(raw_data)
        if self.webhooks:
            urls = [webhook.url for webhook in self.webhooks]
            log.error("ignored webhooks %r of job %s: chunk jobs send nothing", urls, self.id)
            self.webhooks = []
        return restored

    def send_webhooks(self, status: str, *, exc_string: str | None = None) -> None:
        """Never sends: a webhook is whatever URL a queue writer put into the job."""
        return None

    def _no_callback(self, kind: str) -> None:
        name = rqinternals.callback_names(self)[kind]
        if name:
            log.error("ignored callback %r of job %s: chunk jobs run no callbacks", name, self.id)

    @property
    def success_callback(self) -> None:
        self._no_callback("success")

    @property
    def failure_callback(self) -> None:
        self._no_callback("failure")

    @property
    def stopped_callback(self) -> None:
        self._no_callback("stopped")


def chunk_queue(connection: redis.Redis, run: Run) -> Queue:
    return Queue(
        run.queue_name, connection=connection, job_class=ChunkJob, serializer=JSONSerializer
    )


def chunk_args(run: Run, chunk: Chunk) -> list[Any]:
    """The job's arguments. The run key lets a worker refuse chunks of another run."""
    return [run.key, chunk.start, chunk.end]


def failed_chunks(queue: Queue, run: Run) -> list[Chunk]:
    """This run's chunks whose jobs ran out of retries. Failed jobs that are not the run's
    chunk jobs (pushed by someone else, and refused) are no failure of the run."""
    failed = queue.failed_job_registry.get_job_ids(cleanup=False)
    return [chunk for chunk in map(run.chunk_of_job, failed) if chunk is not None]

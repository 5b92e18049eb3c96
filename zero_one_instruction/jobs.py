"""The chunk job as RQ sees it: queue, job id, serializer, and a job class that runs nothing
else.

Jobs travel as JSON, never pickle, and `ChunkJob` resolves exactly one function: whoever can
write to Redis can ask for chunks to be computed, but cannot make a GPU node run code.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from .rundir import Chunk, Run

CHUNK_FUNCTION = "zero_one_instruction.worker.run_chunk"
log = logging.getLogger(__name__)


class RefusedJob(PermissionError):
    """A job on the queue that is not a chunk job of this tool."""


class ChunkJob(Job):
    """An RQ job that can only be the chunk job, and never runs callbacks."""

    @property
    def func(self) -> Any:
        if self.func_name != CHUNK_FUNCTION or self.instance is not None:
            log.error("refused job %s: %r is not the chunk job", self.id, self.func_name)
            raise RefusedJob(f"job {self.id} names {self.func_name!r}, not the chunk job; refused")
        from .worker import run_chunk

        return run_chunk

    def _no_callback(self, name: str | None) -> None:
        if name:
            log.error("ignored callback %r of job %s: chunk jobs run no callbacks", name, self.id)

    @property
    def success_callback(self) -> None:
        self._no_callback(self._success_callback_name)

    @property
    def failure_callback(self) -> None:
        self._no_callback(self._failure_callback_name)

    @property
    def stopped_callback(self) -> None:
        self._no_callback(self._stopped_callback_name)


def chunk_queue(connection: redis.Redis, run: Run) -> Queue:
    return Queue(
        run.queue_name, connection=connection, job_class=ChunkJob, serializer=JSONSerializer
    )


def chunk_args(run: Run, chunk: Chunk) -> list[Any]:
    """The job's arguments. The run key lets a worker refuse chunks of another run."""
    return [run.key, chunk.start, chunk.end]

"""The engine host: one engine for the worker's whole life, on its own event loop thread.

The engine lives on one asyncio loop, and every record of every chunk is evolved there. A
global limit on records in flight keeps the engine's batch full, and it is shared by all
chunks, so the next chunk's records take the slots the current chunk's last records free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from .engines import EngineDead, close_engine, start_engine
from .engines.endpointstats import snapshot
from .pipeline import Outcome, Pipeline
from .rundir import Chunk, Run

STATS_WAIT = 5.0  # seconds a figures reader waits for a busy loop before it skips a turn
SETTLE_SECONDS = 10.0  # seconds `close` waits for abandoned chunks to unwind


class EngineHost:
    """The engine, its event loop thread, and the chunks being evolved on it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.dead: BaseException | None = None
        self.dead_chunks: list[Chunk] = []  # in flight when the engine died: a suspect may be
        # among them, and the supervisor's message names them
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="engine-loop", daemon=True
        )
        self._thread.start()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._abandoned = False
        self._tasks: set[asyncio.Task[Any]] = set()  # the chunks' tasks, on the loop
        templates = run.templates
        self.system_prompt = templates.output_system_prompt
        source = run.source()
        try:
            self.engine = self.call(self._start())
        except BaseException:
            self._stop_loop()
            raise
        self.pipeline = Pipeline(run.config, templates, source, self.engine)

    async def _start(self) -> Any:
        self._slots = asyncio.Semaphore(self.run.config.concurrency())
        return await start_engine(self.run.engine_config())

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        if self._abandoned:  # a chunk handed over after a cold stop began: abandoned too
            coro.close()
            raise concurrent.futures.CancelledError
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self._loop)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    async def _tracked(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a chunk as a task `close` can wait for: an abandoned chunk's future is
        cancelled at once, while its task still unwinds its records (each request withdrawn
        from the engine); stopping the loop before then would destroy it half-way."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coro
        finally:
            self._tasks.discard(task)

    async def _settle(self) -> None:
        """Wait, a while at most, for the abandoned chunks' tasks to end."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SETTLE_SECONDS)

    async def evolve_chunk(
        self,
        chunk: Chunk,
        started: threading.Event,
        finished: Callable[[Outcome], None] = lambda outcome: None,
    ) -> list[Outcome]:
        """All records of a chunk, each started as soon as a slot frees up. `started` is set
        once the last record has a slot: the worker may then take the next chunk. `finished`
        gets each record's outcome as it ends, on the engine's loop (the live counters)."""
        try:
            indices = range(chunk.start, chunk.end)
            run = self.pipeline.run(indices, self._slots, started.set, finished)
            async with aclosing(run) as outcomes:
                return [outcome async for outcome in outcomes]
        except EngineDead as exc:
            self.dead = exc
            self.dead_chunks.append(chunk)
            raise

    @property
    def keeps_stats(self) -> bool:
        """Whether the engine reports figures per endpoint (an optional `stats()`)."""
        return callable(getattr(self.engine, "stats", None))

    def marker_info(self) -> dict[str, Any]:
        """What the engine says of how it made the records, for each chunk's marker (an
        optional `marker_info()`, such as the OpenAI engine's judge constraint); {} without
        one. Read once the chunk is done, when nothing about it changes any more."""
        info = getattr(self.engine, "marker_info", None)
        return dict(info()) if callable(info) else {}

    def stats(self) -> dict[str, dict[str, Any]]:
        """The engine's figures per endpoint, JSON-safe (`endpointstats.snapshot`), read and
        copied on the engine's loop, where its counters change, so a reader never sees one
        half-updated. Raises TimeoutError if the loop stays busy for STATS_WAIT seconds."""

        async def on_loop() -> dict[str, dict[str, Any]]:
            return snapshot(self.engine.stats())

        future = asyncio.run_coroutine_threadsafe(on_loop(), self._loop)
        try:
            return future.result(timeout=STATS_WAIT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def cancel_all(self) -> None:
        """Abandon every chunk in flight (cold stop), and any handed over later: their jobs
        fail and are retried."""
        self._abandoned = True
        for future in list(self._futures):
            future.cancel()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def close(self) -> None:
        try:
            self.call(self._settle())
            self.call(close_engine(self.engine))
        finally:
            self._stop_loop()

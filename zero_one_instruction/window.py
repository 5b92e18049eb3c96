"""The tasks of a batch in flight, handed back in the order they were started.

The scheduler (`pipeline.Pipeline.run`) starts a prompt whenever a slot frees up, but its
caller wants outcomes in index order; the window holds the finished ones until those before
them are done, and remembers the first failure so a dead engine fails the batch at once
instead of after every other prompt has drained.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Window(Generic[T]):
    """The prompts in flight and those finished before them, oldest first; a prompt's slot is
    freed as soon as it finishes, and the first failure is kept to fail the batch at once."""

    def __init__(self, slots: asyncio.Semaphore, finished: Callable[[T], None]) -> None:
        self.slots, self.finished = slots, finished
        self.tasks: deque[asyncio.Task[T]] = deque()
        self.failed: asyncio.Future[asyncio.Task[T]] = asyncio.get_running_loop().create_future()

    def __len__(self) -> int:
        return len(self.tasks)

    def start(self, evolve: Coroutine[Any, Any, T]) -> None:
        task = asyncio.ensure_future(evolve)
        task.add_done_callback(self._finished)
        self.tasks.append(task)

    def _finished(self, task: asyncio.Task[T]) -> None:
        self.slots.release()
        if task.cancelled():
            return
        if task.exception() is None:
            self.finished(task.result())
        elif not self.failed.done():
            self.failed.set_result(task)

    def ready(self) -> bool:
        """The oldest prompt is done, or one has failed: `next` returns without waiting."""
        return self.failed.done() or bool(self.tasks and self.tasks[0].done())

    async def next(self) -> T:
        """The oldest prompt's outcome, or the first failure's exception."""
        await asyncio.wait({self.tasks[0], self.failed}, return_when=asyncio.FIRST_COMPLETED)
        if self.failed.done():
            return self.failed.result().result()  # raises the failure
        return self.tasks.popleft().result()

    async def cancel(self) -> None:
        """Stop the prompts still in flight, and wait for them to be gone."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

"""Running a coroutine eagerly, by hand: its first step inside the caller,
the rest (if it suspends) as a task. What Python 3.12's eager tasks do
(`asyncio.eager_task_factory`), for 3.11, and cheaper: a coroutine that
finishes at once never becomes a task.

    eager = EagerTask()
    enter_task(loop, eager)          # asyncio.current_task() is `eager`
    try:
        yielded = coro.send(None)    # StopIteration: done, no task
    finally:
        leave_task(loop, eager)
    task = loop.create_task(resume_task(coro, yielded))
    eager.adopt(task)
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator
from typing import Any

# the hooks Python 3.12's eager tasks use too: current_task() during the step
enter_task = asyncio.tasks._enter_task
leave_task = asyncio.tasks._leave_task


class EagerTask:
    """What `asyncio.current_task()` returns while a coroutine runs its first
    step inside the read: `asyncio.timeout()` and friends need a task to
    cancel. If the coroutine suspends, the real task takes over and the
    calls made on this one are passed on to it."""

    __slots__ = ("_cancels", "_task")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._cancels = 0

    def cancel(self, msg: object = None) -> bool:
        if self._task is not None:
            return self._task.cancel(msg)
        self._cancels += 1
        return True

    def cancelling(self) -> int:
        return self._task.cancelling() if self._task is not None else self._cancels

    def uncancel(self) -> int:
        if self._task is not None:
            return self._task.uncancel()
        self._cancels = max(0, self._cancels - 1)
        return self._cancels

    def done(self) -> bool:
        return False

    def get_name(self) -> str:
        return self._task.get_name() if self._task is not None else "eager"

    def adopt(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        for _ in range(self._cancels):
            task.cancel()


@types.coroutine
def _resume(coro: Any, yielded: object) -> Generator[Any, Any, Any]:
    """The rest of a coroutine whose first step ran eagerly: pass what it
    waits on to the task, and what the task sends or throws back to it."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation: the coroutine decides what it means
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(sent)
        except StopIteration as stop:
            return stop.value


async def resume_task(coro: Any, yielded: object) -> Any:
    """The task's coroutine for the rest of an eagerly started one."""
    return await _resume(coro, yielded)


async def wrap_awaitable(awaitable: Any) -> Any:
    """Any awaitable as a coroutine (one the eager driver can step)."""
    return await awaitable

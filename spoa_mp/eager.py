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
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeAlias, cast

# the hooks Python 3.12's eager tasks use too: current_task() during the step.
# They take any object as the loop's current task (typeshed says a Task):
# here an EagerTask as well.
_TaskHook: TypeAlias = "Callable[[asyncio.AbstractEventLoop, EagerTask | asyncio.Task[Any]], None]"
enter_task = cast(_TaskHook, asyncio.tasks._enter_task)
leave_task = cast(_TaskHook, asyncio.tasks._leave_task)


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


class Finished:
    """What `EagerSteps.send` returns for a coroutine that finished in its
    first step: its return value. (A coroutine cannot yield this class, so
    anything else returned is what a suspended coroutine awaits.)"""

    __slots__ = ("detached", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.detached = False  # the driver now belongs to a task: return, do not wait


@types.coroutine
def _drive(out: Finished) -> Generator[Any, Any, Any]:
    """Runs the coroutines it is sent, one after the other, by `yield from`:
    a coroutine that returns does not raise StopIteration here (Python 3.11
    builds a traceback for each one caught, and finds its line number by
    scanning the catching function's line table: thousands of instructions
    in a big function like the dispatcher's loop)."""
    coro = yield
    while True:
        out.value = yield from coro
        if out.detached:  # the coroutine had suspended: the task gets its value
            return out.value
        coro = yield out


class EagerSteps:
    """Coroutines' first steps, through one long-lived driver generator:

    try:
        got = steps.send(coro)
    except Exception:
        steps.restart()              # the coroutine raised: a new driver
    if got.__class__ is Finished:    # done at once: got.value
        ...
    else:                            # suspended, awaiting `got`
        task = create_task(resume_task(steps.detach(), got))
    """

    __slots__ = ("_driver", "_out", "send")

    def __init__(self) -> None:
        self._driver: Generator[Any, Any, Any]
        self._out: Finished
        self.send: Callable[[Any], Any]
        self.restart()

    def restart(self) -> None:
        """A new driver (the old one ended with a coroutine's exception, or
        was detached)."""
        self._out = out = Finished()
        self._driver = driver = _drive(out)
        driver.send(None)  # to its first yield: ready for a coroutine
        self.send = driver.send

    def detach(self) -> Generator[Any, Any, Any]:
        """The driver holding the coroutine that just suspended (the rest of
        it, for a task); a new driver takes its place."""
        driver = self._driver
        self._out.detached = True
        self.restart()
        return driver


class _Resumed(Coroutine[Any, Any, Any]):
    """The rest of a coroutine whose first step ran eagerly, as a task's
    coroutine: the task's first send gets what the coroutine waits on; what
    the task sends or throws later goes straight to the coroutine. A throw
    before that first send (the task cancelled before it ever ran, e.g. by an
    `asyncio.timeout(0)` entered in the eager step) reaches the coroutine too,
    where an unstarted wrapper coroutine would end without it."""

    __slots__ = ("_coro", "_first", "_name")

    def __init__(self, coro: Any, yielded: object, name: str | None) -> None:
        self._coro = coro
        self._first: tuple[object] | None = (yielded,)
        self._name = name

    @property
    def __name__(self) -> str:  # in the task's repr: the handler's coroutine
        return self._name or str(self._coro.__name__)

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not None:
            self._first = None
            return first[0]
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._first = None
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # an iterator with send/throw: awaitable

    def __iter__(self) -> _Resumed:
        return self

    def __next__(self) -> Any:
        return self.send(None)


def resume_task(coro: Any, yielded: object, name: str | None = None) -> Coroutine[Any, Any, Any]:
    """What to give create_task() for a coroutine (or EagerSteps driver)
    that suspended yielding `yielded`; `name`: the handler coroutine's."""
    return _Resumed(coro, yielded, name)


async def wrap_awaitable(awaitable: Any) -> Any:
    """Any awaitable as a coroutine (one the eager driver can step)."""
    return await awaitable

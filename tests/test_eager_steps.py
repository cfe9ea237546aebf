"""EagerSteps: coroutines' first steps through one driver generator, with
no StopIteration per finished coroutine (spoa_mp/eager.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spoa_mp.eager import EagerSteps, Finished, resume_task


async def returns(value: Any) -> Any:
    return value


async def raises(exc: BaseException) -> Any:
    raise exc


async def awaits(fut: asyncio.Future[Any], then: Any) -> Any:
    got = await fut
    return (got, then)


def test_finished_coroutines_come_back_as_finished_with_their_value() -> None:
    steps = EagerSteps()
    for value in (1, None, "x", [2]):
        got = steps.send(returns(value))
        assert got.__class__ is Finished
        assert got.value == value


def test_a_raising_coroutine_raises_out_of_send_and_restart_serves_the_next() -> None:
    steps = EagerSteps()
    with pytest.raises(ValueError, match="boom"):
        steps.send(raises(ValueError("boom")))
    steps.restart()
    assert steps.send(returns(7)).value == 7


def test_a_suspended_coroutine_is_finished_by_its_task_while_the_next_run_eagerly() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        steps = EagerSteps()
        fut: asyncio.Future[Any] = loop.create_future()
        coro = awaits(fut, "a")
        got = steps.send(coro)
        assert got is fut  # what the coroutine awaits
        task = loop.create_task(resume_task(steps.detach(), got, coro.__name__))
        assert "awaits" in repr(task)  # named after the handler's coroutine
        # the new driver runs other coroutines while the first one waits
        assert steps.send(returns(1)).value == 1
        fut.set_result("r")
        assert await asyncio.wait_for(task, 5) == ("r", "a")
        assert steps.send(returns(2)).value == 2

    asyncio.run(main())


def test_cancelling_the_task_reaches_the_suspended_coroutine() -> None:
    seen: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        loop = asyncio.get_running_loop()
        steps = EagerSteps()
        got = steps.send(waits())
        task = loop.create_task(resume_task(steps.detach(), got))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert seen == ["cancelled"]


def test_a_bare_yield_suspends_rather_than_finishing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        steps = EagerSteps()

        async def yields_none() -> str:
            await asyncio.sleep(0)  # yields None to the task
            return "done"

        got = steps.send(yields_none())
        assert got is None
        task = loop.create_task(resume_task(steps.detach(), got))
        assert await asyncio.wait_for(task, 5) == "done"

    asyncio.run(main())

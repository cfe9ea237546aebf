"""Dispatcher (dispatch.py) without sockets: every handler kind and result
shape, several messages per NOTIFY, eager coroutines, batched late ACKs,
batch handlers. Counters, bounds, debug logs and registration checks:
test_dispatch_bounds.py; deadlines and blocking handlers:
test_dispatch_deadlines.py. Harness: dispatch_helpers.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest
from dispatch_helpers import Harness, iterations, msg, names, run

from spoa_mp.agent import Agent
from spoa_mp.model import Action, set_var, unset_var

X1, X2 = set_var("txn", "x", 1), set_var("txn", "y", 2)
FALLBACK = set_var("txn", "failed", True)


def one(name: str, value: Any = 1) -> Action:
    return set_var("txn", name, value)


# ------------------------------------------------------------ result shapes

GOOD = [
    (X1, [("x", 1)]),
    ((X1, X2), [("x", 1), ("y", 2)]),
    ([X1, X2], [("x", 1), ("y", 2)]),
    (None, []),
    ((), []),
    ([unset_var("txn", "x")], [("x",)]),
]
GARBAGE = ["text", b"raw", 42, {"x": 1}, [X1, "not an action"], object()]


def agent_returning(result: Any, kind: str) -> Agent:
    agent = Agent()
    if kind == "sync":

        @agent.on_message("m", on_error=FALLBACK)
        def sync(m: Any) -> Any:
            return result

    elif kind == "eager":

        @agent.on_message("m", on_error=FALLBACK)
        async def eager(m: Any) -> Any:
            return result

    else:

        @agent.on_message("m", on_error=FALLBACK)
        async def suspended(m: Any) -> Any:
            await asyncio.sleep(0)
            return result

    return agent


KINDS = ["sync", "eager", "suspended"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("result", "actions"), GOOD, ids=[repr(r) for r, _ in GOOD])
def test_result_shapes_become_the_ack(kind: str, result: Any, actions: list[Any]) -> None:
    async def main() -> None:
        h = Harness(agent_returning(result, kind))
        c = h.conn()
        await h.send(c, (1, 7, [msg("m")]))
        assert await h.wait_acks(c, 1) == [(1, 7, actions)]
        assert h.counters.handler_errors == {}
        assert (h.counters.acks, h.counters.messages) == (1, {"m": 1})

    run(main)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("result", GARBAGE, ids=lambda r: type(r).__name__)
def test_garbage_results_get_on_error(kind: str, result: Any) -> None:
    async def main() -> None:
        h = Harness(agent_returning(result, kind))
        c = h.conn()
        await h.send(c, (1, 1, [msg("m")]), (2, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 2)) == [(1, [("failed", True)]), (2, [("failed", True)])]
        assert h.counters.handler_errors == {"m": 2}
        await iterations()
        assert len(h.acks(c)) == 2

    run(main)


@pytest.mark.parametrize("kind", KINDS)
def test_raising_handler_gets_on_error_and_is_counted(kind: str, caplog: Any) -> None:
    agent = Agent()

    async def fail_later(m: Any) -> Any:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def fail_now(m: Any) -> Any:
        raise RuntimeError("boom")

    def fail_sync(m: Any) -> Any:
        raise RuntimeError("boom")

    fn = {"sync": fail_sync, "eager": fail_now, "suspended": fail_later}[kind]
    agent.add_handler("m", fn, on_error=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        for sid in (1, 2, 3):
            await h.send(c, (sid, 1, [msg("m")]))
        acks = await h.wait_acks(c, 3)
        assert names(acks) == [(s, [("failed", True)]) for s in (1, 2, 3)]
        assert h.counters.handler_errors == {"m": 3}

    with caplog.at_level(logging.ERROR, logger="spoa_mp.dispatch"):
        run(main)
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1  # rate-limited: one traceback for three failures
    assert failed[0].exc_info is not None
    assert "boom" in str(failed[0].exc_info[1])


def test_plain_function_returning_an_awaitable() -> None:
    agent = Agent()

    async def later(value: int) -> Action:
        await asyncio.sleep(0)
        return one("x", value)

    async def now(value: int) -> Action:
        return one("x", value)

    @agent.on_message("late")
    def late(m: Any) -> Any:
        return later(m[0])

    @agent.on_message("now")
    def at_once(m: Any) -> Any:
        return now(m[0])

    @agent.on_message("future")
    def future(m: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, one("x", m[0]))
        return fut

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(
            c, (1, 1, [msg("now", 1)]), (2, 1, [msg("late", 2)]), (3, 1, [msg("future", 3)])
        )
        assert names(sent.acks) == [(1, [("x", 1)])]
        acks = await h.wait_acks(c, 3)
        assert sorted(names(acks)) == [(1, [("x", 1)]), (2, [("x", 2)]), (3, [("x", 3)])]
        assert h.counters.handler_errors == {}

    run(main)


# ------------------------------------------------------------ several messages


def mixed_agent(release: asyncio.Event | None = None) -> Agent:
    agent = Agent()

    @agent.on_message("sync")
    def sync(m: Any) -> Action:
        return one("s", m[0])

    @agent.on_message("eager")
    async def eager(m: Any) -> Action:
        return one("e", m[0])

    @agent.on_message("suspends")
    async def suspends(m: Any) -> Action:
        await asyncio.sleep(0)
        return one("w", m[0])

    @agent.on_batch("batch")
    def batch(msgs: list[Any]) -> list[Action]:
        return [one("b", m[0]) for m in msgs]

    @agent.on_message("fails")
    def fails(m: Any) -> Action:
        raise ValueError(m[0])

    return agent


def test_one_notify_mixing_every_kind_acks_in_message_order() -> None:
    async def main() -> None:
        h = Harness(mixed_agent())
        c = h.conn()
        messages = [
            msg("suspends", 1),
            msg("sync", 2),
            msg("nobody", 3),
            msg("batch", 4),
            msg("eager", 5),
            msg("fails", 6),
            msg("batch", 7),
        ]
        sent = await h.send(c, (9, 4, messages), (10, 1, [msg("sync", 8), msg("batch", 9)]))
        assert names(sent.acks) == [(10, [("s", 8), ("b", 9)])]  # the ready one left at once
        acks = await h.wait_acks(c, 2)
        assert acks[1] == (9, 4, [("w", 1), ("s", 2), ("b", 4), ("e", 5), ("b", 7)])
        assert h.counters.messages == {"suspends": 1, "sync": 2, "batch": 3, "eager": 1, "fails": 1}
        assert h.counters.handler_errors == {"fails": 1}
        assert (h.counters.notifies, h.counters.acks) == (2, 2)
        assert (c.in_flight, h.dispatcher.pending) == (0, 0)

    run(main)


def test_unknown_messages_get_an_empty_ack_and_are_not_counted() -> None:
    async def main() -> None:
        h = Harness(mixed_agent())
        c = h.conn()
        sent = await h.send(c, (1, 1, [msg("nobody")]), (2, 1, [msg("nobody"), msg("other", 1)]))
        assert sent.acks == [(1, 1, []), (2, 1, [])]
        assert h.counters.messages == {}
        assert (h.counters.notifies, h.counters.acks) == (2, 2)

    run(main)


def test_a_notify_without_messages_gets_an_empty_ack() -> None:
    async def main() -> None:
        h = Harness(mixed_agent())
        c = h.conn()
        sent = await h.send(c, (1, 1, []), (2, 1, [msg("sync", 1)]))
        assert names(sent.acks) == [(1, []), (2, [("s", 1)])]

    run(main)


# ------------------------------------------------------------ eager coroutines


def test_eager_coroutine_acks_inside_dispatch_without_a_task() -> None:
    seen: list[Any] = []
    agent = Agent()

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        seen.append(asyncio.current_task())
        async with asyncio.timeout(1.0):  # needs a current task to cancel
            return one("x", m[0])

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, *[(sid, 1, [msg("m", sid)]) for sid in range(1, 51)])
        assert names(sent.acks) == [(sid, [("x", sid)]) for sid in range(1, 51)]
        assert sent.tasks == 0
        assert h.progress == []  # nothing late to announce
        assert (c.in_flight, h.dispatcher.pending) == (0, 0)

    run(main)
    assert len(seen) == 50
    assert all(t is not None for t in seen)


def test_suspended_coroutine_becomes_one_task_each() -> None:
    agent = Agent()
    gate: list[asyncio.Event] = []

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        await gate[0].wait()
        return one("x", m[0])

    async def main() -> None:
        gate.append(asyncio.Event())
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, (1, 1, [msg("m", 1)]), (2, 1, [msg("m", 2)]))
        assert (sent.acks, sent.tasks) == ([], 2)
        assert all("handler" in repr(t) for t in h.dispatcher.tasks)  # named after it
        assert (c.in_flight, h.dispatcher.pending) == (2, 2)
        gate[0].set()
        assert names(await h.wait_acks(c, 2)) == [(1, [("x", 1)]), (2, [("x", 2)])]
        assert (c.in_flight, h.dispatcher.pending) == (0, 0)

    run(main)


def test_current_task_and_timeout_work_before_and_after_suspension() -> None:
    agent = Agent()
    tasks: dict[str, Any] = {}

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        tasks["eager"] = asyncio.current_task()
        # a timeout entered in the eager step, firing after the task took over
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            tasks["timed out"] = True
        tasks["after"] = asyncio.current_task()
        async with asyncio.timeout(1.0):  # entered after suspension, not fired
            await asyncio.sleep(0)
        tasks["cancelling"] = tasks["after"].cancelling()
        return one("x", 1)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 1)) == [(1, [("x", 1)])]
        assert h.counters.handler_errors == {}

    run(main)
    assert tasks["eager"] is not None
    assert tasks["timed out"]
    assert isinstance(tasks["after"], asyncio.Task)
    assert tasks["cancelling"] == 0  # the timeout's cancel was taken back


def test_timeout_with_no_time_left_entered_in_the_eager_step() -> None:
    agent = Agent()

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        try:
            async with asyncio.timeout(0):  # no time left: cancels at the first await
                await asyncio.sleep(1)
        except TimeoutError:
            return one("expired", True)
        return one("expired", False)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 1)) == [(1, [("expired", True)])]

    run(main)


def test_task_group_wait_for_and_shield_entered_in_the_eager_step() -> None:
    agent = Agent()

    @agent.on_message("group")
    async def group(m: Any) -> Action:
        async with asyncio.TaskGroup() as g:
            t = g.create_task(asyncio.sleep(0.01, result=3))
        return one("group", t.result())

    @agent.on_message("group-fails")
    async def group_fails(m: Any) -> Action:
        async def boom() -> None:
            await asyncio.sleep(0.01)
            raise KeyError("k")

        caught = 0
        try:
            async with asyncio.TaskGroup() as g:  # a failing child cancels the handler's task
                g.create_task(boom())
                g.create_task(asyncio.sleep(5))
        except* KeyError:
            caught = 1
        return one("caught", caught)

    @agent.on_message("wait-for")
    async def wait_for(m: Any) -> Action:
        try:
            await asyncio.wait_for(asyncio.sleep(5), 0.01)
        except TimeoutError:
            return one("waited", 1)
        return one("waited", 0)

    @agent.on_message("shield")
    async def shield(m: Any) -> Action:
        return one("shield", await asyncio.shield(asyncio.sleep(0.01, result=4)))

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        names_ = ["group", "group-fails", "wait-for", "shield"]
        await h.send(c, *[(sid, 1, [msg(n)]) for sid, n in enumerate(names_, start=1)])
        acks = await h.wait_acks(c, 4)
        assert sorted(names(acks)) == [
            (1, [("group", 3)]),
            (2, [("caught", 1)]),
            (3, [("waited", 1)]),
            (4, [("shield", 4)]),
        ]
        assert h.counters.handler_errors == {}

    run(main)


def test_handler_cancelling_itself_gets_on_error(caplog: Any) -> None:
    agent = Agent()

    @agent.on_message("m", on_error=FALLBACK)
    async def handler(m: Any) -> Action:
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)
        return X1

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 1)) == [(1, [("failed", True)])]
        assert h.counters.handler_errors == {"m": 1}

    with caplog.at_level(logging.ERROR, logger="spoa_mp.dispatch"):
        run(main)
    assert "NoneType: None" not in caplog.text  # no empty traceback
    assert "CancelledError" in caplog.text


def test_context_vars_stay_each_handlers_own() -> None:
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=0)
    agent = Agent()

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        before = var.get()
        var.set(m[0])
        await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        return set_var("txn", "v", f"{before}/{var.get()}")

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, *[(sid, 1, [msg("m", sid)]) for sid in range(1, 6)])
        assert var.get() == 0  # the reader's context is untouched
        acks = await h.wait_acks(c, 5)
        assert sorted(names(acks)) == [(sid, [("v", f"0/{sid}".encode())]) for sid in range(1, 6)]

    run(main)


# ------------------------------------------------------------ batched completions


def spy_ack_for(conn: Any) -> list[int]:
    """Wrap conn.proto.ack_for (the real one still encodes): results per call."""
    calls: list[int] = []
    real = conn.proto.ack_for

    def ack_for(ids: Any, results: Any) -> list[int]:
        calls.append(len(results))
        return real(ids, results)

    conn.proto.ack_for = ack_for
    return calls


def test_completions_of_one_iteration_leave_in_one_ack_for_per_connection() -> None:
    agent = Agent()
    gate: list[asyncio.Future[None]] = []

    @agent.on_message("m")
    async def handler(m: Any) -> Action:
        await gate[0]
        return one("x", m[0])

    async def main() -> None:
        gate.append(asyncio.get_running_loop().create_future())
        h = Harness(agent)
        a, b = h.conn(), h.conn()
        calls_a, calls_b = spy_ack_for(a), spy_ack_for(b)
        for sid in range(1, 11):  # ten reads, ten tasks per connection
            await h.send(a, (sid, 1, [msg("m", sid)]))
            await h.send(b, (sid, 2, [msg("m", 100 + sid)]))
        assert (calls_a, calls_b) == ([], [])
        gate[0].set_result(None)  # every task finishes in the same iteration
        acks_a = await h.wait_acks(a, 10)
        acks_b = await h.wait_acks(b, 10)
        assert (calls_a, calls_b) == ([10], [10])
        assert names(acks_a) == [(sid, [("x", sid)]) for sid in range(1, 11)]
        assert names(acks_b) == [(sid, [("x", 100 + sid)]) for sid in range(1, 11)]
        assert [conn for conn, _ in h.progress] == [a, b]  # one on_progress each

    run(main)


# ------------------------------------------------------------ batch handlers


def test_batch_gets_the_reads_messages_of_its_name_in_order() -> None:
    calls: list[list[int]] = []
    agent = Agent()

    @agent.on_batch("b")
    def batch(msgs: list[Any]) -> list[Action]:
        calls.append([m[0] for m in msgs])
        return [one("b", m[0] * 10) for m in msgs]

    @agent.on_message("s")
    def single(m: Any) -> Action:
        return one("s", m[0])

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(
            c, (1, 1, [msg("b", 1)]), (2, 1, [msg("s", 2), msg("b", 3)]), (3, 1, [msg("b", 4)])
        )
        assert names(sent.acks) == [(1, [("b", 10)]), (2, [("s", 2), ("b", 30)]), (3, [("b", 40)])]
        await h.send(c, (4, 1, [msg("b", 5)]))
        assert calls == [[1, 3, 4], [5]]  # one call per read
        assert h.counters.messages == {"b": 4, "s": 1}

    run(main)


@pytest.mark.parametrize("suspends", [False, True])
def test_async_batch(suspends: bool) -> None:
    agent = Agent()

    @agent.on_batch("b")
    async def batch(msgs: list[Any]) -> tuple[Action, ...]:
        if suspends:
            await asyncio.sleep(0)
        return tuple(one("b", m[0]) for m in msgs)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, *[(sid, 1, [msg("b", sid)]) for sid in (1, 2, 3)])
        assert sent.tasks == (1 if suspends else 0)
        acks = await h.wait_acks(c, 3)
        assert names(acks) == [(sid, [("b", sid)]) for sid in (1, 2, 3)]

    run(main)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "result", [[], [X1], [X1, X1, X1], None, 42, "ab"], ids=["0", "1", "3", "None", "int", "str"]
)
def test_batch_with_wrong_results_gets_on_error_for_every_message(kind: str, result: Any) -> None:
    agent = Agent()
    if kind == "sync":
        agent.add_batch_handler("b", lambda msgs: result, on_error=FALLBACK)
    else:

        async def batch(msgs: list[Any]) -> Any:
            await asyncio.sleep(0)
            return result

        agent.add_batch_handler("b", batch, on_error=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("b")]), (2, 1, [msg("b")]))
        acks = await h.wait_acks(c, 2)
        assert names(acks) == [(1, [("failed", True)]), (2, [("failed", True)])]
        assert h.counters.handler_errors == {"b": 2}

    run(main)


def test_batch_garbage_items_fail_alone() -> None:
    agent = Agent()
    agent.add_batch_handler("b", lambda msgs: [X1, "junk", None, [X2]], on_error=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, *[(sid, 1, [msg("b")]) for sid in (1, 2, 3, 4)])
        assert names(sent.acks) == [
            (1, [("x", 1)]),
            (2, [("failed", True)]),
            (3, []),
            (4, [("y", 2)]),
        ]
        assert h.counters.handler_errors == {"b": 1}

    run(main)


@pytest.mark.parametrize("kind", ["sync", "eager", "suspended"])
def test_raising_batch(kind: str) -> None:
    agent = Agent()

    async def later(msgs: list[Any]) -> Any:
        await asyncio.sleep(0)
        raise KeyError("x")

    async def now(msgs: list[Any]) -> Any:
        raise KeyError("x")

    def sync(msgs: list[Any]) -> Any:
        raise KeyError("x")

    fn = {"sync": sync, "eager": now, "suspended": later}[kind]
    agent.add_batch_handler("b", fn, on_error=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("b"), msg("b")]), (2, 1, [msg("b")]))
        acks = await h.wait_acks(c, 2)
        assert names(acks) == [(1, [("failed", True), ("failed", True)]), (2, [("failed", True)])]
        assert h.counters.handler_errors == {"b": 3}

    run(main)


def test_one_read_mixing_finished_suspended_and_raising_coroutines() -> None:
    """Each eager step's outcome is its own: a coroutine that raised or
    suspended before does not change what the next one in the read gets."""
    agent = Agent()

    @agent.on_message("m", on_error=[set_var("txn", "err", 1)])
    async def handler(m: Any) -> Action:
        kind = m[0] % 3
        if kind == 1:
            await asyncio.sleep(0.001)
        elif kind == 2:
            raise ValueError("boom")
        return one("x", m[0])

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, *[(sid, 1, [msg("m", sid)]) for sid in range(1, 31)])
        assert sent.tasks == 10  # the suspended ones only
        acks = dict(names(await h.wait_acks(c, 30)))
        for sid in range(1, 31):
            want = {0: [("x", sid)], 1: [("x", sid)], 2: [("err", 1)]}[sid % 3]
            assert acks[sid] == want, sid
        assert h.counters.handler_errors == {"m": 10}

    run(main)

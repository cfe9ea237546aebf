"""Dispatcher deadlines and blocking handlers, without sockets (see
test_dispatch.py): a handler past its timeout is cancelled and its stream
ACKed with on_timeout on time, a late result is dropped, blocking handlers
run in a bounded thread pool under the same rules."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dispatch_helpers import Harness, iterations, msg, names, run, until

from spoa_mp.agent import Agent
from spoa_mp.dispatch import DispatchSettings
from spoa_mp.model import Action, set_var

TIMEOUT = 0.05
# The ACK of a handler past its deadline: within TIMEOUT + SLACK. These tests
# check the logic (which ACK, once, in order) in the pytest process, whose own
# garbage collections land in the window; the 60 ms promise for a 50 ms
# deadline is asserted against a real server by test_deadlines_e2e.py.
SLACK = 0.025
LATE = set_var("txn", "late", True)
FALLBACK = set_var("txn", "fallback", 1)
ERROR = set_var("txn", "error", 1)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of the test: lets sleeping handler threads finish."""
    event = threading.Event()
    yield event
    event.set()


def sleeper(agent: Agent, name: str, **options: Any) -> None:
    """Handler `name`: sleeps 5 s (past every deadline here), then would
    answer LATE; `options` as for Agent.on_message."""

    async def sleep_then_late(m: Any) -> Action:
        await asyncio.sleep(5)
        return LATE

    agent.add_handler(name, sleep_then_late, **options)


def sleepers(release: threading.Event, seen: dict[str, Any]) -> Agent:
    agent = Agent()

    @agent.on_message("async", timeout=TIMEOUT, on_timeout=FALLBACK)
    async def slow(m: Any) -> Action:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen["cancelled"] = seen.get("cancelled", 0) + 1
            raise
        return LATE

    @agent.on_message("blocking", timeout=TIMEOUT, on_timeout=FALLBACK, blocking=True)
    def slow_thread(m: Any) -> Action:
        seen.setdefault("threads", set()).add(threading.current_thread().name)
        release.wait(5)
        seen["thread returned"] = seen.get("thread returned", 0) + 1
        return LATE

    @agent.on_message("async-late-start", timeout=TIMEOUT, on_timeout=FALLBACK)
    async def slow_after_a_step(m: Any) -> Action:
        await asyncio.sleep(0)
        await asyncio.sleep(5)
        return LATE

    return agent


@pytest.mark.parametrize("name", ["async", "blocking", "async-late-start"])
def test_deadline_acks_with_on_timeout_on_time_every_time(
    name: str, release: threading.Event
) -> None:
    seen: dict[str, Any] = {}

    async def main() -> None:
        h = Harness(sleepers(release, seen), DispatchSettings(blocking_threads=4))
        c = h.conn()
        for sid in range(1, 21):
            progress = len(h.progress)
            sent = await h.send(c, (sid, 1, [msg(name, sid)]))
            assert sent.acks[sid - 1 :] == []
            await until(lambda n=progress: len(h.progress) > n, what="the fallback ACK")
            took = h.progress[-1][1] - sent.at
            assert TIMEOUT - 0.002 <= took <= TIMEOUT + SLACK, f"sid {sid}: ACK after {took:.4f} s"
            assert h.acks(c)[-1] == (sid, 1, [("fallback", 1)])
        assert h.counters.handler_timeouts == {name: 20}
        assert h.counters.handler_errors == {}
        assert (c.in_flight, h.dispatcher.pending) == (0, 0)
        if name != "blocking":
            await until(lambda: not h.dispatcher.tasks, what="the cancelled tasks to end")
        else:
            # the 4 threads still sleep: the 16 calls queued behind them were
            # cancelled unstarted; once released, the 4 late results are dropped
            release.set()
            await until(lambda: seen.get("thread returned") == 4, what="the threads")
            await iterations()
        assert len(h.acks(c)) == 20  # no second ACK from any late result
        h.dispatcher.close()

    run(main)
    if name == "async":
        assert seen["cancelled"] == 20
    if name == "blocking":
        assert all(t.startswith("spoa-blocking") for t in seen["threads"])
        assert len(seen["threads"]) == 4
        assert seen["thread returned"] == 4


def test_swallowed_cancellation_is_acked_once() -> None:
    finished: list[int] = []
    agent = Agent()

    @agent.on_message("m", timeout=TIMEOUT, on_timeout=FALLBACK)
    async def stubborn(m: Any) -> Action:
        with contextlib.suppress(asyncio.CancelledError):  # refuses to stop
            await asyncio.sleep(5)
        await asyncio.sleep(0.01)
        finished.append(m[0])
        return LATE

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m", 1)]), (2, 1, [msg("m", 2)]))
        acks = await h.wait_acks(c, 2)
        await until(lambda: len(finished) == 2 and not h.dispatcher.tasks, what="the handlers")
        await iterations()
        assert h.acks(c) == acks == [(1, 1, [("fallback", 1)]), (2, 1, [("fallback", 1)])]
        assert h.counters.handler_timeouts == {"m": 2}
        assert (h.counters.acks, h.counters.handler_errors) == (2, {})

    run(main)


def test_late_failure_is_dropped_silently(caplog: Any) -> None:
    agent = Agent()
    failed: list[int] = []

    @agent.on_message("m", timeout=TIMEOUT, on_timeout=FALLBACK)
    async def stubborn(m: Any) -> Action:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        failed.append(m[0])
        raise RuntimeError("after the deadline")

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m", 1)]))
        await h.wait_acks(c, 1)
        await until(lambda: failed and not h.dispatcher.tasks, what="the late failure")
        gc.collect()  # an unretrieved task exception is logged when the task goes
        await iterations()
        assert names(h.acks(c)) == [(1, [("fallback", 1)])]
        assert h.counters.handler_errors == {}

    with caplog.at_level(logging.ERROR):
        run(main)
    assert "never retrieved" not in caplog.text


def test_timed_out_handler_in_a_notify_with_others() -> None:
    agent = Agent()

    @agent.on_message("fast")
    def fast(m: Any) -> Action:
        return set_var("txn", "fast", m[0])

    sleeper(agent, "slow", timeout=TIMEOUT, on_timeout=[FALLBACK, set_var("txn", "f2", 2)])

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("fast", 1), msg("slow"), msg("fast", 3)]))
        acks = await h.wait_acks(c, 1)
        assert names(acks) == [(1, [("fast", 1), ("fallback", 1), ("f2", 2), ("fast", 3)])]

    run(main)


def test_one_notify_waits_for_all_its_calls_then_acks_once() -> None:
    agent = Agent()

    @agent.on_message("quick")
    async def quick(m: Any) -> Action:
        await asyncio.sleep(0.01)
        return set_var("txn", "quick", 1)

    sleeper(agent, "slow", timeout=TIMEOUT, on_timeout=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        sent = await h.send(c, (1, 1, [msg("slow"), msg("quick")]))
        acks = await h.wait_acks(c, 1)
        assert names(acks) == [(1, [("fallback", 1), ("quick", 1)])]
        assert TIMEOUT <= h.progress[0][1] - sent.at <= TIMEOUT + SLACK
        assert len(h.progress) == 1

    run(main)


def test_connection_closed_before_the_deadline_gets_nothing() -> None:
    agent = Agent()

    sleeper(agent, "slow", timeout=TIMEOUT, on_timeout=FALLBACK)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("slow")]))
        c.closed = True
        h.dispatcher.forget(c)
        await until(lambda: h.progress, what="the deadline")
        assert (h.acks(c), c.in_flight, h.dispatcher.pending) == ([], 0, 0)
        assert h.counters.handler_timeouts == {"slow": 1}

    run(main)


def test_different_timeouts_each_fire_on_time() -> None:
    agent = Agent()
    for timeout in (0.03, 0.06, 0.09):
        fallback = set_var("txn", "t", int(timeout * 100))
        sleeper(agent, f"t{timeout}", timeout=timeout, on_timeout=fallback)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        # the longest first: its timer must not hide the shorter ones
        sent = await h.send(c, (1, 1, [msg("t0.09")]), (2, 1, [msg("t0.06")]))
        sent2 = await h.send(c, (3, 1, [msg("t0.03")]))
        await until(lambda: len(h.acks(c)) == 3)
        at = dict(zip([3, 2, 1], [p[1] for p in h.progress], strict=True))
        assert names(h.acks(c)) == [(3, [("t", 3)]), (2, [("t", 6)]), (1, [("t", 9)])]
        # a timer hidden by a later one would fire 30 ms late: 20 ms of slack tells
        assert 0.03 <= at[3] - sent2.at <= 0.03 + 0.02
        assert 0.06 <= at[2] - sent.at + 0.0005 <= 0.06 + 0.02
        assert 0.09 <= at[1] - sent.at + 0.0005 <= 0.09 + 0.02

    run(main)


def test_server_wide_default_timeout_applies_to_handlers_without_their_own() -> None:
    agent = Agent()

    sleeper(agent, "default")

    @agent.on_message("own", timeout=1.0)
    async def own(m: Any) -> Action:
        await asyncio.sleep(0.1)  # past the server's timeout, within its own
        return set_var("txn", "own", 1)

    async def main() -> None:
        h = Harness(agent, DispatchSettings(handler_timeout=TIMEOUT))
        c = h.conn()
        sent = await h.send(c, (1, 1, [msg("default")]), (2, 1, [msg("own")]))
        acks = await h.wait_acks(c, 1)
        assert names(acks) == [(1, [])]  # no on_timeout: an empty ACK
        assert h.progress[0][1] - sent.at <= TIMEOUT + SLACK
        assert names(await h.wait_acks(c, 2)) == [(1, []), (2, [("own", 1)])]
        assert h.counters.handler_timeouts == {"default": 1}

    run(main)


def test_timeouts_are_logged_rate_limited(caplog: Any) -> None:
    agent = Agent()

    sleeper(agent, "m", timeout=0.01)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        for sid in (1, 2, 3):
            await h.send(c, (sid, 1, [msg("m")]))
        await h.wait_acks(c, 3)
        assert h.counters.handler_timeouts == {"m": 3}

    with caplog.at_level(logging.WARNING, logger="spoa_mp.dispatch"):
        run(main)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "'m' passed its 0.01 s deadline" in lines[0]


def test_async_batch_past_its_deadline() -> None:
    agent = Agent()

    @agent.on_batch("b", timeout=TIMEOUT, on_timeout=FALLBACK)
    async def batch(msgs: list[Any]) -> list[Action]:
        await asyncio.sleep(5)
        return [LATE] * len(msgs)

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("b"), msg("b")]), (2, 1, [msg("b")]))
        acks = await h.wait_acks(c, 2)
        assert names(acks) == [(1, [("fallback", 1), ("fallback", 1)]), (2, [("fallback", 1)])]
        assert h.counters.handler_timeouts == {"b": 3}

    run(main)


# ------------------------------------------------------------ blocking


def test_blocking_handlers_run_in_a_bounded_pool() -> None:
    lock = threading.Lock()
    state = {"now": 0, "most": 0}
    main_thread = threading.get_ident()
    gate = threading.Event()
    agent = Agent()

    @agent.on_message("m", blocking=True)
    def handler(m: Any) -> Action:
        assert threading.get_ident() != main_thread
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        gate.wait(5)
        with lock:
            state["now"] -= 1
        return set_var("txn", "x", m[0])

    async def main() -> None:
        h = Harness(agent, DispatchSettings(blocking_threads=2))
        c = h.conn()
        sent = await h.send(c, *[(sid, 1, [msg("m", sid)]) for sid in range(1, 7)])
        assert sent.acks == []
        await until(lambda: state["most"] == 2, what="two threads busy")
        gate.set()
        acks = await h.wait_acks(c, 6)
        assert sorted(names(acks)) == [(sid, [("x", sid)]) for sid in range(1, 7)]
        h.dispatcher.close()

    try:
        run(main)
    finally:
        gate.set()
    assert state["most"] == 2


@pytest.mark.parametrize("result", ["raises", "garbage"])
def test_blocking_handler_failing_gets_on_error(result: str) -> None:
    agent = Agent()

    @agent.on_message("m", blocking=True, on_error=ERROR)
    def handler(m: Any) -> Any:
        if result == "raises":
            raise OSError("database gone")
        return "not actions"

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 1)) == [(1, [("error", 1)])]
        assert h.counters.handler_errors == {"m": 1}
        h.dispatcher.close()

    run(main)


def test_blocking_batch() -> None:
    calls: list[list[int]] = []
    agent = Agent()

    @agent.on_batch("b", blocking=True)
    def batch(msgs: list[Any]) -> list[Action]:
        assert threading.current_thread().name.startswith("spoa-blocking")
        calls.append([m[0] for m in msgs])
        return [set_var("txn", "b", m[0]) for m in msgs]

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("b", 1)]), (2, 1, [msg("b", 2), msg("b", 3)]))
        acks = await h.wait_acks(c, 2)
        assert names(acks) == [(1, [("b", 1)]), (2, [("b", 2), ("b", 3)])]
        assert calls == [[1, 2, 3]]
        h.dispatcher.close()

    run(main)


def test_blocking_late_result_is_dropped(release: threading.Event) -> None:
    returned = threading.Event()
    agent = Agent()

    @agent.on_message("m", blocking=True, timeout=TIMEOUT, on_timeout=FALLBACK)
    def handler(m: Any) -> Action:
        release.wait(5)
        returned.set()
        return LATE

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        start = time.monotonic()
        await h.send(c, (1, 1, [msg("m")]))
        assert names(await h.wait_acks(c, 1)) == [(1, [("fallback", 1)])]
        assert time.monotonic() - start < 1.0
        release.set()
        await until(returned.is_set, what="the thread")
        await iterations(5)
        assert names(h.acks(c)) == [(1, [("fallback", 1)])]
        assert (h.counters.acks, h.counters.handler_timeouts) == (1, {"m": 1})
        h.dispatcher.close()

    run(main)

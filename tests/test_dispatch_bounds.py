"""Dispatcher (dispatch.py) counters, the per-connection and per-worker
bounds, closed connections and debug logs, without sockets (see
test_dispatch.py); and the registration checks of the new keywords.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import pytest
from dispatch_helpers import Harness, iterations, msg, names, run, until
from test_dispatch import X1, X2, mixed_agent, one, spy_ack_for

from spoa_mp.agent import Agent
from spoa_mp.dispatch import DispatchSettings
from spoa_mp.model import Action

# ------------------------------------------------------------ counters


def test_counters_of_a_mixed_workload() -> None:
    async def main() -> None:
        h = Harness(mixed_agent())
        c = h.conn()
        await h.send(c, (1, 1, [msg("sync", 1)]), (2, 1, [msg("eager", 2)]))
        await h.send(c, (3, 1, [msg("suspends", 3)]), (4, 1, [msg("fails", 4)]))
        await h.wait_acks(c, 4)
        n = h.counters
        assert n.messages == {"sync": 1, "eager": 1, "suspends": 1, "fails": 1}
        assert (n.notifies, n.acks, n.handler_errors) == (4, 4, {"fails": 1})
        assert n.latency.count == 4  # one observation per handler call
        assert (n.backpressure, n.handler_timeouts) == (0, {})

    run(main)


@pytest.mark.parametrize("kind", ["sync", "eager", "suspended"])
def test_a_batch_call_is_one_latency_observation(kind: str) -> None:
    agent = Agent()

    async def suspended(msgs: list[Any]) -> list[None]:
        await asyncio.sleep(0)
        return [None] * len(msgs)

    async def eager(msgs: list[Any]) -> list[None]:
        return [None] * len(msgs)

    def sync(msgs: list[Any]) -> list[None]:
        return [None] * len(msgs)

    agent.add_batch_handler("b", {"sync": sync, "eager": eager, "suspended": suspended}[kind])

    async def main() -> None:
        h = Harness(agent)
        c = h.conn()
        await h.send(c, (1, 1, [msg("b")]), (2, 1, [msg("b")]), (3, 1, [msg("b")]))
        await h.wait_acks(c, 3)
        assert h.counters.latency.count == 1

    run(main)


# ------------------------------------------------------------ bounds


class Gated:
    """An agent whose handler "m" records its argument in `started`, then
    waits until `open()` opens the gate of that number; answers x = it."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.gates: dict[int, asyncio.Future[None]] = {}
        self.agent = Agent()
        self.agent.add_handler("m", self._handler)

    async def _handler(self, m: Any) -> Action:
        self.started.append(m[0])
        await self._gate(m[0])
        return one("x", m[0])

    def _gate(self, key: int) -> asyncio.Future[None]:
        return self.gates.setdefault(key, asyncio.get_running_loop().create_future())

    def open(self, *keys: int) -> None:
        for key in keys:
            self._gate(key).set_result(None)


def five_notifies(sid: int = 1) -> list[tuple[int, int, list[Any]]]:
    """NOTIFYs sid..sid+4 (frame 1), each one "m" with its sid as argument."""
    return [(n, 1, [msg("m", n)]) for n in range(sid, sid + 5)]


def test_max_in_flight_defers_notifies_and_starts_them_in_order() -> None:
    g = Gated()

    async def main() -> None:
        h = Harness(g.agent, DispatchSettings(max_in_flight=2))
        c = h.conn()
        await h.send(c, *five_notifies())
        assert g.started == [1, 2]
        assert c.in_flight == 5  # two running, three waiting unstarted
        g.open(2)
        assert names(await h.wait_acks(c, 1)) == [(2, [("x", 2)])]
        await until(lambda: g.started == [1, 2, 3])
        g.open(1, 3, 4, 5)
        acks = await h.wait_acks(c, 5)
        assert g.started == [1, 2, 3, 4, 5]
        assert sorted(names(acks)) == [(sid, [("x", sid)]) for sid in range(1, 6)]
        assert (c.in_flight, h.dispatcher.pending) == (0, 0)
        assert h.counters.messages == {"m": 5}  # counted once, not again when started

    run(main)


def test_max_pending_pauses_and_calls_on_capacity() -> None:
    g = Gated()

    async def main() -> None:
        h = Harness(g.agent, DispatchSettings(max_pending=3))
        a, b = h.conn(), h.conn()
        await h.send(a, (1, 1, [msg("m", 1)]), (2, 1, [msg("m", 2)]))
        assert not h.dispatcher.paused
        await h.send(b, (1, 1, [msg("m", 3)]))
        assert (h.dispatcher.paused, h.dispatcher.pending) == (True, 3)
        assert (h.counters.backpressure, h.capacity) == (1, 0)
        g.open(3)
        await h.wait_acks(b, 1)
        assert (h.dispatcher.paused, h.dispatcher.pending, h.capacity) == (False, 2, 1)
        g.open(1, 2)
        await h.wait_acks(a, 2)
        assert (h.dispatcher.pending, h.capacity, h.counters.backpressure) == (0, 1, 1)

    run(main)


def test_forget_drops_deferred_notifies_of_a_closed_connection() -> None:
    g = Gated()

    async def main() -> None:
        h = Harness(g.agent, DispatchSettings(max_in_flight=2))
        c = h.conn()
        await h.send(c, *five_notifies())
        c.closed = True
        h.dispatcher.forget(c)
        assert c.in_flight == 2
        g.open(1, 2)
        await until(lambda: h.dispatcher.pending == 0)
        await iterations()
        assert (g.started, c.in_flight, h.acks(c)) == ([1, 2], 0, [])
        assert [conn for conn, _ in h.progress] == [c]

    run(main)


def test_closed_connection_gets_no_late_ack_and_no_error(caplog: Any) -> None:
    g = Gated()

    async def main() -> None:
        h = Harness(g.agent)
        c = h.conn()
        spy = spy_ack_for(c)
        await h.send(c, (1, 1, [msg("m", 1)]))
        c.closed = True
        h.dispatcher.forget(c)
        g.open(1)
        await until(lambda: h.progress)
        assert (spy, c.in_flight, h.dispatcher.pending) == ([], 0, 0)

    with caplog.at_level(logging.WARNING):
        run(main)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------ debug


def test_debug_logs_each_notify_and_ack(caplog: Any) -> None:
    async def main() -> None:
        h = Harness(mixed_agent(), debug=True)
        c = h.conn()
        await h.send(c, (5, 6, [msg("sync", 1)]), (7, 8, [msg("suspends", 2)]))
        await h.wait_acks(c, 2)
        return c.fd

    with caplog.at_level(logging.DEBUG, logger="spoa_mp.dispatch"):
        fd = run(main)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ", 3)[:3] for line in lines if "NOTIFY" in line or "ACK" in line] == [
        ["conn", f"{fd}:", "NOTIFY"],
        ["conn", f"{fd}:", "NOTIFY"],
        ["conn", f"{fd}:", "ACK"],
        ["conn", f"{fd}:", "ACK"],
    ]
    text = "\n".join(lines)
    assert "NOTIFY sid=5 fid=6" in text
    assert "NOTIFY sid=7 fid=8" in text
    assert "ACK sid=5 fid=6" in text
    assert "ACK sid=7 fid=8" in text


# ------------------------------------------------------------ registration


def noop(m: Any) -> None:
    return None


@pytest.mark.parametrize("register", ["on_message", "on_batch"])
@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
        ([1], TypeError),
    ],
    ids=["0", "-1", "-0.5", "nan", "inf", "str", "True", "list"],
)
def test_bad_timeout_is_refused_at_the_decorator(register: str, timeout: Any, error: type) -> None:
    agent = Agent()
    with pytest.raises(error, match=r"handler for 'm': timeout must be a (positive )?number"):
        getattr(agent, register)("m", timeout=timeout)
    with pytest.raises(error, match="timeout"):
        agent.add_handler("m", noop, timeout=timeout)
    assert dict(agent.handlers) == {}


@pytest.mark.parametrize("what", ["on_timeout", "on_error"])
@pytest.mark.parametrize("bad", ["x", 1, [X1, "y"], {"a": X1}])
def test_bad_fallback_is_refused(what: str, bad: Any) -> None:
    agent = Agent()
    with pytest.raises(TypeError, match=f"handler for 'm': {what}: a handler must return"):
        agent.on_message("m", **{what: bad})
    assert dict(agent.handlers) == {}


def test_blocking_coroutine_function_is_refused() -> None:
    agent = Agent()

    async def handler(m: Any) -> None:
        return None

    with pytest.raises(TypeError, match="blocking=True runs a plain function in a thread"):
        agent.on_message("m", blocking=True)(handler)
    with pytest.raises(TypeError, match="blocking=True"):
        agent.on_batch("m", blocking=True)(handler)
    assert dict(agent.handlers) == {}


def test_good_keywords_are_kept() -> None:
    agent = Agent()
    agent.on_message("m", timeout=1, on_timeout=X1, on_error=[X1, X2], blocking=True)(noop)
    reg = agent.handlers["m"]
    assert (reg.timeout, reg.on_timeout, reg.on_error, reg.blocking) == (1.0, (X1,), (X1, X2), True)
    assert isinstance(reg.timeout, float)


@pytest.mark.parametrize(
    "kw",
    [
        {"handler_timeout": 0},
        {"handler_timeout": math.inf},
        {"handler_timeout": "1"},
        {"max_pending": 0},
        {"blocking_threads": 0},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_dispatch_settings_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError), match="--"):
        DispatchSettings(**kw)

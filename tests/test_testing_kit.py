"""The test kit (spoa_mp.testing): AgentClient runs every kind of handler
through the real protocol core and dispatcher; serve() runs a real server."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import psutil
import pytest

from spoa_mp.agent import Agent
from spoa_mp.dispatch import DispatchSettings
from spoa_mp.model import DataType, Int32, Message, String, UInt64, set_var, unset_var
from spoa_mp.testing import AgentClient, Msg, RunningAgent, ServeTimeouts, SpoaError, serve

pytest_plugins = ["spoa_mp.testing_pytest"]

ALLOW = set_var("txn", "allowed", True)
FALLBACK = set_var("txn", "fallback", True)
BROKEN = set_var("txn", "broken", True)


def make_agent() -> Agent:
    agent = Agent("kit")

    @agent.on_message("score")
    def score(msg: Message) -> Any:
        return set_var("sess", "ip_score", 0 if msg["ip"] == IPv4Address("192.0.2.1") else 80)

    @agent.on_message("types")
    def types(msg: Message) -> Any:
        # the SPOP type of each argument, as the handler sees it
        return [set_var("txn", f"t{i}", int(msg.type_of(i))) for i in range(len(msg))]

    @agent.on_message("eager")
    async def eager(msg: Message) -> Any:
        return set_var("txn", "task", asyncio.current_task() is not None)

    @agent.on_message("suspending")
    async def suspending(msg: Message) -> Any:
        await asyncio.sleep(0.01)
        return [set_var("txn", "slept", True), unset_var("txn", "reason")]

    @agent.on_message("threaded", blocking=True)
    def threaded(msg: Message) -> Any:
        return set_var("txn", "thread", threading.current_thread().name)

    @agent.on_message("slow", timeout=0.05, on_timeout=FALLBACK)
    async def slow(msg: Message) -> Any:
        await asyncio.sleep(30)
        return ALLOW

    @agent.on_message("slow-thread", blocking=True, timeout=0.05, on_timeout=FALLBACK)
    def slow_thread(msg: Message) -> Any:
        threading.Event().wait(0.5)  # a thread cannot be stopped: its result is dropped
        return ALLOW

    @agent.on_message("raises", on_error=BROKEN)
    def raises(msg: Message) -> Any:
        raise RuntimeError("boom")

    @agent.on_message("garbage", on_error=BROKEN)
    async def garbage(msg: Message) -> Any:
        return "not an action"

    @agent.on_message("forever")
    async def forever(msg: Message) -> Any:
        await asyncio.Event().wait()

    return agent


@pytest.fixture
def client() -> Any:
    with AgentClient(make_agent()) as c:
        yield c


# ------------------------------------------------------------------ AgentClient


def test_sync_handler_gets_its_arguments_and_the_ack_decodes(client: AgentClient) -> None:
    blocked = client.send("score", ip=IPv4Address("192.0.2.1"))
    assert blocked.actions == [set_var("sess", "ip_score", 0)]
    assert blocked.vars == {"sess.ip_score": 0}
    assert blocked["sess.ip_score"] == 0
    assert (blocked.timed_out, blocked.failed) == (False, False)
    assert client.send("score", ip=IPv4Address("198.51.100.1"))["sess.ip_score"] == 80
    assert client.counters.messages == {"score": 2}
    assert client.counters.acks == 2


def test_arguments_travel_typed_as_haproxy_sends_them(client: AgentClient) -> None:
    values = [7, -7, 1 << 63, "text", b"\x00\x01", True, None, IPv6Address("2001:db8::1")]
    values += [Int32(5), UInt64(9), String(b"raw")]
    got = client.send("types", *values).vars
    assert [got[f"txn.t{i}"] for i in range(len(values))] == [
        DataType.INT64, DataType.INT64, DataType.UINT64, DataType.STRING, DataType.BINARY,
        DataType.BOOL, DataType.NULL, DataType.IPV6, DataType.INT32, DataType.UINT64,
        DataType.STRING,
    ]  # fmt: skip


def test_an_argument_without_a_spop_type_is_refused(client: AgentClient) -> None:
    with pytest.raises(TypeError, match="no SPOP type for a float"):
        client.send("score", ip=1.5)


def test_coroutines_finished_eagerly_or_after_suspending(client: AgentClient) -> None:
    assert client.send("eager").actions == [set_var("txn", "task", True)]
    slept = client.send("suspending")
    assert slept.actions == [set_var("txn", "slept", True), unset_var("txn", "reason")]
    assert slept.vars == {"txn.slept": True}
    assert slept.unset == ["txn.reason"]


def test_blocking_handler_runs_in_the_thread_pool(client: AgentClient) -> None:
    name = client.send("threaded")["txn.thread"]
    assert isinstance(name, str)
    assert name.startswith("spoa-blocking")


def test_deadline_acks_on_timeout_after_the_timeout(client: AgentClient) -> None:
    result = client.send("slow")
    assert result.actions == [FALLBACK]
    assert result.timed_out is True
    assert client.timeouts == {"slow": 1}
    # the next message is not held up by the cancelled one
    assert client.send("eager").timed_out is False


def test_the_deadline_runs_on_the_loop_clock() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        async with AgentClient(make_agent()) as c:
            start = loop.time()
            assert (await c.asend("slow")).timed_out is True
            return loop.time() - start

    assert asyncio.run(main()) >= 0.05


def test_deadline_of_a_blocking_handler(client: AgentClient) -> None:
    result = client.send("slow-thread")
    assert (result.actions, result.timed_out) == ([FALLBACK], True)
    assert client.timeouts == {"slow-thread": 1}


def test_server_wide_handler_timeout_applies_to_handlers_without_one() -> None:
    with AgentClient(make_agent(), handler_timeout=0.05) as c:
        result = c.send("forever")
    assert (result.actions, result.timed_out) == ([], True)
    assert c.timeouts == {"forever": 1}


def test_the_server_dispatch_settings_apply_and_handler_timeout_replaces_theirs() -> None:
    with AgentClient(make_agent(), dispatch=DispatchSettings(handler_timeout=0.05)) as c:
        assert c.send("forever").timed_out
    settings = DispatchSettings(handler_timeout=60, blocking_threads=1)
    with AgentClient(make_agent(), handler_timeout=0.05, dispatch=settings) as c:
        assert c.send("forever").timed_out  # within the ACK wait: 0.05 s won, not 60
    assert c.timeouts == {"forever": 1}


@pytest.mark.parametrize("name", ["raises", "garbage"])
def test_a_failing_handler_is_acked_with_on_error(client: AgentClient, name: str) -> None:
    result = client.send(name)
    assert (result.actions, result.failed, result.timed_out) == ([BROKEN], True, False)
    assert client.errors == {name: 1}


def test_unknown_message_is_a_key_error_unless_not_strict() -> None:
    agent = make_agent()
    with AgentClient(agent) as c, pytest.raises(KeyError, match="no handler for 'scor'"):
        c.send("scor", ip=IPv4Address("192.0.2.1"))
    with AgentClient(agent, strict=False) as c:
        result = c.send("scor", ip=IPv4Address("192.0.2.1"))
        assert result.actions == []  # an empty ACK, as HAProxy expects
        assert c.counters.messages == {}
        assert c.counters.acks == 1


def test_a_batch_handler_sees_one_reads_messages_together() -> None:
    agent = Agent("batch")
    calls: list[list[int]] = []

    @agent.on_batch("lookup")
    async def lookup(msgs: list[Message]) -> list[Any]:
        calls.append([m["n"] for m in msgs])  # type: ignore[misc]
        await asyncio.sleep(0)
        return [set_var("txn", "double", 2 * m["n"]) for m in msgs]  # type: ignore[operator]

    @agent.on_message("other")
    def other(msg: Message) -> Any:
        return ALLOW

    with AgentClient(agent) as c:
        results = c.send_many([Msg("lookup", n=1), Msg("other"), Msg("lookup", n=2)])
        assert [r.actions for r in results] == [
            [set_var("txn", "double", 2)], [ALLOW], [set_var("txn", "double", 4)],
        ]  # fmt: skip
        assert calls == [[1, 2]]
        assert c.send("lookup", n=5)["txn.double"] == 10
        assert calls == [[1, 2], [5]]
        assert len({r.stream_id for r in results}) == 3


def test_several_messages_in_one_notify_get_one_joined_ack(client: AgentClient) -> None:
    (result,) = client.send_many(
        [Msg("score", ip=IPv4Address("192.0.2.1")), Msg("suspending"), Msg("raises")],
        one_notify=True,
    )
    assert result.actions == [
        set_var("sess", "ip_score", 0), set_var("txn", "slept", True),
        unset_var("txn", "reason"), BROKEN,
    ]  # fmt: skip
    assert result.timed_out is None  # known for send() only
    assert client.errors == {"raises": 1}


def test_a_handler_that_never_finishes_fails_the_wait_in_time() -> None:
    with AgentClient(make_agent(), wait_timeout=0.1) as c, pytest.raises(TimeoutError) as e:
        c.send("forever")
    assert "forever" in str(e.value)


def test_worker_start_hooks_run_once_on_the_loop_the_handlers_use() -> None:
    agent = Agent("hooks")
    state: dict[str, Any] = {}

    @agent.on_worker_start
    async def connect() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["queue"] = asyncio.Queue()  # bound to the loop of the first use
        state["starts"] = state.get("starts", 0) + 1

    @agent.on_message("put")
    async def put(msg: Message) -> Any:
        assert asyncio.get_running_loop() is state["loop"]
        await state["queue"].put(msg["v"])
        return set_var("txn", "queued", state["queue"].qsize())

    with AgentClient(agent) as c:
        assert c.send("put", v=1)["txn.queued"] == 1
        assert c.send("put", v=2)["txn.queued"] == 2
    assert state["starts"] == 1
    assert not agent.frozen  # the kit freezes nothing
    with AgentClient(agent, worker_start=False) as c:
        c.send("put", v=3)
    assert state["starts"] == 1


def test_async_use_on_the_running_loop() -> None:
    async def main() -> list[Any]:
        async with AgentClient(make_agent()) as c:
            one = await c.asend("suspending")
            many = await c.asend_many([Msg("eager"), Msg("slow")])
            with pytest.raises(RuntimeError, match="use await"):
                c.send("eager")  # a sync call would block the running loop
            return [one.vars, [r.actions for r in many], c.timeouts]

    assert asyncio.run(main()) == [
        {"txn.slept": True}, [[set_var("txn", "task", True)], [FALLBACK]], {"slow": 1},
    ]  # fmt: skip


def test_an_app_spec_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kit_spec_app.py").write_text(APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    with AgentClient("kit_spec_app:agent") as c:
        assert c.send("check", ip=IPv4Address("192.0.2.1")).vars == {"txn.blocked": True}


def test_the_spoa_client_fixture(spoa_client: Callable[..., AgentClient]) -> None:
    c = spoa_client(make_agent(), handler_timeout=0.05)
    assert c.send("forever").timed_out is True


def test_a_closed_client_says_so() -> None:
    c = AgentClient(make_agent())
    assert c.send("eager")["txn.task"] is True
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.send("eager")


# ------------------------------------------------------------------ serve()

APP = textwrap.dedent("""\
    import asyncio
    from ipaddress import IPv4Address

    from spoa_mp.agent import Agent
    from spoa_mp.model import set_var

    agent = Agent("kit-app")

    @agent.on_message("check")
    def check(msg):
        return set_var("txn", "blocked", msg["ip"] == IPv4Address("192.0.2.1"))

    @agent.on_message("slow", timeout=0.05, on_timeout=set_var("txn", "fallback", True))
    async def slow(msg):
        await asyncio.sleep(30)
""")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "kitapp.py").write_text(APP)
    return tmp_path


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.e2e
def test_serve_runs_a_real_server_and_stops_it(app_dir: Path) -> None:
    with serve("kitapp:agent", workers=2, cwd=app_dir) as server:
        assert server.port > 0
        assert server.send("check", ip=IPv4Address("192.0.2.1")).actions == [
            set_var("txn", "blocked", True)
        ]
        assert server.send("check", ip=IPv4Address("198.51.100.7"))["txn.blocked"] is False
        assert server.send("slow").vars == {"txn.fallback": True}
        assert server.healthcheck() == "SPOA server is ok"
        workers = psutil.Process(server.pid).children()
        assert len(workers) == 2
    assert process_gone(server.pid)
    assert all(process_gone(w.pid) for w in workers)


@pytest.mark.e2e
def test_serve_reports_a_server_that_cannot_start(app_dir: Path) -> None:
    with (
        pytest.raises(SpoaError, match=r"exited with status 2[\s\S]*nosuchmodule"),
        serve("nosuchmodule:agent", cwd=app_dir),
    ):
        pass


@pytest.mark.e2e
def test_serve_gives_up_on_a_server_not_ready_within_timeouts_start(app_dir: Path) -> None:
    # two workers asked for, the ready lines of both cannot come within 1 ms
    with (
        pytest.raises(SpoaError, match=r"no (listening socket|2 worker\(s\) ready) within 0.001 s"),
        serve("kitapp:agent", workers=2, cwd=app_dir, timeouts=ServeTimeouts(start=0.001)),
    ):
        pass


@pytest.mark.e2e
def test_an_error_in_the_block_carries_the_server_log(app_dir: Path) -> None:
    with pytest.raises(AssertionError) as e, serve("kitapp:agent", cwd=app_dir):
        raise AssertionError("a failing test")
    assert any("worker 1 ready" in note for note in e.value.__notes__)


@pytest.mark.e2e
def test_the_spoa_server_fixture(spoa_server: Callable[..., RunningAgent], app_dir: Path) -> None:
    server = spoa_server("kitapp:agent", cwd=app_dir)
    assert server.send("check", ip=IPv4Address("192.0.2.1"))["txn.blocked"] is True
    assert "kitapp:agent" in server.log()


@pytest.mark.e2e
def test_serve_uses_this_python(app_dir: Path) -> None:
    with serve("kitapp:agent", cwd=app_dir) as server:
        assert os.path.samefile(psutil.Process(server.pid).exe(), sys.executable)

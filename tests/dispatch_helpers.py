"""A Dispatcher driven without sockets: a real AgentConnection after the
HELLO handshake, NOTIFY frames built with the codec's Encoder, ACK frames
read back from data_to_send() and decoded (for tests/test_dispatch*.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from conftest import VECTORS, decode_meanings

from spoa_mp.agent import Agent
from spoa_mp.codec import Decoder, Encoder, FrameType
from spoa_mp.counters import Counters
from spoa_mp.dispatch import Dispatcher, DispatchSettings
from spoa_mp.protocol import AgentConnection, AgentSettings

HELLO = bytes.fromhex(next(f["hex"] for f in VECTORS["frames"] if f["name"] == "haproxy-hello 2.6"))
ENC = Encoder()
WAIT = 5.0  # the bound of every wait for a late ACK

# a NOTIFY as the tests write it: (sid, fid, [(message name, [(arg name, value), ...]), ...])
Notify = tuple[int, int, list[tuple[str, list[tuple[str, Any]]]]]
# an ACK as the tests read it: (sid, fid, [(var name, value) or (var name,) for unset-var])
Ack = tuple[int, int, list[tuple[Any, ...]]]


class Sent(NamedTuple):
    """What one dispatch() did before it returned."""

    at: float  # loop time just before dispatch()
    acks: list[Ack]  # every ACK of the connection queued by then
    tasks: int  # tasks it created


def msg(name: str, *values: Any) -> tuple[str, list[tuple[str, Any]]]:
    """A message with unnamed arguments."""
    return (name, [("", v) for v in values])


class FakeConn:
    """What the dispatcher needs of a worker's connection (dispatch.Conn)."""

    def __init__(self, proto: AgentConnection, fd: int) -> None:
        self.proto = proto
        self.closed = False
        self.in_flight = 0
        self.fd = fd


class Harness:
    """One Dispatcher over an agent's handlers; `progress` records every
    on_progress(conn) call with its loop time, `capacity` the on_capacity() calls."""

    def __init__(
        self,
        agent: Agent,
        settings: DispatchSettings | None = None,
        debug: bool = False,
    ) -> None:
        self.handlers = dict(agent.handlers)
        self.counters = Counters()
        self.progress: list[tuple[FakeConn, float]] = []
        self.capacity = 0
        self.dispatcher = Dispatcher(
            self.handlers,
            self.counters,
            settings or DispatchSettings(),
            on_progress=self._on_progress,
            on_capacity=self._on_capacity,
            debug=debug,
        )
        self.decoder = Decoder(names=self.handlers)
        self._fds = iter(range(10, 10_000))
        self._acks: dict[FakeConn, list[Ack]] = {}

    def _on_progress(self, conn: FakeConn) -> None:
        self.progress.append((conn, _loop_time()))

    def _on_capacity(self) -> None:
        self.capacity += 1

    def conn(self) -> FakeConn:
        """A connection past the HELLO handshake."""
        proto = AgentConnection(AgentSettings(), decoder=self.decoder)
        assert len(proto.feed(HELLO)) == 0
        assert proto.data_to_send()[4] == FrameType.AGENT_HELLO
        proto.take_events()
        return FakeConn(proto, next(self._fds))

    async def send(self, conn: FakeConn, *notifies: Notify) -> Sent:
        """One read holding these NOTIFY frames, handed to dispatch() from a
        loop callback (as the worker's reader does: no current task)."""
        data = b"".join(ENC.notify_frame(s, f, messages=m) for s, f, m in notifies)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Sent] = loop.create_future()

        def readable() -> None:
            read = conn.proto.feed(data)
            assert len(read) == len(notifies)
            assert not conn.proto.closing
            before = asyncio.all_tasks(loop)
            at = loop.time()
            self.dispatcher.dispatch(conn, read)
            new_tasks = asyncio.all_tasks(loop) - before
            done.set_result(Sent(at, self.acks(conn), len(new_tasks)))

        loop.call_soon(readable)
        return await done

    def acks(self, conn: FakeConn) -> list[Ack]:
        """Every ACK queued on conn so far, in order (decoded from its bytes)."""
        data = conn.proto.data_to_send()
        frames, consumed, error = decode_meanings(data)
        assert (consumed, error) == (len(data), 0)
        got = self._acks.setdefault(conn, [])
        for f in frames:
            assert f["type"] == FrameType.ACK
            assert f["flags"] == 1
            got.append((f["sid"], f["fid"], [_action(a) for a in f["actions"]]))
        return list(got)

    async def wait_acks(self, conn: FakeConn, n: int, timeout: float = WAIT) -> list[Ack]:
        """The first n ACKs of conn, waiting (bounded) for late ones."""
        await until(lambda: len(self.acks(conn)) >= n, timeout, f"{n} ACK(s)")
        return self.acks(conn)


def _action(a: list[Any]) -> tuple[Any, ...]:
    if a[0] == "unset-var":
        return (a[2],)
    value = a[4]
    return (a[2], bytes(value) if isinstance(value, bytes) else value)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


async def until(cond: Callable[[], object], timeout: float = WAIT, what: str = "it") -> None:
    """Let the loop run until cond() is true (AssertionError after timeout)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.001)


async def iterations(n: int = 3) -> None:
    """Let the loop run n iterations (for what must NOT happen)."""
    for _ in range(n):
        await asyncio.sleep(0)


def run(coro_fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.run(coro_fn(*args))


def names(acks: Sequence[Ack]) -> list[tuple[int, list[tuple[Any, ...]]]]:
    """(sid, actions) of each ACK."""
    return [(sid, actions) for sid, _, actions in acks]

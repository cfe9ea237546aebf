"""ACK assembly for the dispatcher (dispatch.py): the markers in a read's
results, the streams whose ACK waits for a handler, the results of a
NOTIFY's messages joined into one ACK, and the ACKs on their way to a
connection: those of a read queued at once, the late ones gathered per
connection until the loop iteration ends, then encoded together.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from spoa_mp.agent import normalize_actions
from spoa_mp.counters import Counters
from spoa_mp.logs import RateLimitedLog
from spoa_mp.model import Action
from spoa_mp.protocol import AgentConnection

# the dispatcher's logger: operators and tests filter ACK lines on its name
log = logging.getLogger("spoa_mp.dispatch")

Result = Action | tuple[Action, ...] | None
"""A handler's result once checked: what the encoder takes."""

Ready: TypeAlias = "tuple[array[int], list[Result]]"  # array[int] is not subscriptable at run time
"""The ACKs of one connection: (sid, fid) pairs, one result per pair."""


class Conn(Protocol):
    """What the dispatcher needs of a connection."""

    proto: AgentConnection
    closed: bool
    in_flight: int  # NOTIFYs of this connection awaiting a handler
    fd: int


class _Pending:
    """Marks a message whose result comes later (a slot in a read's results)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


PENDING: Any = _Pending("PENDING")
DEFERRED: Any = _Pending("DEFERRED")  # not started: the connection is at --max-in-flight


class Stream:
    """A NOTIFY whose ACK waits for at least one handler."""

    __slots__ = ("conn", "fid", "missing", "parts", "sid")

    def __init__(self, conn: Conn, sid: int, fid: int, parts: list[Any], missing: int) -> None:
        self.conn = conn
        self.sid = sid
        self.fid = fid
        self.parts = parts  # one result per message; PENDING until its handler is done
        self.missing = missing  # how many parts are PENDING

    def result(self) -> Result:
        return self.parts[0] if len(self.parts) == 1 else joined(self.parts)


class Acks:
    """The ACKs on their way to the connections.

    `send()` queues ACKs on a connection now (a read's). `ready()` gathers a
    stream whose last handler finished; the first one of a loop iteration
    schedules `flush()`, which takes them all with `take()`: one encode call
    per connection after every task that finishes in that iteration.
    """

    def __init__(
        self, counters: Counters, noisy: RateLimitedLog, debug: bool, flush: Callable[[], None]
    ) -> None:
        self.counters = counters
        self.debug = debug
        self._noisy = noisy
        self._flush = flush
        self._ready: dict[Conn, Ready] = {}
        self._flush_scheduled = False

    def ready(self, stream: Stream) -> None:
        """Every handler of the stream is done: its ACK leaves with this loop iteration's."""
        conn = stream.conn
        ready = self._ready.get(conn)
        if ready is None:
            ready = self._ready[conn] = (array("Q"), [])
        ready[0].append(stream.sid)
        ready[0].append(stream.fid)
        ready[1].append(stream.result())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # after every task that finishes in this loop iteration
            asyncio.get_running_loop().call_soon(self._flush)

    def take(self) -> dict[Conn, Ready]:
        """The ACKs gathered since the last flush, by connection (for flush())."""
        self._flush_scheduled = False
        ready, self._ready = self._ready, {}
        return ready

    def send(self, conn: Conn, ids: array[int], results: list[Result]) -> None:
        """Queue these ACKs on the connection: one encode call."""
        self.counters.acks += len(results)
        if self.debug:
            for j, result in enumerate(results):
                actions = list(normalize_actions(result))
                log.debug(
                    "conn %d: ACK sid=%d fid=%d %r", conn.fd, ids[2 * j], ids[2 * j + 1], actions
                )
        cut = conn.proto.ack_for(ids, results)
        if cut:
            self.counters.acks_cut += len(cut)
            self._noisy.warning(
                "cut",
                "conn %d: %d ACK(s) cut to max-frame-size %d",
                conn.fd,
                len(cut),
                conn.proto.max_frame_size,
            )


def joined(parts: list[Any]) -> tuple[Action, ...]:
    """The results of one NOTIFY's messages as one ACK's actions."""
    actions: list[Action] = []
    for part in parts:
        if part.__class__ is Action:
            actions.append(part)
        elif part:
            actions += part
    return tuple(actions)


def per_notify(results: list[Any], counts: list[int]) -> list[Result]:
    """Message results joined into one result per NOTIFY."""
    out: list[Result] = []
    at = 0
    for count in counts:
        out.append(results[at] if count == 1 else joined(results[at : at + count]))
        at += count
    return out

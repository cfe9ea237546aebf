"""The in-process half of the test kit (see spoa_mp.testing): an `AgentClient`
that plays HAProxy's side of one connection without a socket.

It does what a worker does with a read, with the worker's own parts: a real
HAPROXY-HELLO goes through an `AgentConnection`, each NOTIFY is encoded by
the codec and fed to it, the `Dispatcher` runs the handlers (inline,
eagerly stepped coroutines, batches, the thread pool, deadlines), and the
ACK frames it queues are decoded back into `Action` objects. Only the
socket is missing; the event loop is real, so `timeout=0.05` waits 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

from spoa_mp.agent import Agent, load_app
from spoa_mp.codec import Decoder, Encoder, FrameType, status_reason
from spoa_mp.counters import Counters
from spoa_mp.dispatch import Dispatcher, DispatchSettings
from spoa_mp.events import ProtocolError
from spoa_mp.exchange import Reply, hello_frame, parse_reply
from spoa_mp.handshake import AgentSettings
from spoa_mp.model import (
    ACTION_SET_VAR,
    Action,
    DataType,
    Int32,
    Int64,
    Scope,
    String,
    UInt32,
    UInt64,
    Value,
    set_var,
    unset_var,
)
from spoa_mp.notifies import Notifies
from spoa_mp.protocol import AgentConnection

__all__ = ["AgentClient", "Msg", "Result", "notify_args", "reply_actions"]

WAIT_TIMEOUT = 5.0  # default bound on waiting for one ACK
_T = TypeVar("_T")


class Msg:
    """One SPOE message to send: ``Msg("check", IPv4Address(...), ua="curl")``.

    Positional arguments are unnamed (what ``args src`` sends), keyword
    arguments named (``args ip=src``); for names that are not Python
    identifiers use ``Msg("check", **{"x-forwarded": ...})``.
    """

    __slots__ = ("args", "name")

    def __init__(self, name: str, /, *args: object, **kwargs: object) -> None:
        self.name = name
        self.args = notify_args(args, kwargs)

    def __repr__(self) -> str:
        return f"Msg({self.name!r}, {self.args!r})"


_INT_TYPES: dict[int, type[int]] = {
    DataType.INT32: Int32,
    DataType.UINT32: UInt32,
    DataType.INT64: Int64,
    DataType.UINT64: UInt64,
}


def _typed(value: object) -> Value:
    """A Python value as HAProxy would send it: integer samples go out as
    INT64, strings as STRING; explicit types (Int32, String, ...) are kept."""
    if value is None or isinstance(value, bool | String | IPv4Address | IPv6Address):
        return value
    if isinstance(value, Int32 | UInt32 | Int64 | UInt64):
        return value
    if isinstance(value, int):
        return Int64(value) if value < (1 << 63) else UInt64(value)
    if isinstance(value, str):
        return String(value.encode())
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(
        f"no SPOP type for a {type(value).__name__} argument: use None, bool, int, str, "
        "bytes, an ipaddress address, or a spoa_mp.model type (Int32, String, ...)"
    )


def notify_args(args: Iterable[object], kwargs: Mapping[str, object]) -> list[tuple[str, Value]]:
    """(name, typed value) pairs of a NOTIFY message: unnamed first, then named."""
    return [("", _typed(v)) for v in args] + [(k, _typed(v)) for k, v in kwargs.items()]


def reply_actions(reply: Reply) -> list[Action]:
    """The actions of a decoded ACK as `Action` objects, equal to the ones the
    handler built (each value keeps the SPOP type it travelled with)."""
    out = []
    for action, scope, name, type_, value in reply.actions:
        if action != ACTION_SET_VAR:
            out.append(unset_var(Scope(scope), name))
            continue
        sized = _INT_TYPES.get(type_)
        if sized is not None and isinstance(value, int) and not isinstance(value, bool):
            out.append(set_var(Scope(scope), name, sized(value)))
        else:
            out.append(set_var(Scope(scope), name, value))
    return out


@dataclass(frozen=True)
class Result:
    """The ACK of one NOTIFY.

    `actions` compare equal to what the handler returned (``set_var(...)``);
    `vars` maps ``"scope.name"`` to the value of each set-var (STRING values
    as `str`), `unset` lists the unset-vars. `timed_out` / `failed` say
    whether the handler passed its deadline (ACKed with `on_timeout`) or
    raised (ACKed with `on_error`); they are known for `send()` only (None
    in the results of `send_many()`: see `AgentClient.timeouts`).
    """

    actions: list[Action]
    stream_id: int = 0
    frame_id: int = 0
    timed_out: bool | None = None
    failed: bool | None = None
    vars: dict[str, Value] = field(init=False, repr=False)
    unset: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        found: dict[str, Value] = {}
        unset: list[str] = []
        for a in self.actions:
            var = f"{Scope(a.scope).name.lower()}.{a.name.decode()}"
            if a.action == ACTION_SET_VAR:
                value = a.value
                found[var] = value.text() if isinstance(value, String) else value
            else:
                unset.append(var)
        object.__setattr__(self, "vars", found)
        object.__setattr__(self, "unset", unset)

    def __getitem__(self, var: str) -> Value:
        """``result["txn.bot"]``: a set-var's value (KeyError when not set)."""
        return self.vars[var]


class _Conn:
    """The dispatcher's view of a connection (dispatch.Conn)."""

    def __init__(self, proto: AgentConnection) -> None:
        self.proto = proto
        self.closed = False
        self.in_flight = 0
        self.fd = -1


class AgentClient:
    """HAProxy's side of one connection to `agent` (an Agent or a
    ``"module:attr"`` spec), in-process::

        client = AgentClient(agent)
        result = client.send("check-client-ip", ip=IPv4Address("192.0.2.1"))
        assert result.actions == [set_var("sess", "ip_score", 0)]
        assert result["sess.ip_score"] == 0

    Sync calls (`send`, `send_many`) run a private event loop kept across
    calls, so what a handler or a worker-start hook binds to the loop (a
    client connection) stays usable; in async code use `asend` /
    `asend_many` on the running loop instead (one loop per client). The
    agent's `on_worker_start` hooks run once, before the first message (as
    in a worker after the fork), unless `worker_start=False`. The agent is
    not frozen. `dispatch` holds the server's handler options
    (--handler-timeout, --max-in-flight, --max-pending, --blocking-threads;
    by default the server's, with 4 blocking threads); `handler_timeout`,
    the one a test sets most, replaces its handler_timeout. A message no
    handler takes raises KeyError (a typo, most likely) unless
    `strict=False`, which sends it as HAProxy would (an empty ACK comes
    back). Each ACK is waited for at most `wait_timeout` seconds
    (TimeoutError).
    """

    def __init__(
        self,
        agent: Agent | str,
        *,
        handler_timeout: float | None = None,
        dispatch: DispatchSettings | None = None,
        worker_start: bool = True,
        strict: bool = True,
        wait_timeout: float = WAIT_TIMEOUT,
    ) -> None:
        self.agent = load_app(agent) if isinstance(agent, str) else agent
        self.counters = Counters()
        self.wait_timeout = wait_timeout
        settings = DispatchSettings(blocking_threads=4) if dispatch is None else dispatch
        if handler_timeout is not None:
            settings = replace(settings, handler_timeout=handler_timeout)
        self._settings = settings
        self._worker_start = worker_start
        self._strict = strict
        self._encoder = Encoder()
        self._sids = itertools.count(1)
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one we run on
        self._conn: _Conn | None = None
        self._dispatcher: Dispatcher | None = None
        self._decoder: Decoder | None = None
        self._progress: asyncio.Event | None = None
        self._out = b""  # agent bytes not decoded yet
        self._closed = False

    # ------------------------------------------------------------ life

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AgentClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def start(self) -> None:
        """Run the worker-start hooks and the handshake (done by the first send)."""
        if self._closed:
            raise RuntimeError("this AgentClient is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if loop is not self._loop:
                raise RuntimeError(
                    "this AgentClient runs on another event loop: use one client per loop"
                )
            return
        self._loop = loop
        self._progress = asyncio.Event()
        if self._worker_start:
            for hook in self.agent.worker_start_hooks:
                result = hook.fn()
                if inspect.isawaitable(result):
                    await result
        handlers = dict(self.agent.handlers)
        settings = AgentSettings()
        self._decoder = Decoder(max_frame_size=settings.max_frame_size)
        proto = AgentConnection(
            settings,
            Decoder(max_frame_size=settings.max_frame_size, names=tuple(handlers)),
            Encoder(),
            self.counters.frames,
        )
        self._conn = _Conn(proto)
        self._dispatcher = Dispatcher(
            handlers, self.counters, self._settings, on_progress=self._on_progress
        )
        self._feed(hello_frame(self._encoder, healthcheck=False))
        hello = self._replies()
        if [r.type for r in hello] != [FrameType.AGENT_HELLO]:
            raise RuntimeError(f"the handshake failed: {hello!r}")

    def close(self) -> None:
        """Stop the thread pool and timers; end the private loop, if any."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.close()
        loop, self._own_loop = self._own_loop, None
        if loop is not None and not loop.is_closed():
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # ------------------------------------------------------------ counters

    @property
    def timeouts(self) -> dict[str, int]:
        """Messages ACKed with on_timeout so far, by name."""
        return dict(self.counters.handler_timeouts)

    @property
    def errors(self) -> dict[str, int]:
        """Messages ACKed with on_error so far (the handler raised), by name."""
        return dict(self.counters.handler_errors)

    # ------------------------------------------------------------ sending

    def send(self, name: str, /, *args: object, **kwargs: object) -> Result:
        """Send one message in one NOTIFY and return its ACK (sync)."""
        return self._run(self.asend(name, *args, **kwargs))

    def send_many(self, messages: Iterable[Msg], *, one_notify: bool = False) -> list[Result]:
        """Send messages in one read, one NOTIFY each (a batch handler gets
        those of its name together), or all in one NOTIFY (an spoe-group);
        one Result per NOTIFY, in order."""
        return self._run(self.asend_many(messages, one_notify=one_notify))

    async def asend(self, name: str, /, *args: object, **kwargs: object) -> Result:
        """send(), on the running loop."""
        c = self.counters
        timeouts, errors = sum(c.handler_timeouts.values()), sum(c.handler_errors.values())
        (result,) = await self.asend_many([Msg(name, *args, **kwargs)])
        timed_out = sum(c.handler_timeouts.values()) > timeouts
        failed = sum(c.handler_errors.values()) > errors
        return Result(result.actions, result.stream_id, result.frame_id, timed_out, failed)

    async def asend_many(
        self, messages: Iterable[Msg], *, one_notify: bool = False
    ) -> list[Result]:
        """send_many(), on the running loop."""
        await self.start()
        msgs = list(messages)
        if self._strict:
            self._check_names(msgs)
        assert self._conn is not None
        assert self._dispatcher is not None
        size = self._conn.proto.max_frame_size
        groups = [msgs] if one_notify else [[m] for m in msgs]
        sids = [next(self._sids) for _ in groups]
        data = b"".join(
            self._encoder.notify_frame(
                sid, 1, messages=[(m.name, m.args) for m in group], max_frame_size=size
            )
            for sid, group in zip(sids, groups, strict=True)
        )
        notifies = self._feed(data)
        self._dispatcher.dispatch(self._conn, notifies)
        acks = await self._wait_acks(set(sids), msgs)
        return [Result(reply_actions(acks[sid]), sid, 1) for sid in sids]

    # ------------------------------------------------------------ inside

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("an event loop is running here: use await client.asend(...)")
        if self._own_loop is None:
            if self._closed:
                coro.close()
                raise RuntimeError("this AgentClient is closed")
            if self._loop is not None:
                coro.close()
                raise RuntimeError("this AgentClient was started on another event loop")
            self._own_loop = asyncio.new_event_loop()
        return self._own_loop.run_until_complete(coro)

    def _check_names(self, msgs: Sequence[Msg]) -> None:
        handlers = self.agent.handlers
        for m in msgs:
            if m.name not in handlers:
                known = ", ".join(sorted(handlers)) or "none"
                raise KeyError(
                    f"agent {self.agent.name!r} has no handler for {m.name!r} "
                    f"(it handles: {known}); AgentClient(strict=False) sends it anyway"
                )

    def _feed(self, data: bytes) -> Notifies:
        assert self._conn is not None
        proto = self._conn.proto
        notifies = proto.feed(data)
        for ev in proto.take_events():
            if isinstance(ev, ProtocolError):
                raise RuntimeError(f"the agent refused the frame: {ev.detail} (status {ev.status})")
        return notifies

    def _on_progress(self, _conn: object) -> None:
        assert self._progress is not None
        self._progress.set()

    def _replies(self) -> list[Reply]:
        """Decode the frames the agent queued since the last call."""
        assert self._conn is not None
        assert self._decoder is not None
        data = self._out + self._conn.proto.data_to_send()
        replies: list[Reply] = []
        while data:
            frames, items, consumed, error = self._decoder.decode(
                data, self._decoder.max_frame_size
            )
            if error:
                raise RuntimeError(f"the agent sent a malformed frame ({status_reason(error)})")
            if not frames:
                break
            replies += [parse_reply(data, f, items) for f in frames]
            data = data[consumed:]
        self._out = data
        return replies

    async def _wait_acks(self, sids: set[int], msgs: Sequence[Msg]) -> dict[int, Reply]:
        assert self._loop is not None
        assert self._progress is not None
        acks: dict[int, Reply] = {}
        deadline = self._loop.time() + self.wait_timeout
        while True:
            for r in self._replies():
                if r.type == FrameType.AGENT_DISCONNECT:
                    raise RuntimeError(f"the agent disconnected: {r.kv}")
                if r.type == FrameType.ACK and r.sid in sids:
                    acks[r.sid] = r
            if len(acks) == len(sids):
                return acks
            left = deadline - self._loop.time()
            if left <= 0:
                names = sorted({m.name for m in msgs})
                raise TimeoutError(
                    f"no ACK within {self.wait_timeout:g} s for {', '.join(names)}: a handler "
                    "is still running (give it a timeout=, or raise wait_timeout)"
                )
            self._progress.clear()
            with contextlib.suppress(TimeoutError):  # the loop above says what was missing
                await asyncio.wait_for(self._progress.wait(), left)

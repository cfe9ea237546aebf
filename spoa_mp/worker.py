"""A worker process: accepts HAProxy connections on the shared listening
sockets and answers NOTIFY frames with the agent's handlers.

One asyncio loop per worker, driven with raw non-blocking sockets
(`add_reader`) rather than transports: a read is decoded in one C call, the
synchronous handlers run inline, and every ACK of that read leaves in one
encode call and one `send`. Coroutine handlers run as tasks, so a slow one
holds up nobody but its own stream. A bound on the messages in flight per
connection stops reading that connection until its handlers catch up.

The worker is the only process that touches connection sockets; it reports
to the supervisor over its health pipe (see health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import signal
import socket
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from spoa_mp import health
from spoa_mp.agent import Agent, normalize_actions
from spoa_mp.codec import Decoder, Encoder
from spoa_mp.logs import RateLimitedLog
from spoa_mp.metrics import LatencyHistogram
from spoa_mp.model import Action, Message
from spoa_mp.protocol import (
    AgentConnection,
    AgentSettings,
    FrameCounts,
    HandshakeDone,
    HealthCheck,
    Notification,
    Notifies,
    PeerDisconnected,
    ProtocolError,
)

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
# what sync handlers return; never awaitable, so the costly check is skipped
_PLAIN_RESULTS = frozenset((tuple, list, type(None), Action))
_name_of = attrgetter("name")
HEARTBEAT_INTERVAL = 1.0
EXIT_BOOT_ERROR = 3  # the supervisor stops instead of respawning in a loop


class Counters:
    """What a worker reports in every heartbeat, cumulative since it started
    (the supervisor sums them over workers alive and gone: see metrics.py)."""

    def __init__(self) -> None:
        self.messages: dict[str, int] = {}  # by message name
        self.handler_errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.frames = FrameCounts()  # the rare frames, counted by the protocol core
        self.notifies = 0  # NOTIFY in and ACK out: counted in bulk here
        self.acks = 0
        self.connections_total = 0
        self.protocol_errors = 0
        self.acks_cut = 0
        self.handed_over = 0
        self.adopted = 0

    @property
    def messages_total(self) -> int:
        return sum(self.messages.values())

    def as_dict(self) -> dict[str, object]:
        f = self.frames
        return {
            "messages": self.messages,
            "handler_errors": self.handler_errors,
            "latency": self.latency.snapshot(),
            "frames_in": {**f.frames_in, "notify": self.notifies},
            "frames_out": {**f.frames_out, "ack": self.acks},
            "disconnects": {"in": f.disconnects_in, "out": f.disconnects_out},
            "connections_total": self.connections_total,
            "protocol_errors": self.protocol_errors,
            "acks_cut": self.acks_cut,
            "handed_over": self.handed_over,
            "adopted": self.adopted,
        }


@dataclass(eq=False, slots=True)
class Connection:
    sock: socket.socket
    fd: int
    peer: str
    proto: AgentConnection
    out: bytearray = field(default_factory=bytearray)  # what the kernel did not take yet
    in_flight: int = 0  # NOTIFYs handed to coroutine handlers, not ACKed yet
    # NOTIFYs for coroutine handlers beyond --max-in-flight, started in order
    # as earlier ones finish (one read can carry many pipelined NOTIFYs)
    waiting: deque[Notification] = field(default_factory=deque)
    reading: bool = True
    closed: bool = False


class Worker:
    def __init__(
        self,
        index: int,
        listeners: Sequence[socket.socket],
        agent: Agent,
        settings: AgentSettings,
        control: socket.socket,
        max_in_flight: int = 256,
        graceful_timeout: float = 30.0,
        debug: bool = False,
        recycle_after: int = 0,
    ) -> None:
        self.index = index
        self.listeners = list(listeners)
        self.agent = agent
        self.settings = settings
        self.control = control  # to the supervisor (health.py)
        self.max_in_flight = max_in_flight
        self.graceful_timeout = graceful_timeout
        self.debug = debug
        self.recycle_after = recycle_after  # messages (0: never); asked once, from _beat
        self.counters = Counters()
        self.connections: dict[int, Connection] = {}
        self._handlers = dict(agent.handlers)
        # the decoder matches handler names in C: a message costs no name lookup
        self._decoder = Decoder(max_frame_size=settings.max_frame_size, names=self._handlers)
        self._encoder = Encoder()
        self._sync_only = not any(reg.is_coroutine for reg in self._handlers.values())
        self._recv_buf = bytearray(RECV_SIZE)
        self._recv_view = memoryview(self._recv_buf)
        self._noisy = RateLimitedLog(log, interval=10.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parent = os.getppid()
        self._stopping = False
        self._handing_over = False  # reload: connections move to the new workers
        self._done: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- life

    def run(self) -> int:
        """Serve until told to stop; returns the process exit code."""
        try:
            return asyncio.run(self._main())
        except BootError as e:
            # the supervisor reports it, once for all workers
            health.send(self.control, health.BOOT_ERROR, error=str(e))
            log.debug("cannot start: %s", e)
            return EXIT_BOOT_ERROR

    async def _main(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        for hook in self.agent.worker_start_hooks:
            try:
                result = hook.fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                raise BootError(f"worker start hook {_name(hook.fn)} failed: {_one_line(e)}") from e
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        loop.add_reader(self.control.fileno(), self._control_readable)
        health.send(self.control, health.READY)
        self._beat()
        await self._done
        # a last beat: what was counted since the previous one (handovers
        # included) reaches the supervisor's totals before we are reaped
        health.send(
            self.control, health.BEAT, counters=self.counters.as_dict(), gauges=self._gauges()
        )
        return 0

    def stop(self) -> None:
        """Graceful stop: accept nothing more, finish what is in flight, close."""
        if self._stopping or self._loop is None:
            return
        self._stopping = True
        log.info("stopping: %d connection(s) to finish", len(self.connections))
        self._wind_down()
        for conn in list(self.connections.values()):
            self._close_if_idle(conn)
        self._check_done()

    def _wind_down(self) -> None:
        """Leaving (stop or handover): accept nothing more; whatever is still
        here after --graceful-timeout is closed."""
        self._stop_accepting()
        assert self._loop is not None
        self._loop.call_later(self.graceful_timeout, self._finish)

    def _stop_accepting(self) -> None:
        assert self._loop is not None
        for sock in self.listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                # our copy keeps the socket listening: once every process has
                # closed its own, the kernel refuses new connections
                sock.close()

    def _finish(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        self._check_done()

    def _check_done(self) -> None:
        if self.connections or not (self._stopping or self._handing_over):
            return
        if self._done and not self._done.done():
            if self._handing_over:
                health.send(self.control, health.HANDED_OVER, moved=self.counters.handed_over)
            self._done.set_result(None)

    def _beat(self) -> None:
        # scheduled from the loop itself: a blocked loop stops beating, and
        # the supervisor replaces the worker after --worker-timeout
        if os.getppid() != self._parent:
            log.error("the supervisor is gone: stopping")
            self.stop()
        handled = self.counters.messages_total
        if self.recycle_after and handled >= self.recycle_after:
            self.recycle_after = 0
            health.send(self.control, health.RECYCLE, messages=handled)
        health.send(
            self.control, health.BEAT, counters=self.counters.as_dict(), gauges=self._gauges()
        )
        assert self._loop is not None
        self._loop.call_later(HEARTBEAT_INTERVAL, self._beat)

    def _gauges(self) -> dict[str, object]:
        sizes: dict[str, int] = {}
        caps: dict[str, int] = {}
        for conn in self.connections.values():
            hs = conn.proto.handshake
            if hs is not None and not hs.healthcheck:
                FrameCounts.add(sizes, str(hs.max_frame_size))
                names = [n for n, on in (("pipelining", hs.pipelining),
                                         ("fragmentation", hs.fragmentation)) if on]  # fmt: skip
                FrameCounts.add(caps, ",".join(names))
        return {
            "connections": len(self.connections),
            "in_flight": sum(c.in_flight + len(c.waiting) for c in self.connections.values()),
            "negotiated": {"max_frame_size": sizes, "capabilities": caps},
        }

    # ---------------------------------------------------------------- sockets

    def _accept(self, listener: socket.socket) -> None:
        # Every worker is woken for a new connection; the losers get EAGAIN.
        # One accept per wake-up: HAProxy opens connections in bursts, and a
        # worker draining the backlog would take them all while the others
        # sleep; the socket stays readable, so the next one is contested again.
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._noisy.warning("accept", "accept failed: %s", e)
                return
            raise
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # ACKs are small and latency-bound: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(
            sock=sock,
            fd=sock.fileno(),
            peer=_peer(addr),
            proto=AgentConnection(
                self.settings, self._decoder, self._encoder, self.counters.frames
            ),
        )
        self.connections[conn.fd] = conn
        self.counters.connections_total += 1
        assert self._loop is not None
        self._loop.add_reader(conn.fd, self._readable, conn)
        if self.debug:
            log.debug("conn %d: accepted from %s", conn.fd, conn.peer)

    def _readable(self, conn: Connection) -> None:
        size = RECV_SIZE
        if self._handing_over:
            # read only what completes the current frame: the connection then
            # moves between two frames, and what follows waits in the kernel
            # for the worker that adopts it
            size = min(size, conn.proto.bytes_to_boundary())
            if not size:
                self._update_reading(conn)
                self._try_handover(conn)
                return
        try:
            # into one reused buffer: recv(n) would allocate n bytes each time
            # (an mmap for large n), then copy out only what arrived
            n = conn.sock.recv_into(self._recv_buf, size)
            data = self._recv_view[:n].tobytes()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # reset by HAProxy: normal (3.x pool purge, health checks)
            if self.debug:
                log.debug("conn %d: %s", conn.fd, e)
            self._close(conn)
            return
        if not n:
            self._close(conn)
            return
        notifies = conn.proto.feed(data)
        self._events(conn)
        if notifies.ids:
            if notifies.counts is None and self._sync_only and not self.debug:
                self._dispatch_plain(conn, notifies)
            else:
                self._dispatch(conn, notifies.notifications())
        self._flush(conn)
        if self._stopping:
            self._close_if_idle(conn)
        elif self._handing_over:
            self._update_reading(conn)
            self._try_handover(conn)

    def _events(self, conn: Connection) -> None:
        for ev in conn.proto.take_events():
            if isinstance(ev, ProtocolError):
                self.counters.protocol_errors += 1
                # HAProxy 2.6 reconnects at once after a refused handshake
                self._noisy.warning(
                    f"proto{ev.status}",
                    "conn %d (%s): protocol error, status %d: %s",
                    conn.fd, conn.peer, ev.status, ev.detail,
                )  # fmt: skip
            elif self.debug:
                if isinstance(ev, HandshakeDone):
                    log.debug("conn %d: handshake %s", conn.fd, ev.handshake)
                elif isinstance(ev, HealthCheck):
                    log.debug("conn %d: health check answered", conn.fd)
                elif isinstance(ev, PeerDisconnected):
                    log.debug("conn %d: HAProxy disconnects: %d %s", conn.fd, ev.status, ev.message)

    def _flush(self, conn: Connection) -> None:
        data = conn.proto.data_to_send()
        if data:
            if conn.out:
                conn.out += data
            else:
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close(conn)
                    return
                if sent < len(data):
                    conn.out += data[sent:]
                    assert self._loop is not None
                    self._loop.add_writer(conn.fd, self._writable, conn)
        if conn.proto.closing and not conn.out:
            self._close(conn)

    def _writable(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            assert self._loop is not None
            self._loop.remove_writer(conn.fd)
            if conn.proto.closing or (self._stopping and self._idle(conn)):
                self._close(conn)
            elif self._handing_over:
                self._try_handover(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        self._release(conn)
        conn.sock.close()
        if self.debug:
            log.debug("conn %d: closed", conn.fd)
        self._check_done()

    def _release(self, conn: Connection) -> None:
        """Forget a connection (the socket itself is closed by the caller)."""
        conn.closed = True
        assert self._loop is not None
        if conn.reading:
            self._loop.remove_reader(conn.fd)
        if conn.out:
            self._loop.remove_writer(conn.fd)
        self.connections.pop(conn.fd, None)

    def _update_reading(self, conn: Connection) -> None:
        """Read a connection unless its handlers are behind, or it is about
        to move at a frame boundary."""
        want = not conn.closed and conn.in_flight < self.max_in_flight and not conn.waiting
        if self._handing_over and conn.proto.at_frame_boundary:
            want = False
        if want != conn.reading:
            conn.reading = want
            assert self._loop is not None
            if want:
                self._loop.add_reader(conn.fd, self._readable, conn)
            else:
                self._loop.remove_reader(conn.fd)

    # ---------------------------------------------------------------- reload

    def _control_readable(self) -> None:
        while True:
            try:
                got = health.receive(self.control)
            except EOFError:  # the supervisor is gone
                assert self._loop is not None
                self._loop.remove_reader(self.control.fileno())
                self.stop()
                return
            if got is None:
                return
            msg, fds = got
            if msg["kind"] == health.ADOPT and len(fds) == 1:
                self._adopt(msg, fds[0])
                continue
            for fd in fds:  # not for us: never leak a descriptor
                os.close(fd)
            if msg["kind"] == health.HANDOVER:
                self._begin_handover()

    def _adopt(self, msg: dict[str, Any], fd: int) -> None:
        """Carry on a connection an old worker passed on (reload)."""
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            state = msg["state"]
            size = int(state["max_frame_size"])
            decoder = self._decoder
            if size > self.settings.max_frame_size:  # negotiated before a smaller limit
                decoder = Decoder(max_frame_size=size, names=self._handlers)
            proto = AgentConnection.adopt(
                state, self.settings, decoder, self._encoder, self.counters.frames
            )
        except (KeyError, TypeError, ValueError, OSError) as e:
            log.error("cannot adopt a connection: %s", e)
            sock.close()
            return
        conn = Connection(sock=sock, fd=sock.fileno(), peer=str(msg.get("peer", "")), proto=proto)
        self.connections[conn.fd] = conn
        self.counters.adopted += 1
        assert self._loop is not None
        # level-triggered: what HAProxy sent meanwhile is read right away
        self._loop.add_reader(conn.fd, self._readable, conn)
        if self.debug:
            log.debug("conn %d: adopted from %s", conn.fd, conn.peer)

    def _begin_handover(self) -> None:
        if self._stopping or self._handing_over or self._loop is None:
            return
        self._handing_over = True
        log.info("handing %d connection(s) over", len(self.connections))
        self._wind_down()
        for conn in list(self.connections.values()):
            self._update_reading(conn)
            self._try_handover(conn)
        self._check_done()

    def _try_handover(self, conn: Connection) -> None:
        """Pass a connection on once nothing of it is left here: no partial
        frame, no handler running or waiting, no unsent ACK."""
        if conn.closed or conn.in_flight or conn.waiting or conn.out:
            return
        if conn.proto.closing or not conn.proto.at_frame_boundary:
            return
        state = conn.proto.handover_state()
        if not health.send(
            self.control, health.HANDOVER, fds=(conn.fd,), state=state, peer=conn.peer
        ):
            assert self._loop is not None  # the channel is full: try again soon
            self._loop.call_later(0.005, self._try_handover, conn)
            return
        # the kernel holds its own reference to the socket now
        self._release(conn)
        conn.sock.close()
        self.counters.handed_over += 1
        self._check_done()

    @staticmethod
    def _idle(conn: Connection) -> bool:
        return (
            conn.in_flight == 0 and not conn.waiting and conn.proto.buffered == 0 and not conn.out
        )

    def _close_if_idle(self, conn: Connection) -> None:
        """While stopping: say goodbye to a connection with nothing pending."""
        if not conn.closed and self._idle(conn):
            conn.proto.disconnect()
            self._flush(conn)

    # ---------------------------------------------------------------- handlers

    def _dispatch(self, conn: Connection, notes: list[Notification], queued: bool = False) -> None:
        handlers = self._handlers
        replies: list[tuple[int, int, Sequence[Action]]] = []
        counters = self.counters
        counted = counters.messages
        observe = counters.latency.observe
        counters.notifies += len(notes)
        clock = time.perf_counter
        t0 = clock()
        for note in notes:
            sid, fid, msgs = note
            if self.debug:
                log.debug("conn %d: NOTIFY sid=%d fid=%d %r", conn.fd, sid, fid, msgs)
            # keep arrival order: nothing new starts while older ones wait
            busy = conn.in_flight >= self.max_in_flight or (conn.waiting and not queued)
            if busy and self._needs_task(msgs):
                conn.waiting.append(note)
                continue
            actions: tuple[Action, ...] = ()
            waiting: list[tuple[Message, Awaitable[object]]] = []
            for msg in msgs:
                reg = handlers.get(msg.name)
                if reg is None:
                    continue  # a message nobody handles: an empty ACK, as HAProxy expects
                counted[msg.name] = counted.get(msg.name, 0) + 1
                try:
                    result = reg.fn(msg)
                    if reg.is_coroutine or (
                        result.__class__ not in _PLAIN_RESULTS and inspect.isawaitable(result)
                    ):
                        waiting.append((msg, result))  # type: ignore[arg-type]
                        continue
                    actions += normalize_actions(result)
                except Exception:
                    self._handler_failed(msg)
                # one clock read per message: each handler's time ends where
                # the next one's begins
                t1 = clock()
                observe(t1 - t0)
                t0 = t1
            if waiting:
                self._start_async(conn, sid, fid, actions, waiting)
            else:
                replies.append((sid, fid, actions))
        if replies:
            counters.acks += len(replies)
            if self.debug:
                for sid, fid, actions in replies:
                    log.debug("conn %d: ACK sid=%d fid=%d %r", conn.fd, sid, fid, list(actions))
            cut = conn.proto.ack(replies)
            if cut:
                self._acks_cut(conn, len(cut))

    def _dispatch_plain(self, conn: Connection, notifies: Notifies) -> None:
        """The usual read: one message per NOTIFY, no coroutine handlers.

        Handler results go to the encoder as they are (an Action, the usual
        result, needs no normalising), messages are counted by name in bulk,
        and latencies are timestamps turned into a histogram after the loop.
        """
        handlers = self._handlers
        msgs = notifies.messages
        results: list[Action | tuple[Action, ...] | None] = []
        add = results.append
        clock = time.perf_counter
        stamps = [clock()]
        stamp = stamps.append
        late: list[tuple[int, Message, Awaitable[object]]] = []
        for msg in msgs:
            reg = handlers.get(msg.name)
            if reg is None:  # nobody handles it: an empty ACK, and no latency
                add(None)
                continue
            try:
                result = reg.fn(msg)
                if result.__class__ is not Action:
                    if result.__class__ not in _PLAIN_RESULTS and inspect.isawaitable(result):
                        # timed by its task; this ACK waits for it
                        late.append((len(results), msg, result))  # type: ignore[arg-type]
                        add(None)
                        continue
                    result = normalize_actions(result)
            except Exception:
                self._handler_failed(msg)
                result = None
            add(result)  # type: ignore[arg-type]
            # the time since the previous stamp is this handler's
            stamp(clock())
        counters = self.counters
        counters.notifies += len(msgs)
        counted = counters.messages
        if len(msgs) == 1:  # unpipelined: one message per read, skip the bulk tools
            name = msgs[0].name
            if name in handlers:
                counted[name] = counted.get(name, 0) + 1
        else:
            for name, n in Counter(map(_name_of, msgs)).items():
                if name in handlers:
                    counted[name] = counted.get(name, 0) + n
        counters.latency.observe_stamps(stamps)
        ids: array[int] = notifies.ids
        if late:  # a plain function returned an awaitable: those ACKs wait for it
            results, ids = self._start_late(conn, ids, results, late)
        if results:
            counters.acks += len(results)
            cut = conn.proto.ack_for(ids, results)
            if cut:
                self._acks_cut(conn, len(cut))

    def _start_late(
        self,
        conn: Connection,
        ids: array[int],
        results: list[Any],
        late: list[tuple[int, Message, Awaitable[object]]],
    ) -> tuple[list[Any], array[int]]:
        """Start the awaitables of a plain read as tasks; returns the results
        and ids of the NOTIFYs that can be ACKed now."""
        waiting = {k for k, _, _ in late}
        for k, msg, awaitable in late:
            self._start_async(conn, ids[2 * k], ids[2 * k + 1], (), [(msg, awaitable)])
        keep = [k for k in range(len(results)) if k not in waiting]
        now = array("Q")
        for k in keep:
            now.append(ids[2 * k])
            now.append(ids[2 * k + 1])
        return [results[k] for k in keep], now

    def _needs_task(self, msgs: list[Message]) -> bool:
        for msg in msgs:
            reg = self._handlers.get(msg.name)
            if reg is not None and reg.is_coroutine:
                return True
        return False

    def _handler_failed(self, msg: Message) -> None:
        errors = self.counters.handler_errors
        errors[msg.name] = errors.get(msg.name, 0) + 1
        # the stream still gets its (empty) ACK; log the traceback, but not
        # thousands of times a second
        self._noisy.exception(f"handler:{msg.name}", "handler for %r failed", msg.name)

    def _acks_cut(self, conn: Connection, n: int) -> None:
        self.counters.acks_cut += n
        self._noisy.warning(
            "cut",
            "conn %d: %d ACK(s) cut to max-frame-size %d",
            conn.fd,
            n,
            conn.proto.max_frame_size,
        )

    def _start_async(
        self,
        conn: Connection,
        sid: int,
        fid: int,
        actions: tuple[Action, ...],
        waiting: list[tuple[Message, Awaitable[object]]],
    ) -> None:
        conn.in_flight += 1
        self._update_reading(conn)  # stop taking work if handlers fall behind
        assert self._loop is not None
        self._loop.create_task(self._finish_async(conn, sid, fid, actions, waiting))

    async def _finish_async(
        self,
        conn: Connection,
        sid: int,
        fid: int,
        actions: tuple[Action, ...],
        waiting: list[tuple[Message, Awaitable[object]]],
    ) -> None:
        started = time.perf_counter()
        for msg, awaitable in waiting:
            try:
                actions += normalize_actions(await awaitable)
            except Exception:
                self._handler_failed(msg)
        self.counters.latency.observe(time.perf_counter() - started)
        conn.in_flight -= 1
        if conn.closed:
            return  # HAProxy went away: nobody to answer
        self.counters.acks += 1
        cut = conn.proto.ack([(sid, fid, actions)])
        if cut:
            self._acks_cut(conn, len(cut))
        while conn.waiting and conn.in_flight < self.max_in_flight:
            self._dispatch(conn, [conn.waiting.popleft()], queued=True)
        self._update_reading(conn)
        self._flush(conn)
        if self._stopping:
            self._close_if_idle(conn)
        elif self._handing_over:
            self._try_handover(conn)


class BootError(Exception):
    """The worker cannot start serving (reported to the supervisor)."""


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def worker_main(
    index: int,
    listeners: Sequence[socket.socket],
    agent: Agent,
    settings: AgentSettings,
    control: socket.socket,
    max_in_flight: int,
    graceful_timeout: float,
    debug: bool,
    recycle_after: int = 0,
) -> int:
    """Entry point in the forked child (signals and title are set by the caller)."""
    started = time.monotonic()
    code = Worker(
        index, listeners, agent, settings, control, max_in_flight, graceful_timeout, debug,
        recycle_after,
    ).run()  # fmt: skip
    log.debug("worker exits with %d after %.1f s", code, time.monotonic() - started)
    with contextlib.suppress(OSError):
        control.close()
    return code

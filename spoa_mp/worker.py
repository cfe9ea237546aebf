"""A worker process: accepts HAProxy connections on the shared listening
sockets and answers NOTIFY frames with the agent's handlers.

One asyncio loop per worker, driven with raw non-blocking sockets
(`add_reader`) rather than transports: a read is decoded in one C call and
handed to the dispatcher (dispatch.py), which runs every kind of handler;
the ACKs ready at the end of the read leave in one encode call and one
`send`, later ones in one per loop iteration. Bounds on the NOTIFYs awaiting
a handler, per connection (--max-in-flight) and per worker (--max-pending),
stop reading until the handlers catch up. Admission (accept, --allow, the
TLS handshake, --hello-timeout) is admission.py; passing connections on at a
reload, adopting them, and goodbyes on stop are handover.py.

Only workers touch connection sockets; they report to the supervisor over
the control channel (control.py). As in gunicorn, `Worker.__init__` changes
nothing process-wide; `init_process()`, in the forked child, does the
after-fork setup (signals, title, log role, the parent's fds), then serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable

from spoa_mp import control, event_loop, logs, tls_io
from spoa_mp.admission import Admission
from spoa_mp.codec import Decoder, Encoder
from spoa_mp.connection import Connection
from spoa_mp.counters import Counters, gauges
from spoa_mp.dispatch import Dispatcher
from spoa_mp.events import HandshakeDone, HealthCheck, PeerDisconnected, ProtocolError
from spoa_mp.handover import Handover
from spoa_mp.logs import RateLimitedLog
from spoa_mp.process import EXIT_BOOT_ERROR, EXIT_OK, SUPERVISOR_SIGNALS, set_title
from spoa_mp.protocol import AgentConnection
from spoa_mp.relay import Relay
from spoa_mp.worker_options import WorkerOptions

log = logging.getLogger(__name__)
Releases = Iterable[Callable[[], None]]  # what the parent held, to close after the fork

RECV_SIZE = 256 * 1024


HEARTBEAT_INTERVAL = 1.0


class Worker(Handover):
    def __init__(self, index: int, options: WorkerOptions, channel: socket.socket) -> None:
        self.index = index
        self.options = options
        self.listeners = list(options.listeners)
        self.agent = agent = options.agent
        self.settings = settings = options.settings
        self.channel = channel  # to the supervisor (control.py)
        self.max_in_flight = options.dispatch.max_in_flight
        self.graceful_timeout = options.graceful_timeout
        self.debug = debug = options.debug
        self.recycle_after = 0  # messages (0: never); drawn in init_process, asked from _beat
        self.counters = Counters()
        self.limits = options.limits
        self.connections: dict[int, Connection] = {}
        self._handlers = dict(agent.handlers)
        # the decoder matches handler names in C: a message costs no name lookup
        self._decoder = Decoder(max_frame_size=settings.max_frame_size, names=tuple(self._handlers))
        self._encoder = Encoder()
        self.dispatcher = Dispatcher(
            self._handlers,
            self.counters,
            options.dispatch,
            on_progress=self._progress,
            on_capacity=self._resume_reading,
            debug=debug,
        )
        self._recv_buf = bytearray(RECV_SIZE)
        self._recv_view = memoryview(self._recv_buf)
        self._noisy = RateLimitedLog(log, interval=10.0)
        self._admission = Admission(self.limits, self.counters, self._noisy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parent = os.getppid()
        self._stopping = False
        self._handing_over = False  # reload: connections move to the new workers
        self._relays: set[Relay] = set()  # after a handover: TLS connections relayed
        self._said_handed_over = False
        self._done: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- life

    def init_process(self, release_parent: Releases = ()) -> int:
        """In the forked child: make this process a worker, then serve.
        `release_parent` closes what the supervisor held (its selector,
        wake-up socket, other workers' channels): nothing of it is ours."""
        signal.set_wakeup_fd(-1)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches us via the supervisor
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(EXIT_OK))
        for release in release_parent:
            release()
        set_title(f"spoa-mp: worker {self.index}")
        logs.set_role(f"worker {self.index}")
        self.recycle_after = self.options.recycle_after()
        self._parent = os.getppid()
        return self.run()

    def run(self) -> int:
        """Serve until told to stop; returns the process exit code."""
        try:
            return event_loop.run(self._main(), self.options.loop)
        except BootError as e:
            # the supervisor reports it, once for all workers
            control.send(self.channel, control.BOOT_ERROR, error=str(e))
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
        self._admission.loop = loop
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        loop.add_reader(self.channel.fileno(), self._control_readable)
        control.send(self.channel, control.READY)
        self._beat()
        await self._done
        self.dispatcher.close()
        # a last beat: what was counted since the previous one (handovers
        # included) reaches the supervisor's totals before we are reaped
        control.send(
            self.channel, control.BEAT, counters=self.counters.as_dict(), gauges=self._gauges()
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
        if self._relays:  # the new workers say goodbye through them; bounded all the same
            self._loop.call_later(self.graceful_timeout, self._end_relays)
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

    def _beat(self) -> None:
        # scheduled from the loop itself: a blocked loop stops beating, and
        # the supervisor replaces the worker after --worker-timeout
        if os.getppid() != self._parent:
            log.error("the supervisor is gone: stopping")
            self.stop()
        handled = self.counters.messages_total
        if self.recycle_after and handled >= self.recycle_after:
            self.recycle_after = 0
            control.send(self.channel, control.RECYCLE, messages=handled)
        control.send(
            self.channel, control.BEAT, counters=self.counters.as_dict(), gauges=self._gauges()
        )
        assert self._loop is not None
        self._loop.call_later(HEARTBEAT_INTERVAL, self._beat)

    def _gauges(self) -> dict[str, object]:
        handshakes = (c.proto.handshake for c in self.connections.values())
        return gauges(len(self.connections), self.dispatcher.pending, handshakes)

    # ---------------------------------------------------------------- sockets

    def _accept(self, listener: socket.socket) -> None:
        got = self._admission.accept(listener, len(self.connections))
        if got is None:
            return
        sock, peer = got
        proto = AgentConnection(self.settings, self._decoder, self._encoder, self.counters.frames)
        conn = Connection(sock=sock, fd=sock.fileno(), peer=peer, proto=proto)
        self.connections[conn.fd] = conn
        assert self._loop is not None
        if isinstance(sock, ssl.SSLSocket):
            conn.tls = conn.handshaking = True
            self._admission.handshake(sock, peer, lambda ok: self._handshake_done(conn, ok))
        else:
            self._loop.add_reader(conn.fd, self._readable, conn)
        self._loop.call_later(self.limits.hello_timeout, self._hello_deadline, conn)
        if self.debug:
            log.debug("conn %d: accepted from %s", conn.fd, conn.peer)

    def _hello_deadline(self, conn: Connection) -> None:
        if not conn.closed and conn.proto.handshake is None:
            self._admission.hello_missed(conn.fd, conn.peer, conn.handshaking)
            self._close(conn)

    def _handshake_done(self, conn: Connection, ok: bool) -> None:
        if not ok:
            self._close(conn)
            return
        conn.handshaking = False
        assert self._loop is not None
        self._loop.add_reader(conn.fd, self._readable, conn)
        self._readable(conn)  # HAPROXY-HELLO may have come with the handshake

    def _readable(self, conn: Connection) -> None:
        size = RECV_SIZE
        if self._handing_over:
            # read only what completes the current frame: the connection then
            # moves between two frames, and what follows waits in the kernel
            # (TLS: in OpenSSL, for the relay) for the worker that adopts it
            size = min(size, conn.proto.bytes_to_boundary())
            if not size:
                self._update_reading(conn)
                self._try_handover(conn)
                return
        try:
            # into one reused buffer: recv(n) would allocate n bytes each time
            # (an mmap for large n), then copy out only what arrived
            n = conn.sock.recv_into(self._recv_buf, size)
            if conn.tls and n:  # a record at a time: read on (never past the boundary)
                n = tls_io.read_more(conn.sock, self._recv_view[:size], n)
            data = self._recv_view[:n].tobytes()
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
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
            self.dispatcher.dispatch(conn, notifies)
            if conn.in_flight:
                self._update_reading(conn)  # stop taking work if handlers fall behind
        self._flush(conn)
        if self._stopping:
            self._close_if_idle(conn)
        elif self._handing_over:
            self._update_reading(conn)
            self._try_handover(conn)
        if conn.tls:
            self._read_decrypted(conn)

    def _read_decrypted(self, conn: Connection) -> None:
        """TLS: what OpenSSL decrypted beyond a full buffer (or while reading
        was paused) never makes the descriptor readable: read it from the loop."""
        if conn.reading and not conn.closed and tls_io.decrypted(conn.sock):
            assert self._loop is not None
            self._loop.call_soon(self._read_if_reading, conn)

    def _read_if_reading(self, conn: Connection) -> None:
        if conn.reading and not conn.closed:
            self._readable(conn)

    def _progress(self, conn: Connection) -> None:
        """Late ACKs were queued on conn (dispatcher): send them, read again."""
        if conn.closed:
            self._check_done()
            return
        self._update_reading(conn)
        self._flush(conn)
        if self._stopping:
            self._close_if_idle(conn)
        elif self._handing_over:
            self._try_handover(conn)

    def _resume_reading(self) -> None:
        """The worker's handlers caught up (--max-pending): read again."""
        for conn in list(self.connections.values()):
            self._update_reading(conn)

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
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                    # TLS: nothing counts as sent; the same bytes (and more) go
                    # again, as OpenSSL wants after a partial record write
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
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
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
        self.dispatcher.forget(conn)
        assert self._loop is not None
        if conn.reading:
            self._loop.remove_reader(conn.fd)
        if conn.out or conn.handshaking:  # a handshake may wait for writability
            self._loop.remove_writer(conn.fd)
        self.connections.pop(conn.fd, None)

    def _update_reading(self, conn: Connection) -> None:
        """Read a connection unless its handlers are behind, or it is about
        to move at a frame boundary."""
        want = (
            not conn.closed and conn.in_flight < self.max_in_flight and not self.dispatcher.paused
        )
        if self._handing_over and conn.proto.at_frame_boundary:
            want = False
        if want != conn.reading:
            conn.reading = want
            assert self._loop is not None
            if want:
                self._loop.add_reader(conn.fd, self._readable, conn)
                if conn.tls:
                    self._read_decrypted(conn)
            else:
                self._loop.remove_reader(conn.fd)


class BootError(Exception):
    """The worker cannot start serving (reported to the supervisor)."""


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def worker_main(
    index: int, options: WorkerOptions, channel: socket.socket, release_parent: Releases = ()
) -> int:
    """Entry point in the forked child: set the process up, serve, exit code."""
    started = time.monotonic()
    code = Worker(index, options, channel).init_process(release_parent)
    log.debug("worker exits with %d after %.1f s", code, time.monotonic() - started)
    with contextlib.suppress(OSError):
        channel.close()
    return code

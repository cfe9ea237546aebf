"""How connections leave a worker and arrive in another on reload (the
worker's half that does it, as replacing.py is the supervisor's).

On HAND_OVER (control.py) the worker stops accepting and passes each clear
connection on between two frames: its descriptor and its SPOP state
(`AgentConnection.handover_state()`) go to the supervisor, which gives them
to a new worker (`_adopt`). A TLS connection's state cannot move with its
descriptor: it is finished instead, AGENT-DISCONNECT once idle and quiet
(tls_io.goodbye_wait), and HAProxy reconnects to the new workers. On stop,
every connection is said goodbye to once idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from spoa_mp import control, tls_io
from spoa_mp.agent import Registered
from spoa_mp.codec import Decoder, Encoder
from spoa_mp.connection import Connection
from spoa_mp.counters import Counters
from spoa_mp.protocol import AgentConnection, AgentSettings

log = logging.getLogger("spoa_mp.worker")


class Handover:
    channel: socket.socket
    settings: AgentSettings
    counters: Counters
    connections: dict[int, Connection]
    debug: bool
    _handlers: dict[str, Registered]
    _decoder: Decoder
    _encoder: Encoder
    _loop: asyncio.AbstractEventLoop | None
    _stopping: bool
    _handing_over: bool
    _leaving_at: float

    def stop(self) -> None:
        raise NotImplementedError

    def _readable(self, conn: Connection) -> None:
        raise NotImplementedError

    def _flush(self, conn: Connection) -> None:
        raise NotImplementedError

    def _close(self, conn: Connection) -> None:
        raise NotImplementedError

    def _release(self, conn: Connection) -> None:
        raise NotImplementedError

    def _update_reading(self, conn: Connection) -> None:
        raise NotImplementedError

    def _wind_down(self) -> None:
        raise NotImplementedError

    def _check_done(self) -> None:
        raise NotImplementedError

    def _leaving(self, conn: Connection) -> bool:
        """Said goodbye to once idle: on stop, and on a reload when TLS (its
        state cannot move with the descriptor: HAProxy reconnects)."""
        return self._stopping or (self._handing_over and conn.tls)

    def _control_readable(self) -> None:
        while True:
            try:
                got = control.receive(self.channel)
            except EOFError:  # the supervisor is gone
                assert self._loop is not None
                self._loop.remove_reader(self.channel.fileno())
                self.stop()
                return
            if got is None:
                return
            msg, fds = got
            if msg["kind"] == control.ADOPT and len(fds) == 1:
                self._adopt(msg, fds[0])
                continue
            for fd in fds:  # not for us: never leak a descriptor
                os.close(fd)
            if msg["kind"] == control.HAND_OVER:
                self._begin_handover()

    def _adopt(self, msg: control.Message, fd: int) -> None:
        """Carry on a connection an old worker passed on (reload)."""
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            passed = control.PassedConnection.from_message(msg)
            size = passed.state["max_frame_size"]
            decoder = self._decoder
            if size > self.settings.max_frame_size:  # negotiated before a smaller limit
                decoder = Decoder(max_frame_size=size, names=tuple(self._handlers))
            proto = AgentConnection.adopt(
                passed.state, self.settings, decoder, self._encoder, self.counters.frames
            )
        except (KeyError, TypeError, ValueError, OSError) as e:
            log.error("cannot adopt a connection: %s", e)
            sock.close()
            return
        conn = Connection(sock=sock, fd=sock.fileno(), peer=passed.peer, proto=proto)
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
        self._leaving_at = self._loop.time()
        log.info("handing %d connection(s) over", len(self.connections))
        self._wind_down()
        for conn in list(self.connections.values()):
            self._update_reading(conn)
            self._try_handover(conn)
        self._check_done()

    def _try_handover(self, conn: Connection) -> None:
        """Pass a connection on once nothing of it is left here: no partial
        frame, no handler running or waiting, no unsent ACK."""
        if conn.tls:
            self._close_if_idle(conn)
            return
        if conn.closed or conn.in_flight or conn.out:
            return
        if conn.proto.closing or not conn.proto.at_frame_boundary:
            return
        passed = control.PassedConnection(conn.peer, conn.proto.handover_state())
        if not control.send(self.channel, control.CONNECTION, fds=(conn.fd,), **passed.fields()):
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
        return conn.in_flight == 0 and conn.proto.buffered == 0 and not conn.out

    def _close_if_idle(self, conn: Connection) -> None:
        """While stopping: say goodbye to a connection with nothing pending."""
        if conn.closed or not self._idle(conn):
            return
        if conn.tls:
            if conn.handshaking or conn.proto.handshake is None:
                self._close(conn)  # no SPOP yet: HAProxy simply connects again
                return
            assert self._loop is not None
            now = self._loop.time()
            wait = tls_io.goodbye_wait(conn.sock, conn.last_read, self._leaving_at, now)
            if wait:
                if conn.recheck is None:
                    conn.recheck = self._loop.call_later(wait, self._recheck, conn)
                return
        conn.proto.disconnect()
        self._flush(conn)

    def _recheck(self, conn: Connection) -> None:
        conn.recheck = None
        self._close_if_idle(conn)

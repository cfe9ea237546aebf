"""How connections leave a worker and arrive in another on reload (the
worker's half that does it, as replacing.py is the supervisor's).

On HAND_OVER (control.py) the worker stops accepting and passes each
connection on between two frames: its descriptor and its SPOP state
(`AgentConnection.handover_state()`) go to the supervisor, which gives them
to a new worker (`_adopt`). A TLS connection's session cannot move with its
descriptor: what moves is one end of a socketpair, and this worker relays
between the TLS socket and the other end (relay.py) until HAProxy or the
new worker closes; it exits when the last one has. HAProxy never notices.
On stop, every connection is said goodbye to once idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from spoa_mp import control
from spoa_mp.agent import Registered
from spoa_mp.codec import Decoder, Encoder
from spoa_mp.connection import Connection
from spoa_mp.counters import Counters
from spoa_mp.process import set_title
from spoa_mp.protocol import AgentConnection, AgentSettings
from spoa_mp.relay import Relay

log = logging.getLogger("spoa_mp.worker")


class Handover:
    index: int
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
    _relays: set[Relay]
    _said_handed_over: bool
    _done: asyncio.Future[None] | None

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
        """Done once nothing is left here: every connection passed on (or
        closed) and every relay closed."""
        if self.connections or not (self._stopping or self._handing_over):
            return
        if self._handing_over and not self._said_handed_over:
            self._said_handed_over = True
            control.send(self.channel, control.HANDED_OVER, moved=self.counters.handed_over)
            if self._relays:
                log.info(
                    "relaying %d TLS connection(s) to the new workers until they close",
                    len(self._relays),
                )
        if self._relays:
            set_title(f"spoa-mp: worker {self.index} relaying {len(self._relays)} connection(s)")
            return
        if self._done and not self._done.done():
            self._done.set_result(None)

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
        log.info("handing %d connection(s) over", len(self.connections))
        self._wind_down()
        for conn in list(self.connections.values()):
            self._update_reading(conn)
            self._try_handover(conn)
        self._check_done()

    def _try_handover(self, conn: Connection) -> None:
        """Pass a connection on once nothing of it is left here: no partial
        frame, no handler running or waiting, no unsent ACK. A TLS one is
        passed on as one end of a socketpair, and relayed."""
        if conn.closed or conn.in_flight or conn.out:
            return
        if conn.handshaking:
            self._close(conn)  # no SPOP yet: HAProxy simply connects again
            return
        if conn.proto.closing or not conn.proto.at_frame_boundary:
            return
        assert self._loop is not None
        passed = control.PassedConnection(conn.peer, conn.proto.handover_state())
        try:
            ours, theirs = socket.socketpair() if conn.tls else (None, conn.sock)
        except OSError as e:  # out of descriptors: try again soon
            log.warning("conn %d: no socketpair to hand it over: %s", conn.fd, e)
            self._loop.call_later(0.05, self._try_handover, conn)
            return
        fds = (theirs.fileno(),)
        if not control.send(self.channel, control.CONNECTION, fds=fds, **passed.fields()):
            if ours is not None:
                ours.close()
                theirs.close()
            self._loop.call_later(0.005, self._try_handover, conn)  # the channel is full
            return
        self._release(conn)
        theirs.close()  # the kernel holds its own reference to it now
        if ours is not None:
            assert isinstance(conn.sock, ssl.SSLSocket)
            relay = Relay(self._loop, conn.sock, ours, self._relay_closed)
            self._relays.add(relay)
            relay.start()
        self.counters.handed_over += 1
        self._check_done()

    def _relay_closed(self, relay: Relay) -> None:
        self._relays.discard(relay)
        if self.debug:
            log.debug("a relayed connection closed; %d left", len(self._relays))
        self._check_done()

    def _end_relays(self) -> None:
        """--graceful-timeout after a stop: whatever is still relayed closes."""
        for relay in list(self._relays):
            relay.close()

    @staticmethod
    def _idle(conn: Connection) -> bool:
        return conn.in_flight == 0 and conn.proto.buffered == 0 and not conn.out

    def _close_if_idle(self, conn: Connection) -> None:
        """While stopping: say goodbye to a connection with nothing pending."""
        if conn.closed or not self._idle(conn):
            return
        if conn.handshaking:
            self._close(conn)  # no SPOP yet: HAProxy simply connects again
            return
        conn.proto.disconnect()
        self._flush(conn)

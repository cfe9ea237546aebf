"""An old worker relaying a TLS connection after a reload.

A TLS session cannot move to another process with its descriptor (its keys
and sequence numbers live in this process's OpenSSL; kernel TLS offload is
not available everywhere). So on reload a TLS connection is handed over as
a clear one is, with one difference: what moves is one end of a socketpair,
and this process keeps the TLS socket and the other end, and copies bytes
both ways between them. The new worker sees a plain SPOP connection (its
state came with it, as for a clear connection), and a later reload passes
that plain end on like any other: there is never more than one relay hop.

The relay runs in the old worker's event loop, which by then accepts
nothing and runs no handler; it ends when either side closes (HAProxy
closes its connection, or the new worker closes its end after an
AGENT-DISCONNECT, which is sent on to HAProxy first).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("spoa_mp.worker")

CHUNK = 64 * 1024
HIGH_WATER = 1 << 20  # unsent bytes one way before that side's reading pauses
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Relay:
    """Bytes both ways between `tls` (HAProxy's connection) and `plain` (our
    end of the socketpair whose other end a new worker adopted)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls: ssl.SSLSocket,
        plain: socket.socket,
        on_closed: Callable[[Relay], None],
    ) -> None:
        self.loop = loop
        self.tls, self.plain = tls, plain
        self.tls_fd, self.plain_fd = tls.fileno(), plain.fileno()
        self.on_closed = on_closed
        self.to_plain = bytearray()  # read from HAProxy, for the new worker
        self.to_tls = bytearray()  # from the new worker, for HAProxy
        self.plain_eof = False
        self.closed = False
        self._watching: set[tuple[int, bool]] = set()  # (fd, for writing)

    def start(self) -> None:
        self.plain.setblocking(False)
        # what OpenSSL decrypted already (past the frame boundary the handover
        # stopped at) never makes the descriptor readable again: read it now
        self._tls_readable()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd, writing in self._watching:
            (self.loop.remove_writer if writing else self.loop.remove_reader)(fd)
        self._watching.clear()
        self.plain.close()
        self.tls.close()
        self.on_closed(self)

    # ------------------------------------------------------------ HAProxy -> worker

    def _tls_readable(self) -> None:
        if self.closed:
            return
        while len(self.to_plain) < HIGH_WATER:
            try:
                data = self.tls.recv(CHUNK)
            except _WOULD_BLOCK:
                break
            except OSError:  # reset, or a TLS error: HAProxy is gone
                data = b""
            if not data:
                self._send_plain()  # the last bytes, if the worker takes them
                self.close()
                return
            self.to_plain += data
        self._send_plain()

    def _send_plain(self) -> None:
        if self.closed:
            return
        if self.to_plain:
            try:
                del self.to_plain[: self.plain.send(self.to_plain)]
            except _WOULD_BLOCK:
                pass
            except OSError:
                self.close()
                return
        if len(self.to_plain) < HIGH_WATER and self.tls.pending():
            # left in OpenSSL when reading paused: the descriptor will not say so
            self.loop.call_soon(self._tls_readable)
        self._update()

    # ------------------------------------------------------------ worker -> HAProxy

    def _plain_readable(self) -> None:
        try:
            data = self.plain.recv(CHUNK)
        except _WOULD_BLOCK:
            return
        except OSError:
            data = b""
        if data:
            self.to_tls += data
        else:
            self.plain_eof = True  # the new worker closed its end (after a goodbye)
        self._send_tls()

    def _send_tls(self) -> None:
        if self.to_tls:
            try:
                # on SSLWantWriteError nothing counts as sent: the same bytes
                # (and maybe more) go again, as OpenSSL wants
                del self.to_tls[: self.tls.send(self.to_tls)]
            except _WOULD_BLOCK:
                pass
            except OSError:
                self.close()
                return
        if self.plain_eof and not self.to_tls:
            self.close()
            return
        self._update()

    # ------------------------------------------------------------ readiness

    def _update(self) -> None:
        if self.closed:
            return
        self._watch(self.tls_fd, False, len(self.to_plain) < HIGH_WATER, self._tls_readable)
        self._watch(self.plain_fd, True, bool(self.to_plain), self._send_plain)
        want_plain = not self.plain_eof and len(self.to_tls) < HIGH_WATER
        self._watch(self.plain_fd, False, want_plain, self._plain_readable)
        self._watch(self.tls_fd, True, bool(self.to_tls), self._send_tls)

    def _watch(self, fd: int, writing: bool, want: bool, callback: Callable[[], None]) -> None:
        key = (fd, writing)
        if want == (key in self._watching):
            return
        if want:
            (self.loop.add_writer if writing else self.loop.add_reader)(fd, callback)
            self._watching.add(key)
        else:
            (self.loop.remove_writer if writing else self.loop.remove_reader)(fd)
            self._watching.discard(key)

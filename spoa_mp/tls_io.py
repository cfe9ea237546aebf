"""The two things a TLS connection's reads need beyond a plain socket's.

`SSLSocket.recv_into` returns one TLS record at most (16 KiB), and a record
OpenSSL has read but not yet returned is invisible to the event loop: the
descriptor is not readable again for it. `read_more` therefore reads on until
OpenSSL and the kernel have nothing more (or the buffer is full), so one
wake-up feeds the decoder everything that arrived, as a plain socket's one
`recv_into` does.

`goodbye_wait` says when a TLS connection finished on reload may get its
AGENT-DISCONNECT: once nothing waits for it (in OpenSSL or in the kernel)
and HAProxy has left it quiet for a moment.
"""

from __future__ import annotations

import array
import fcntl
import socket
import ssl
import termios

__all__ = ["QUIET", "QUIET_FOR", "goodbye_wait", "read_more", "unread"]

# A TLS connection being finished (reload) gets its AGENT-DISCONNECT once
# HAProxy left it QUIET seconds without a byte (frames HAProxy sends before
# reading the DISCONNECT fail, and HAProxy 3.x's idle pool hands out the
# most recently used connection first, so a quiet one is likely left alone);
# after QUIET_FOR, at the first moment nothing is in flight, quiet or not.
QUIET = 0.05
QUIET_FOR = 1.0


def read_more(sock: socket.socket, view: memoryview, n: int) -> int:
    """After a read of `n` bytes into `view`: read on while records come; the
    new total. What cannot be read yet waits for the next readiness."""
    size = len(view)
    while n < size:
        try:
            got = sock.recv_into(view[n:], size - n)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            break
        except OSError:
            break  # the next read, on the next readiness, sees the error
        if not got:
            break  # EOF: seen again by the next read
        n += got
    return n


def unread(sock: socket.socket) -> bool:
    """Bytes wait in OpenSSL's buffer or the kernel's receive queue."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    queued = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued, True)
    except OSError:
        return False
    return queued[0] > 0


def goodbye_wait(sock: socket.socket, last_read: float, leaving_since: float, now: float) -> float:
    """Seconds until AGENT-DISCONNECT may go on an idle TLS connection being
    finished (0: now). It fails whatever HAProxy sent before reading it: say
    it when nothing is on its way and HAProxy has left the connection QUIET
    (its idle pool hands out the busiest first); after QUIET_FOR, between
    two frames all the same."""
    wait = 0.0 if now > leaving_since + QUIET_FOR else last_read + QUIET - now
    if wait <= 0 and unread(sock):
        wait = 0.001  # a frame is arriving: read it first
    return max(wait, 0.0)

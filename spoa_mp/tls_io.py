"""What a TLS connection's reads need beyond a plain socket's.

`SSLSocket.recv_into` returns one TLS record at most (16 KiB), and a record
OpenSSL has read but not yet returned is invisible to the event loop: the
descriptor is not readable again for it. `read_more` therefore reads on until
OpenSSL and the kernel have nothing more (or the buffer is full), so one
wake-up feeds the decoder everything that arrived, as a plain socket's one
`recv_into` does; `decrypted` says when bytes are left in OpenSSL all the
same (the buffer was full), to be read without waiting for readiness.
"""

from __future__ import annotations

import socket
import ssl

__all__ = ["decrypted", "read_more"]


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


def decrypted(sock: socket.socket) -> bool:
    """OpenSSL holds decrypted bytes not read yet (the loop cannot see them)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

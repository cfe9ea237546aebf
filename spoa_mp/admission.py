"""Who gets into a worker: one accept per wake-up, --max-connections and
--allow at accept, the TLS handshake (--tls-cert) and --hello-timeout after
it. A hostile client costs a descriptor (and at most one handshake) for a
bounded time, and the connections already served are untouched.

TLS: each accepted socket is wrapped with the supervisor's SSLContext
(`do_handshake_on_connect=False`) and the handshake is driven by the
worker's loop, one `do_handshake()` per readiness event (`handshake_step`).
The wrapped socket then serves the worker's raw-socket read path as it is:
`recv_into` and `send` decrypt and encrypt in OpenSSL, no transport or
protocol object in between."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any, Literal

from spoa_mp.counters import Counters
from spoa_mp.logs import RateLimitedLog
from spoa_mp.worker_options import ConnectionLimits

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
HandshakeStep = Literal["done", "read", "write", "failed"]


class Admission:
    def __init__(self, limits: ConnectionLimits, counters: Counters, noisy: RateLimitedLog) -> None:
        self.limits = limits
        self.counters = counters
        self._noisy = noisy
        self.loop: asyncio.AbstractEventLoop | None = None  # the worker's, once it runs

    def accept(self, listener: socket.socket, open_now: int) -> tuple[socket.socket, str] | None:
        """One new connection, non-blocking, with its peer's name; None if
        another worker won it, we are out of descriptors, or we are full."""
        # Every worker is woken for a new connection; the losers get EAGAIN.
        # One accept per wake-up: HAProxy opens connections in bursts, and a
        # worker draining the backlog would take them all while the others
        # sleep; the socket stays readable, so the next one is contested again.
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                self._noisy.warning("accept", "accept failed: %s", e)
                return None
            raise
        if open_now >= self.limits.max_connections:
            # the ones already served are untouched; the newcomer is told nothing
            self.counters.connections_refused += 1
            self._noisy.warning(
                "max-connections",
                "refused a connection from %s: %d open, --max-connections %d",
                peer_name(addr), open_now, self.limits.max_connections,
            )  # fmt: skip
            sock.close()
            return None
        if not self.limits.allow.allows(addr):
            self.counters.connections_not_allowed += 1
            self._noisy.warning(
                "allow", "refused a connection from %s: not in --allow", peer_name(addr)
            )
            sock.close()
            return None
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # ACKs are small and latency-bound: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters.connections_total += 1
        if self.limits.tls is not None:
            try:
                sock = self.limits.tls.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (ssl.SSLError, OSError) as e:  # e.g. reset before wrapping
                self.handshake_failed(sock.fileno(), peer_name(addr), e)
                sock.close()
                return None
        return sock, peer_name(addr)

    def handshake(self, sock: ssl.SSLSocket, peer: str, finished: Callable[[bool], None]) -> None:
        """Drive `sock`'s TLS handshake from the loop, one `do_handshake()`
        per readiness; then `finished(True)`, or `finished(False)` once the
        failure is counted and logged (the caller closes). Closing the socket
        before (removing its reader and writer) ends it."""
        loop, fd = self.loop, sock.fileno()
        assert loop is not None

        def step() -> None:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            got = self.handshake_step(sock, fd, peer)
            if got == "read":
                loop.add_reader(fd, step)
            elif got == "write":  # rare: the kernel's send buffer is full
                loop.add_writer(fd, step)
            else:
                finished(got == "done")

        loop.add_reader(fd, step)

    def handshake_step(self, sock: ssl.SSLSocket, fd: int, peer: str) -> HandshakeStep:
        """Advance a TLS handshake: "done", "read" or "write" (wait for the
        socket to be readable or writable, then call again), or "failed"
        (counted and logged; the caller closes)."""
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return "read"
        except ssl.SSLWantWriteError:
            return "write"
        except (ssl.SSLError, OSError) as e:  # no certificate, wrong CA, plain SPOP, reset
            self.handshake_failed(fd, peer, e)
            return "failed"
        return "done"

    def handshake_failed(self, fd: int, peer: str, why: object) -> None:
        self.counters.tls_handshake_failures += 1
        reason = getattr(why, "reason", None) or " ".join(str(why).split())
        self._noisy.warning(
            "tls", "conn %d (%s): TLS handshake failed: %s: closed", fd, peer, reason
        )

    def hello_missed(self, fd: int, peer: str, in_tls_handshake: bool = False) -> None:
        """No complete HAPROXY-HELLO in --hello-timeout: a client that holds
        a descriptor and does nothing (or a port scanner) is closed by the
        caller; counted and logged here (a failed handshake if TLS was not
        even done)."""
        if in_tls_handshake:
            self.handshake_failed(fd, peer, "no handshake in --hello-timeout")
            return
        self.counters.hello_timeouts += 1
        self._noisy.warning(
            "hello-timeout",
            "conn %d (%s): no HELLO within %g s: closed",
            fd, peer, self.limits.hello_timeout,
        )  # fmt: skip


def peer_name(addr: Any) -> str:
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"

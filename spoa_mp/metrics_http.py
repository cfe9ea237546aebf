"""Metrics, serving side: ``GET /metrics`` over HTTP from the supervisor's loop.

:class:`MetricsServer` serves what its ``render`` callable gives (the
supervisor passes :func:`spoa_mp.metrics_prometheus.exposition`) from the
supervisor's own selector loop. ``prometheus_client``'s servers start a
thread, and the supervisor forks: no thread, no blocking call, one request
per connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from spoa_mp.addresses import format_address, parse_address

__all__ = ["MetricsServer", "format_address", "parse_address"]

log = logging.getLogger(__name__)

MAX_REQUEST = 8192  # bytes of request line + headers
TIMEOUT = 5.0  # seconds a connection may live, from accept to close
MAX_CONNECTIONS = 32  # beyond this, new connections are closed at once
DRAIN_LIMIT = 65536  # bytes read and dropped after the response, waiting for the client's FIN
ACCEPT_BATCH = 16  # accepts per handle() call: the supervisor has other work
EMFILE_PAUSE = 1.0  # seconds to stop accepting when out of descriptors

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}  # fmt: skip
_VERSION = re.compile(rb"HTTP/1\.[01]")
_INDEX = (
    b"<html><head><title>spoa-mp</title></head><body><h1>spoa-mp</h1>"
    b'<p><a href="/metrics">Metrics</a></p></body></html>\n'
)

READING, WRITING, DRAINING = "reading", "writing", "draining"


@dataclass(eq=False, slots=True)
class _Client:
    sock: socket.socket
    fd: int
    deadline: float
    state: str = READING
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    sent: int = 0
    drained: int = 0


class MetricsServer:
    """A minimal HTTP/1.0 and 1.1 server for Prometheus, driven by the
    caller's selector: the listening socket and every connection are
    registered with ``data=self``, and the caller's loop calls
    ``handle(key)`` for them and ``expire()`` now and then (every loop
    iteration is fine). ``GET /metrics`` answers ``render(accept)`` (the
    request's Accept header in, body and content type out); every response
    closes its connection. Nothing here blocks or raises into the loop.

    After a fork, the child must call :meth:`close_in_child` (not
    :meth:`close`): the child shares the parent's epoll instance, and
    unregistering there would unregister in the parent too."""

    def __init__(
        self,
        address: str,
        render: Callable[[str], tuple[bytes, str]],
        *,
        timeout: float = TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address = address
        self.render = render
        self.timeout = timeout
        self.max_request = max_request
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listening = False  # registered for accepts
        self._paused_until = 0.0
        self._clients: dict[int, _Client] = {}
        self.requests = 0  # responses started (any status)

    # -- set-up and tear-down

    def listen(self) -> str:
        """Bind and listen (SO_REUSEADDR); return the bound ``HOST:PORT``.
        Raises ValueError for a bad address, OSError if it cannot bind."""
        host, port = parse_address(self.address)
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, _, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        bound = sock.getsockname()
        return format_address(bound[0], bound[1])

    def register(self, selector: selectors.BaseSelector) -> None:
        if self._sock is None:
            raise RuntimeError("MetricsServer.register() before listen()")
        self._selector = selector
        selector.register(self._sock, selectors.EVENT_READ, self)
        self._listening = True

    @property
    def sockname(self) -> tuple[Any, ...] | None:
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def connections(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Close the listener and every connection (idempotent)."""
        for c in list(self._clients.values()):
            self._close(c)
        if self._sock is not None:
            if self._listening:
                self._unregister(self._sock)
            self._sock.close()
            self._sock = None
        self._listening = False

    def close_in_child(self) -> None:
        """In a forked child: close our descriptors, leave the selector alone."""
        for c in self._clients.values():
            c.sock.close()
        self._clients.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._listening = False
        self._selector = None

    def expire(self, now: float | None = None) -> int:
        """Close connections past their deadline (``time.monotonic()``
        clock); resume accepting after a pause for EMFILE. Returns how many
        were closed."""
        try:
            now = time.monotonic() if now is None else now
            stale = [c for c in self._clients.values() if c.deadline <= now]
            for c in stale:
                log.debug("metrics: closing connection %d after %.1f s", c.fd, self.timeout)
                self._close(c)
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
                if self._sock is not None and self._selector is not None and not self._listening:
                    self._selector.register(self._sock, selectors.EVENT_READ, self)
                    self._listening = True
            return len(stale)
        except Exception:  # pragma: no cover - defensive
            log.exception("metrics: expire failed")
            return 0

    # -- events

    def handle(self, key: selectors.SelectorKey) -> None:
        """Whatever the socket of ``key`` is ready for; never raises. (The
        state of the connection says whether to read or write; a spurious
        call does nothing.)"""
        client = None
        try:
            if self._sock is not None and key.fileobj is self._sock:
                self._accept()
                return
            client = self._clients.get(key.fd)
            if client is None or client.sock is not key.fileobj:
                self._unregister(key.fileobj)  # stale: should not happen
                return
            if client.state == WRITING:
                self._write(client)
            else:
                self._read(client)
        except Exception:
            log.exception("metrics: unexpected error")
            if client is not None:
                self._close(client)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the listener stays readable: stop polling it for a while
                    log.warning("metrics: cannot accept: %s; pausing %.0f s", e, EMFILE_PAUSE)
                    self._pause()
                    return
                continue  # ECONNABORTED and friends: that one is gone
            if len(self._clients) >= self.max_connections:
                log.debug("metrics: over %d connections, closing a new one", self.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock, sock.fileno(), time.monotonic() + self.timeout)
            self._clients[c.fd] = c
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, self)

    def _pause(self) -> None:
        self._paused_until = time.monotonic() + EMFILE_PAUSE
        if self._listening and self._sock is not None:
            self._unregister(self._sock)
            self._listening = False

    def _read(self, c: _Client) -> None:
        while True:
            try:
                data = c.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
            if not data:  # the client closed (or finished after our response)
                self._close(c)
                return
            if c.state == DRAINING:
                c.drained += len(data)
                if c.drained > DRAIN_LIMIT:
                    self._close(c)
                    return
                continue
            c.inbuf += data
            if c.inbuf.startswith((b"\r", b"\n")):  # RFC 9112 2.2: ignore CRLFs before a request
                del c.inbuf[: len(c.inbuf) - len(c.inbuf.lstrip(b"\r\n"))]
            end = _header_end(c.inbuf)
            if end > self.max_request or (end < 0 and len(c.inbuf) > self.max_request):
                self._respond(c, 431, b"request too large\n")
                return
            if end >= 0:
                self._answer(c, bytes(c.inbuf[:end]))
                return

    def _answer(self, c: _Client, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            self._respond(c, 400, b"bad request line\n")
            return
        method, target, version = parts
        if not _VERSION.fullmatch(version):
            if version.startswith(b"HTTP/"):
                self._respond(c, 505, b"HTTP/1.0 or HTTP/1.1 only\n")
            else:
                self._respond(c, 400, b"bad request line\n")
            return
        path = target.split(b"?", 1)[0].split(b"#", 1)[0]
        if path.startswith((b"http://", b"https://")):  # absolute form
            slash = path.find(b"/", path.find(b"//") + 2)
            path = path[slash:] if slash >= 0 else b"/"
        if path not in (b"/metrics", b"/"):
            self._respond(c, 404, b"not found: try /metrics\n")
            return
        if method not in (b"GET", b"HEAD"):
            self._respond(c, 405, b"method not allowed\n", extra=(("Allow", "GET, HEAD"),))
            return
        head_only = method == b"HEAD"
        if path == b"/":
            self._respond(c, 200, _INDEX, "text/html; charset=utf-8", head_only=head_only)
            return
        try:
            body, content_type = self.render(_header(head, b"accept"))
        except Exception:
            log.exception("metrics: render failed")
            self._respond(c, 500, b"could not render metrics\n")
            return
        self._respond(c, 200, body, content_type, head_only=head_only)

    def _respond(
        self,
        c: _Client,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        extra: Iterable[tuple[str, str]] = (),
        head_only: bool = False,
    ) -> None:
        self.requests += 1
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra),
        ]
        c.out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        c.sent = 0
        c.inbuf.clear()
        c.state = WRITING
        assert self._selector is not None
        self._selector.modify(c.sock, selectors.EVENT_WRITE, self)
        self._write(c)

    def _write(self, c: _Client) -> None:
        view = memoryview(c.out)
        while c.sent < len(view):
            try:
                c.sent += c.sock.send(view[c.sent :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
        # all sent: half-close, then read until the client closes, so that
        # bytes it sent after its request cannot turn our close into a RST
        # that destroys the response before it reads it
        c.out = b""
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)
            return
        c.state = DRAINING
        assert self._selector is not None
        self._selector.modify(c.sock, selectors.EVENT_READ, self)
        self._read(c)

    def _close(self, c: _Client) -> None:
        if self._clients.pop(c.fd, None) is None:
            return
        self._unregister(c.sock)
        c.sock.close()

    def _unregister(self, fileobj: Any) -> None:
        if self._selector is not None:
            with contextlib.suppress(Exception):  # e.g. the selector was closed first
                self._selector.unregister(fileobj)


def _header_end(buf: bytearray) -> int:
    """Index just past the blank line that ends the headers, or -1."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else -1


def _header(head: bytes, name: bytes) -> str:
    """The value of header `name` (lower case) in a request head, or ''."""
    for line in head.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""

"""HAProxy's side of one SPOP connection over a real socket (`SpopClient`),
built on spoa_mp.codec, and the frame vectors of tests/data/spop-vectors.json.

Every read has a deadline. Only 127.0.0.1 (or a Unix socket) is used.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoa_mp import codec
from spoa_mp.codec import Decoder, Encoder, FrameType
from spoa_mp.exchange import recv_before
from spoa_mp.model import Value
from support.waits import HOST, IO_TIMEOUT, WAIT_TIMEOUT

VECTORS_PATH = Path(__file__).parent.parent / "data" / "spop-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text())


def vector(name: str) -> bytes:
    """The wire bytes of a frame of tests/data/spop-vectors.json."""
    for f in VECTORS["frames"]:
        if f["name"] == name:
            return bytes.fromhex(f["hex"])
    raise KeyError(name)


@dataclass
class Frame:
    """One decoded frame from the agent."""

    type: int
    flags: int
    sid: int
    fid: int
    kv: dict[str, Value] = field(default_factory=dict)
    # ACK actions: (action, scope, name, value); action 1 set-var, 2 unset-var
    actions: list[tuple[int, int, str, Value]] = field(default_factory=list)
    received: float = 0.0  # time.monotonic() when read_frame() decoded it


class ConnectionClosedError(ConnectionError):
    """The agent closed the connection while a frame was expected."""


class SpopClient:
    """HAProxy's side of one SPOP connection, built on spoa_mp.codec.

    ::

        with SpopClient(port) as c:
            c.hello()
            c.notify(1, 1, [("check-client-ip", [("", IPv4Address("10.0.0.1"))])])
            ack = c.read_frame()
    """

    MAX_FRAME = 1 << 16

    def __init__(self, port: int, host: str = HOST, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buf = b""
        self._encoder = Encoder()
        self._decoder = Decoder(max_frame_size=self.MAX_FRAME)
        self.eof = False

    def __enter__(self) -> SpopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- sending

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, name: str = "haproxy-hello 2.6", timeout: float | None = None) -> Frame:
        """Send a HAPROXY-HELLO vector; return the agent's answer (AGENT-HELLO)."""
        self.send(vector(name))
        return self.read_frame(timeout)

    def notify_bytes(
        self, sid: int, fid: int, messages: Sequence[tuple[str, Sequence[tuple[str, Any]]]]
    ) -> bytes:
        return self._encoder.notify_frame(sid, fid, messages=messages)

    def notify(
        self, sid: int, fid: int, messages: Sequence[tuple[str, Sequence[tuple[str, Any]]]]
    ) -> None:
        """Send one NOTIFY: messages are (name, [(arg_name, value), ...])."""
        self.send(self.notify_bytes(sid, fid, messages))

    # -- receiving

    def _decode_one(self) -> Frame | None:
        frames, items, _, error = self._decoder.decode(self._buf, self.MAX_FRAME)
        if not frames:
            if error:
                raise AssertionError(f"agent sent a malformed frame (status {error})")
            return None
        f = frames[0]
        data = self._buf
        frame = Frame(
            f[codec.F_TYPE],
            f[codec.F_FLAGS],
            f[codec.F_SID],
            f[codec.F_FID],
            received=time.monotonic(),
        )
        if f[codec.F_TYPE] in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
            frame.kv = {
                k: codec.item_value(data, it) for k, it in codec.kv_items(data, f, items).items()
            }
        elif f[codec.F_TYPE] == FrameType.ACK:
            for it in items[f[codec.F_FIRST] : f[codec.F_FIRST] + f[codec.F_NITEMS]]:
                assert it[5] == codec.ItemKind.ACTION
                name = codec.item_name(data, it).decode()
                value = codec.item_value(data, it) if it[8] == 1 else None
                frame.actions.append((it[8], it[9], name, value))
        self._buf = data[f[codec.F_OFFSET] + 4 + f[codec.F_LENGTH] :]
        return frame

    def _recv(self, deadline: float) -> bool:
        """Read once; False at EOF. TimeoutError past the deadline."""
        data = recv_before(self.sock, deadline)
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def read_frame(self, timeout: float | None = None) -> Frame:
        """The next frame; ConnectionClosedError at EOF, TimeoutError after `timeout`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self._decode_one()
            if frame is not None:
                return frame
            if self.eof or not self._recv(deadline):
                raise ConnectionClosedError(
                    f"agent closed the connection ({len(self._buf)} B left)"
                )

    def read_frames(self, n: int, timeout: float | None = None) -> list[Frame]:
        """The next `n` frames, all within `timeout` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.read_frame(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def wait_closed(self, timeout: float = WAIT_TIMEOUT) -> list[Frame]:
        """Read until the agent closes the connection; returns the frames read
        on the way. TimeoutError when it stays open."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            frame = self._decode_one()
            if frame is not None:
                frames.append(frame)
                continue
            if self.eof or not self._recv(deadline):
                return frames


def handshaken(c: SpopClient) -> SpopClient:
    """`c` once its HAProxy 2.6 handshake is done (the answer must be AGENT-HELLO)."""
    hello = c.hello("haproxy-hello 2.6")
    assert hello.type == FrameType.AGENT_HELLO, hello
    return c


class TLSSpopClient(SpopClient):
    """SpopClient over TLS with `context` (a client certificate, or none)."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = IO_TIMEOUT) -> None:
        raw = socket.create_connection((HOST, port), timeout=timeout)
        try:
            self.sock = context.wrap_socket(raw, server_hostname=HOST)
        except OSError:
            raw.close()
            raise
        self.timeout = timeout
        self._buf = b""
        self._encoder = Encoder()
        self._decoder = Decoder(max_frame_size=self.MAX_FRAME)
        self.eof = False

    def send_while_reading(self, data: bytes, n: int, timeout: float) -> list[Frame]:
        """Send `data` and read `n` frames at once, from this one thread: an
        SSL object must not be read and written by two threads together, and
        an agent that pauses reading (--max-in-flight) until its ACKs are read
        would deadlock a client that sends everything first."""
        deadline = time.monotonic() + timeout
        view, sent, frames = memoryview(data), 0, []
        self.sock.setblocking(False)
        try:
            while len(frames) < n:
                while len(frames) < n and (frame := self._decode_one()) is not None:
                    frames.append(frame)
                left = deadline - time.monotonic()
                if len(frames) == n or left <= 0:
                    break
                want_write = [self.sock] if sent < len(view) else []
                readable, writable, _ = select.select([self.sock], want_write, [], left)
                if writable:
                    with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        sent += self.sock.send(view[sent : sent + 16384])
                if readable or self.sock.pending():
                    try:
                        chunk = self.sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    if not chunk:
                        raise ConnectionClosedError(f"agent closed after {len(frames)} frames")
                    self._buf += chunk
        finally:
            self.sock.setblocking(True)
        if len(frames) < n:
            raise TimeoutError(f"{len(frames)} of {n} frames, {sent} of {len(view)} B sent")
        return frames

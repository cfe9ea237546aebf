"""One SPOP exchange as HAProxy has it, for ``spoa-mp send`` and the testing kit.

:func:`exchange` connects, sends a HAPROXY-HELLO as HAProxy 3.x does (version
2.0, max-frame-size 16380, pipelining, a random engine-id), or the HELLO of
``option spop-check`` for a health check, then one NOTIFY (stream 1, frame 1)
with one message, and reads each answer (:class:`FrameReader`) into a
:class:`Reply`. What happened, errors included, is an :class:`Exchange`; the
command line and the printing are :mod:`spoa_mp.send`.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_FLAGS,
    F_LENGTH,
    F_NITEMS,
    F_OFFSET,
    F_SID,
    F_TYPE,
    FLAG_FIN,
    CodecError,
    Decoder,
    Encoder,
    FrameRecord,
    FrameType,
    ItemKind,
    Status,
    item_name,
    item_value,
    kv_items,
    status_reason,
)
from spoa_mp.limits import DEFAULT_FRAME_SIZE
from spoa_mp.model import (
    ACTION_SET_VAR,
    I_ACTION,
    I_KIND,
    I_SCOPE,
    I_TYPE,
    ItemRecord,
    String,
    UInt32,
    Value,
)

__all__ = [
    "FRAME_SIZE",
    "Exchange",
    "FrameReader",
    "Reply",
    "connect",
    "exchange",
    "hello_frame",
    "hello_problem",
    "parse_reply",
]

FRAME_SIZE = DEFAULT_FRAME_SIZE  # what HAProxy offers with the default tune.bufsize


@dataclass
class Reply:
    """One frame from the agent, decoded for printing."""

    type: int
    flags: int
    sid: int
    fid: int
    kv: dict[str, Value] = field(default_factory=dict)
    # (action, scope, name, data type, value) of each ACK action
    actions: list[tuple[int, int, str, int, Value]] = field(default_factory=list)


@dataclass
class Exchange:
    """What happened: the agent's HELLO answer, then its answer to the NOTIFY."""

    hello: Reply | None = None
    answer: Reply | None = None
    error: str | None = None  # connection refused, closed, timed out, bad frame
    elapsed: float = 0.0  # seconds from connect to the last frame read

    @property
    def ok(self) -> bool:
        if self.error is not None or self.hello is None:
            return False
        if self.answer is None:  # a health check: the HELLO is the answer
            return hello_problem(self.hello) is None
        return self.answer.type == FrameType.ACK


def hello_problem(r: Reply) -> str | None:
    """Why HAProxy's spop-check would refuse this AGENT-HELLO, or None."""
    if r.type == FrameType.AGENT_DISCONNECT:
        return "agent-disconnect"
    if r.type != FrameType.AGENT_HELLO:
        return "invalid frame received"
    if r.flags != FLAG_FIN:
        return "fragmentation not supported"
    version = r.kv.get("version")
    if not isinstance(version, String):
        return "version value not found"
    if version.text().strip() != "2.0":
        return "unsupported version"
    size = r.kv.get("max-frame-size")
    if not isinstance(size, int) or isinstance(size, bool):
        return "max-frame-size value not found"
    if not 256 <= size <= FRAME_SIZE:
        return "max-frame-size too big or too small"
    if not isinstance(r.kv.get("capabilities"), String):
        return "capabilities value not found"
    return None


class FrameReader:
    """Reads the agent's frames off a blocking socket, one at a time, until
    one deadline (``time.monotonic()``) for the whole exchange."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.decoder = Decoder(max_frames=1, max_frame_size=FRAME_SIZE)

    def read(self) -> Reply:
        while True:
            frames, items, _, error = self.decoder.decode(self.buf, FRAME_SIZE)
            if frames:
                return self._reply(frames[0], items)
            if error:
                raise ConnectionError(f"malformed frame from the agent ({status_reason(error)})")
            data = recv_before(self.sock, self.deadline)
            if not data:
                raise ConnectionError("the agent closed the connection")
            self.buf += data

    def _reply(self, f: FrameRecord, items: list[ItemRecord]) -> Reply:
        r = parse_reply(self.buf, f, items)
        self.buf = self.buf[f[F_OFFSET] + 4 + f[F_LENGTH] :]
        return r


def parse_reply(data: bytes, f: FrameRecord, items: list[ItemRecord]) -> Reply:
    """One decoded agent frame (a Decoder's frame record and items) as a Reply."""
    r = Reply(f[F_TYPE], f[F_FLAGS], f[F_SID], f[F_FID])
    if f[F_TYPE] in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
        r.kv = {k: item_value(data, it) for k, it in kv_items(data, f, items).items()}
    elif f[F_TYPE] == FrameType.ACK:
        for it in items[f[F_FIRST] : f[F_FIRST] + f[F_NITEMS]]:
            if it[I_KIND] != ItemKind.ACTION:
                continue
            name = item_name(data, it).decode("utf-8", "replace")
            setvar = it[I_ACTION] == ACTION_SET_VAR
            value = item_value(data, it) if setvar else None
            r.actions.append((it[I_ACTION], it[I_SCOPE], name, it[I_TYPE] if setvar else -1, value))
    return r


def hello_frame(encoder: Encoder, *, healthcheck: bool) -> bytes:
    """HAPROXY-HELLO as HAProxy 3.x sends it (or its ``option spop-check`` one)."""
    kv: list[tuple[str, Value]] = [
        ("supported-versions", String(b"2.0")),
        ("max-frame-size", UInt32(FRAME_SIZE)),
    ]
    if healthcheck:
        kv += [("capabilities", String(b"")), ("healthcheck", True)]
    else:
        kv += [("capabilities", String(b"pipelining")), ("engine-id", str(uuid.uuid4()))]
    return encoder.kv_frame(FrameType.HAPROXY_HELLO, 0, 0, kv=kv)


def connect(host: str, port: int, unix: str | None, timeout: float) -> socket.socket:
    if unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(unix)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(
    message: str | None,
    args: Sequence[tuple[str, Value]] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 12345,
    unix: str | None = None,
    timeout: float = 5.0,
) -> Exchange:
    """One HELLO (health check when `message` is None) and one NOTIFY; never raises
    for what the agent or the network does (Exchange.error says it)."""
    result = Exchange()
    start = time.monotonic()
    encoder = Encoder()
    try:
        sock = connect(host, port, unix, timeout)
    except OSError as e:
        result.error = f"cannot connect: {e.strerror or e}"
        return result
    try:
        conn = FrameReader(sock, start + timeout)
        sock.sendall(hello_frame(encoder, healthcheck=message is None))
        result.hello = conn.read()
        if message is None or result.hello.type != FrameType.AGENT_HELLO:
            return result
        size = result.hello.kv.get("max-frame-size")
        size = size if isinstance(size, int) and 256 <= size <= FRAME_SIZE else FRAME_SIZE
        notify = encoder.notify_frame(1, 1, messages=[(message, list(args))], max_frame_size=size)
        sock.sendall(notify)
        result.answer = conn.read()
        # The polite end, as HAProxy closes an idle connection.
        bye = encoder.kv_frame(
            FrameType.HAPROXY_DISCONNECT, 0, 0,
            kv=[("status-code", UInt32(Status.NORMAL)), ("message", String(b"normal"))],
        )  # fmt: skip
        sock.sendall(bye)
    except CodecError as e:
        result.error = f"cannot encode the NOTIFY: {e}"
    except (OSError, ConnectionError) as e:
        result.error = str(e) if not isinstance(e, TimeoutError) else "timed out"
    finally:
        result.elapsed = time.monotonic() - start
        sock.close()
    return result


def recv_before(sock: socket.socket, deadline: float) -> bytes:
    """One recv before `deadline` (time.monotonic()); b"" when the peer closed
    or reset the connection. TimeoutError past the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no answer from the agent in time")
    sock.settimeout(left)
    try:
        return sock.recv(65536)
    except TimeoutError:
        raise TimeoutError("no answer from the agent in time") from None
    except ConnectionResetError:
        return b""

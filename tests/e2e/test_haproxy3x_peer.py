"""spoa-mp against a scripted peer that behaves like HAProxy 3.x on the wire.

The real HAProxy 3.2 runs in the other e2e tests; this peer reproduces,
exactly and on demand, what 3.1+ does (spop.md
§5.3, §6, §8.2): HELLO offering only "pipelining" with one engine-id per
agent; stream-ids allocated per connection 1, 3, 5, ... and restarting on
each connection; frame-id always 1; up to 20 NOTIFYs in flight on one
connection; idle connections dropped with a TCP reset and no DISCONNECT;
health checks that want an AGENT-HELLO with flags exactly FIN and a
`capabilities` item. Frames are built and parsed with spoa_mp.codec.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import psutil
import pytest
from support.server import SpoaProcess
from support.spop_peer import Frame
from support.waits import HOST, IO_TIMEOUT, STOP_TIMEOUT

from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_FLAGS,
    F_NITEMS,
    F_SID,
    F_TYPE,
    FLAG_FIN,
    Decoder,
    Encoder,
    FrameType,
    item_name,
    item_value,
)
from spoa_mp.model import DataType, Scope, String, Value

from .conftest import DEFAULT_SCORE, EXPECTED_SCORES, SpoaFactory

pytestmark = pytest.mark.e2e

HAPROXY_FRAME_SIZE = 16380  # what HAProxy announces with default buffers
SET_VAR = 1
PIPELINE = 20  # 3.x: streams per connection when pipelining is agreed

# source address -> score from the e2e reputation file, IPv6 and unlisted too
SCORES: dict[str, int] = {
    **EXPECTED_SCORES,
    "::1": 80,
    "10.1.2.3": DEFAULT_SCORE,
    "2001:db8::1": DEFAULT_SCORE,
}

ENCODER = Encoder()


# ------------------------------------------------------------------ frames


def parse_frames(data: bytes, decoder: Decoder) -> tuple[list[Frame], int]:
    """The whole agent frames at the start of `data`, and the bytes they took."""
    frames, items, consumed, error = decoder.decode(data, HAPROXY_FRAME_SIZE)
    if error:
        raise AssertionError(f"agent sent a malformed frame (status {error}): {data[:64].hex()}")
    out = []
    for f in frames:
        frame = Frame(f[F_TYPE], f[F_FLAGS], f[F_SID], f[F_FID])
        own = items[f[F_FIRST] : f[F_FIRST] + f[F_NITEMS]]
        if frame.type == FrameType.ACK:
            frame.actions = [
                (it[8], it[9], item_name(data, it).decode(), item_value(data, it)) for it in own
            ]
        elif frame.type in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
            frame.kv = {item_name(data, it).decode(): item_value(data, it) for it in own}
        out.append(frame)
    return out, consumed


def haproxy_hello(
    capabilities: str = "pipelining", engine_id: str | None = None, healthcheck: bool = False
) -> bytes:
    """HAPROXY-HELLO as 3.x writes it (spop.md §4.1); the health-check form
    has empty capabilities and no engine-id."""
    kv: list[tuple[str, Value | tuple[int, int, bytes]]] = [
        ("supported-versions", String(b"2.0")),
        ("max-frame-size", (DataType.UINT32, HAPROXY_FRAME_SIZE, b"")),
        ("capabilities", String(capabilities.encode())),
    ]
    if engine_id is not None:
        kv.append(("engine-id", String(engine_id.encode())))
    if healthcheck:
        kv.append(("healthcheck", True))
    return ENCODER.kv_frame(FrameType.HAPROXY_HELLO, 0, 0, kv=kv)


def notify(sid: int, address: str, arg_name: str = "", fid: int = 1) -> bytes:
    """NOTIFY with one check-client-ip message (`args src` / `args ip=src`)."""
    ip: IPv4Address | IPv6Address = ip_address(address)
    return ENCODER.notify_frame(sid, fid, messages=[("check-client-ip", [(arg_name, ip)])])


def haproxy_disconnect(status: int = 0, message: str = "normal") -> bytes:
    return ENCODER.kv_frame(
        FrameType.HAPROXY_DISCONNECT,
        0,
        0,
        kv=[("status-code", (DataType.UINT32, status, b"")), ("message", String(message.encode()))],
    )


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# ------------------------------------------------------------------ the peer


class Peer:
    """One connection to the agent, driven like HAProxy 3.x drives it."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""
        self.decoder = Decoder(max_frame_size=HAPROXY_FRAME_SIZE)
        self.next_sid = 1  # 3.x: per-connection, odd numbers only

    def send(self, *frames: bytes) -> None:
        """Everything in one write (sendall of one buffer)."""
        self.sock.sendall(b"".join(frames))

    def read(self, count: int) -> list[Frame]:
        """Exactly `count` frames, within the peer's timeout."""
        deadline = time.monotonic() + self.timeout
        frames: list[Frame] = []
        while True:
            got, used = parse_frames(self.buf, self.decoder)
            self.buf = self.buf[used:]
            frames += got
            if len(frames) >= count:
                assert len(frames) == count, f"expected {count} frames, got {frames}"
                assert not self.buf, f"unexpected bytes after the frames: {self.buf[:64].hex()}"
                return frames
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(frames)} of {count} frames after {self.timeout}s")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"agent closed after {len(frames)} of {count} frames")
            self.buf += data

    def wait_closed(self) -> None:
        """Until the agent closes (EOF or reset); any byte meanwhile fails."""
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"agent did not close within {self.timeout}s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not data:
                return
            raise AssertionError(f"unexpected bytes before close: {data[:64].hex()}")

    def handshake(self, engine_id: str | None = None) -> Frame:
        self.send(haproxy_hello("pipelining", engine_id or str(uuid.uuid4())))
        (hello,) = self.read(1)
        assert hello.type == FrameType.AGENT_HELLO, hello
        return hello

    def sids(self, n: int) -> list[int]:
        """The next n stream-ids, as the 3.x mux allocates them."""
        out = []
        for _ in range(n):
            out.append(self.next_sid)
            self.next_sid += 2
        return out

    def reset(self) -> None:
        """Close with a TCP RST and no DISCONNECT (3.x pool purge, soft stop)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Connections opened by the test, closed at teardown."""
    opened: list[Peer] = []
    yield opened
    for p in opened:
        p.close()


@pytest.fixture
def spoa_single(spoa_factory: SpoaFactory, reputation_file: Path) -> SpoaProcess:
    """One worker: every connection is served by the same process."""
    return spoa_factory(workers=1, reputation_file=reputation_file)


def connect(spoa: SpoaProcess, peers: list[Peer]) -> Peer:
    peer = Peer(spoa.port)
    peers.append(peer)
    return peer


def expected_ack(sid: int, address: str) -> tuple[int, int, list[tuple[int, int, str, Value]]]:
    return (sid, 1, [(SET_VAR, Scope.SESS, "ip_score", SCORES[address])])


def exchange(peer: Peer, addresses: Sequence[str]) -> None:
    """NOTIFY each address (one write, next 3.x sids, alternating unnamed and
    `ip=` arguments) and check every ACK, in any order."""
    sids = peer.sids(len(addresses))
    pairs = enumerate(zip(sids, addresses, strict=True))
    peer.send(*(notify(sid, a, "ip" if i % 2 else "") for i, (sid, a) in pairs))
    acks = peer.read(len(addresses))
    for ack in acks:
        assert ack.type == FrameType.ACK, ack
        assert ack.flags == FLAG_FIN, ack
    got = sorted((a.sid, a.fid, a.actions) for a in acks)
    assert got == sorted(expected_ack(sid, a) for sid, a in zip(sids, addresses, strict=True))


def addresses(n: int) -> list[str]:
    cycle = list(SCORES)
    return [cycle[i % len(cycle)] for i in range(n)]


# ------------------------------------------------------------------ tests


def test_hello_3x_style(spoa: SpoaProcess, peers: list[Peer]) -> None:
    hello = connect(spoa, peers).handshake()
    assert (hello.flags, hello.sid, hello.fid) == (FLAG_FIN, 0, 0)
    assert hello.kv["version"] == b"2.0"
    size = hello.kv["max-frame-size"]
    assert isinstance(size, int)
    assert 256 <= size <= HAPROXY_FRAME_SIZE
    caps = hello.kv["capabilities"]
    assert isinstance(caps, bytes)
    announced = {c.strip() for c in caps.decode().split(",")}
    assert "pipelining" in announced
    assert "async" not in announced


def test_pipelined_notifies_then_reset(spoa: SpoaProcess, peers: list[Peer]) -> None:
    """20 NOTIFYs in flight (sids 1..39, fid 1) in one write: 20 matching ACKs;
    then a reset without DISCONNECT; a new connection restarts at sid 1."""
    workers = {p.pid for p in spoa.wait_workers()}
    engine = str(uuid.uuid4())  # one engine-id per agent in 3.x
    peer = connect(spoa, peers)
    peer.handshake(engine)
    assert peer.next_sid == 1
    exchange(peer, addresses(PIPELINE))
    assert peer.next_sid == 2 * PIPELINE + 1  # 1, 3, ..., 39 were used
    peer.reset()

    again = connect(spoa, peers)
    again.handshake(engine)
    exchange(again, addresses(2))  # sids 1 and 3 again, on the new connection
    exchange(again, addresses(PIPELINE)[::-1])
    again.reset()

    spoa.check_alive()
    assert {p.pid for p in spoa.wait_workers()} == workers, "a worker was replaced"


def test_reset_with_notifies_in_flight(spoa_single: SpoaProcess, peers: list[Peer]) -> None:
    """RST while the agent still owes 20 ACKs: the worker survives writing to
    a dead connection and serves the next connection."""
    (worker,) = spoa_single.wait_workers()
    for _ in range(5):
        peer = connect(spoa_single, peers)
        peer.handshake()
        pairs = zip(peer.sids(PIPELINE), addresses(PIPELINE), strict=True)
        peer.send(*(notify(sid, a) for sid, a in pairs))
        peer.reset()
    survivor = connect(spoa_single, peers)
    survivor.handshake()
    exchange(survivor, addresses(4))
    assert [p.pid for p in spoa_single.wait_workers()] == [worker.pid]


def test_healthcheck_hello(spoa: SpoaProcess, peers: list[Peer]) -> None:
    """3.x's check: AGENT-HELLO with flags exactly FIN and a capabilities item,
    then the agent closes without waiting for anything."""
    peer = connect(spoa, peers)
    peer.send(haproxy_hello(capabilities="", healthcheck=True))
    (hello,) = peer.read(1)
    assert hello.type == FrameType.AGENT_HELLO
    assert hello.flags == 0x00000001
    assert (hello.sid, hello.fid) == (0, 0)
    assert hello.kv["version"] == b"2.0"
    assert isinstance(hello.kv.get("capabilities"), bytes)
    size = hello.kv["max-frame-size"]
    assert isinstance(size, int)
    assert 256 <= size <= HAPROXY_FRAME_SIZE
    peer.wait_closed()


NOTIFY_RESERVED_TYPE = raw_frame(
    bytes((FrameType.NOTIFY, 0, 0, 0, FLAG_FIN, 1, 1)) + b"\x0fcheck-client-ip\x01\x00\x0a"
)


@pytest.mark.parametrize(
    ("bad", "status", "after_hello"),
    [
        pytest.param((HAPROXY_FRAME_SIZE + 1).to_bytes(4, "big"), 3, True, id="length-over-max"),
        pytest.param(b"\x7f\xff\xff\xff", 3, False, id="huge-length-before-hello"),
        pytest.param(b"\x00\x00\x00\x03\x03\x00\x00", 4, True, id="length-below-7"),
        pytest.param(NOTIFY_RESERVED_TYPE, 4, True, id="reserved-data-type"),
        pytest.param(notify(1, "127.0.0.10"), 4, False, id="notify-before-hello"),
    ],
)
def test_malformed_frame_closes_only_that_connection(
    spoa_single: SpoaProcess, peers: list[Peer], bad: bytes, status: int, after_hello: bool
) -> None:
    """AGENT-DISCONNECT with the status, then close; a connection opened
    before, on the same (only) worker, keeps working."""
    (worker,) = spoa_single.wait_workers()
    bystander = connect(spoa_single, peers)
    bystander.handshake()
    exchange(bystander, addresses(2))

    victim = connect(spoa_single, peers)
    if after_hello:
        victim.handshake()
    victim.send(bad)
    (disconnect,) = victim.read(1)
    assert disconnect.type == FrameType.AGENT_DISCONNECT, disconnect
    assert (disconnect.flags, disconnect.sid, disconnect.fid) == (FLAG_FIN, 0, 0)
    assert disconnect.kv["status-code"] == status, disconnect
    assert isinstance(disconnect.kv.get("message"), bytes)
    victim.wait_closed()

    exchange(bystander, addresses(PIPELINE))
    assert [p.pid for p in spoa_single.wait_workers()] == [worker.pid]


def test_haproxy_disconnect_is_answered(spoa: SpoaProcess, peers: list[Peer]) -> None:
    """HAPROXY-DISCONNECT (3.2+ waits for the answer): AGENT-DISCONNECT, close."""
    peer = connect(spoa, peers)
    peer.handshake()
    exchange(peer, addresses(1))
    peer.send(haproxy_disconnect(0, "normal"))
    (answer,) = peer.read(1)
    assert answer.type == FrameType.AGENT_DISCONNECT, answer
    assert answer.kv["status-code"] == 0
    peer.wait_closed()


def test_default_score_option(
    spoa_factory: SpoaFactory, reputation_file: Path, peers: list[Peer]
) -> None:
    """--default-score applies to addresses no prefix covers."""
    spoa = spoa_factory(workers=1, reputation_file=reputation_file, default_score=42)
    peer = connect(spoa, peers)
    peer.handshake()
    unlisted, listed = ["10.1.2.3", "2001:db8::1"], ["127.0.0.20", "::1"]
    sids = peer.sids(4)
    peer.send(*(notify(s, a) for s, a in zip(sids, unlisted + listed, strict=True)))
    got = {a.sid: a.actions for a in peer.read(4)}
    want = [42, 42, SCORES["127.0.0.20"], SCORES["::1"]]
    assert got == {
        s: [(SET_VAR, Scope.SESS, "ip_score", w)] for s, w in zip(sids, want, strict=True)
    }


def test_graceful_stop_disconnects_idle_connections(spoa: SpoaProcess, peers: list[Peer]) -> None:
    """SIGTERM: every idle connection gets AGENT-DISCONNECT 0 and is closed
    (spop.md §11: send a DISCONNECT before closing), the supervisor exits 0
    and no worker is left."""
    workers = spoa.wait_workers()
    idle = [connect(spoa, peers) for _ in range(4)]
    for peer in idle:
        peer.handshake()
        exchange(peer, addresses(3))
    assert spoa.stop() == 0
    for peer in idle:
        (goodbye,) = peer.read(1)
        assert goodbye.type == FrameType.AGENT_DISCONNECT, goodbye
        assert goodbye.kv["status-code"] == 0, goodbye
        peer.wait_closed()
    _gone, alive = psutil.wait_procs(workers, timeout=STOP_TIMEOUT)
    assert not alive, f"workers left after the supervisor exited: {alive}"

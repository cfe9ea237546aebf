"""AgentConnection, the sans-IO agent side of SPOP: bytes in, notifications/events/bytes out."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from conftest import VECTORS, decode_meanings, json_meaning, notes_meaning, tagged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa_mp.codec import (
    F_PLEN,
    F_POFF,
    F_TYPE,
    Decoder,
    Encoder,
    Status,
    item_value,
    kv_items,
    status_reason,
)
from spoa_mp.model import DataType, Int32, Int64, String, UInt32, UInt64, set_var, unset_var
from spoa_mp.protocol import (
    AgentConnection,
    AgentSettings,
    Handshake,
    HandshakeDone,
    PeerDisconnected,
    ProtocolError,
    parse_capabilities,
    supports_version,
)
from spoa_mp.protocol import HealthCheck as HealthCheckEvent

MAX = 16380
V = {f["name"]: bytes.fromhex(f["hex"]) for f in VECTORS["frames"]}
HELLO_26 = V["haproxy-hello 2.6"]
HELLO_3X = V["haproxy-hello 3.x"]
HELLO_HC = V["haproxy-hello healthcheck"]
NOTIFY_20 = V["notify check-client-ip ipv4 sid 20"]
NOTIFY_ALL = V["notify two messages, every data type"]
ABORT_20 = V["unset fragment fin+abort"]
NOTIFY_NAMES = [f["name"] for f in VECTORS["frames"] if f["decoded"]["type"] == 3]
ENC = Encoder()


# ------------------------------------------------------------------ helpers


def ready(settings_: AgentSettings | None = None, hello: bytes = HELLO_26) -> AgentConnection:
    """A connection past the handshake, with its AGENT-HELLO and event taken."""
    conn = AgentConnection(settings_)
    assert conn.receive(hello) == []
    assert conn.data_to_send()
    (event,) = conn.take_events()
    assert isinstance(event, HandshakeDone)
    return conn


def sent(conn: AgentConnection) -> list[dict[str, Any]]:
    """The meanings of the frames the connection queued (and hands out)."""
    data = conn.data_to_send()
    frames, consumed, error = decode_meanings(data, MAX)
    assert (consumed, error) == (len(data), 0)
    return frames


def disconnect_status(data: bytes) -> int:
    """status-code of the AGENT-DISCONNECT that `data` must end with (and hold once)."""
    frames, items, consumed, error = Decoder().decode(data, MAX)
    assert (consumed, error) == (len(data), 0)
    types = [f[F_TYPE] for f in frames]
    assert types.count(102) == 1
    assert types[-1] == 102
    kv = kv_items(data, frames[-1], items)
    assert kv["status-code"][6] == DataType.UINT32
    status = item_value(data, kv["status-code"])
    assert isinstance(status, int)
    assert item_value(data, kv["message"]) == String(status_reason(status).encode())
    return status


def assert_failed(conn: AgentConnection, status: int) -> None:
    """One AGENT-DISCONNECT(status) queued, a ProtocolError(status) event, closing."""
    assert conn.closing
    assert disconnect_status(conn.data_to_send()) == status
    events = conn.take_events()
    assert [type(e) for e in events] == [ProtocolError]
    assert events[0].status == status
    # closed for good: nothing more comes in or goes out
    assert conn.receive(NOTIFY_20) == []
    assert conn.receive(HELLO_26) == []
    assert conn.ack([(20, 1, [set_var("sess", "x", 1)])]) == []
    conn.disconnect()
    assert conn.data_to_send() == b""
    assert not conn.take_events()
    assert conn.closing


def vector_notes(name: str) -> list:
    m = json_meaning(next(f["decoded"] for f in VECTORS["frames"] if f["name"] == name))
    return tagged([[m["sid"], m["fid"], m["messages"]]])


def hello(**kv: Any) -> bytes:
    """A HAPROXY-HELLO with these items (None drops a default one)."""
    items: dict[str, Any] = {
        "supported-versions": "2.0",
        "max-frame-size": UInt32(MAX),
        "capabilities": "pipelining",
        "engine-id": "e",
    }
    items.update({k.replace("_", "-"): v for k, v in kv.items()})
    return ENC.kv_frame(1, 0, 0, kv=[(k, v) for k, v in items.items() if v is not None])


def payload_of(frame: bytes) -> bytes:
    frames, _, _, error = Decoder().decode(frame, MAX)
    assert error == 0
    return frame[frames[0][F_POFF] : frames[0][F_POFF] + frames[0][F_PLEN]]


def fragmented(sid: int, fid: int, payload: bytes, cuts: list[int], last_flags: int = 1) -> bytes:
    """NOTIFY (FIN clear), UNSET..., UNSET (FIN): the payload split at `cuts`."""
    bounds = [0, *sorted(cuts), len(payload)]
    parts = [payload[a:b] for a, b in pairwise(bounds)]
    out = ENC.raw_frame(3, sid, fid, payload=parts[0], flags=0)
    for p in parts[1:-1]:
        out += ENC.raw_frame(0, sid, fid, payload=p, flags=0)
    return out + ENC.raw_frame(0, sid, fid, payload=parts[-1], flags=last_flags)


# ------------------------------------------------------------------ handshake


def test_hello_26() -> None:
    conn = AgentConnection()
    assert not conn.closing
    assert conn.receive(HELLO_26) == []
    (reply,) = sent(conn)
    assert tagged(reply) == tagged(
        {
            "type": 101,
            "flags": 1,
            "sid": 0,
            "fid": 0,
            "kv": [
                ["version", 8, String(b"2.0")],
                ["max-frame-size", 3, MAX],
                ["capabilities", 8, String(b"pipelining,fragmentation")],
            ],
        }
    )
    hs = Handshake(
        max_frame_size=MAX,
        pipelining=True,
        fragmentation=True,
        engine_id="b918c3fc-75f1-4fe2-a5ff-34890cf90bb8",
        haproxy_capabilities=("pipelining", "async"),
        healthcheck=False,
    )
    assert conn.take_events() == [HandshakeDone(hs)]
    assert not conn.take_events()
    assert conn.handshake == hs
    assert conn.max_frame_size == MAX
    assert not conn.closing
    assert conn.data_to_send() == b""


def test_hello_3x() -> None:
    conn = AgentConnection()
    assert conn.receive(HELLO_3X) == []
    (reply,) = sent(conn)
    assert reply["kv"][2] == ["capabilities", 8, String(b"pipelining,fragmentation")]
    (event,) = conn.take_events()
    assert event.handshake.engine_id == "ccc43685-866a-4845-b19c-b0dfcecea6a6"
    assert event.handshake.haproxy_capabilities == ("pipelining",)
    assert event.handshake.pipelining


def test_agent_hello_matches_the_vectors_byte_for_byte() -> None:
    conn = AgentConnection(AgentSettings(fragmentation=False))
    conn.receive(HELLO_3X)
    assert conn.data_to_send() == V["agent-hello pipelining"]
    conn = AgentConnection(AgentSettings(pipelining=False, fragmentation=False))
    conn.receive(HELLO_26)
    assert conn.data_to_send() == V["agent-hello no capability"]


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"),
    [(MAX, MAX, MAX), (1000, MAX, 1000), (MAX, 500, 500), (256, 256, 256), (MAX, 2**40, MAX)],
)
def test_max_frame_size_is_the_smaller(ours: int, theirs: int, agreed: int) -> None:
    conn = AgentConnection(AgentSettings(max_frame_size=ours))
    size = UInt64(theirs) if theirs > 2**32 - 1 else UInt32(theirs)
    conn.receive(hello(max_frame_size=size))
    (reply,) = sent(conn)
    assert reply["kv"][1] == ["max-frame-size", 3, agreed]
    assert conn.max_frame_size == agreed
    assert conn.handshake is not None
    assert conn.handshake.max_frame_size == agreed


def test_health_check() -> None:
    conn = AgentConnection()
    # a NOTIFY right behind the health-check HELLO is not processed
    assert conn.receive(HELLO_HC + NOTIFY_20) == []
    (reply,) = sent(conn)
    assert reply["type"] == 101
    assert reply["kv"][1] == ["max-frame-size", 3, MAX]
    assert reply["kv"][2] == ["capabilities", 8, String(b"fragmentation")]
    assert conn.take_events() == [HealthCheckEvent()]
    assert conn.closing
    assert conn.handshake is not None
    assert conn.handshake.healthcheck
    assert conn.receive(NOTIFY_20) == []
    assert conn.ack([(20, 1, [])]) == []
    assert conn.data_to_send() == b""
    assert not conn.take_events()


@pytest.mark.parametrize(
    "versions", ["2.0", "2.1, 3.0", " 2.0 ", "1.0,2.0", "3.0, 2.5", "2.999", "2.00"]
)
def test_accepted_versions(versions: str) -> None:
    conn = AgentConnection()
    conn.receive(hello(supported_versions=versions))
    (reply,) = sent(conn)
    assert reply["type"] == 101
    assert reply["kv"][0] == ["version", 8, String(b"2.0")]
    assert isinstance(conn.take_events()[0], HandshakeDone)


@pytest.mark.parametrize("versions", ["1.0", "3.0", "", "2", "2.", ".0", "x.y", "20.0", "1.0, 3.1"])
def test_unsupported_versions(versions: str) -> None:
    conn = AgentConnection()
    conn.receive(hello(supported_versions=versions))
    assert_failed(conn, Status.BAD_VERSION)


@pytest.mark.parametrize(
    ("items", "status"),
    [
        ({"supported_versions": None}, Status.NO_VERSION),
        ({"max_frame_size": None}, Status.NO_FRAME_SIZE),
        ({"max_frame_size": UInt32(255)}, Status.BAD_FRAME_SIZE),
        ({"max_frame_size": UInt32(0)}, Status.BAD_FRAME_SIZE),
        ({"max_frame_size": Int32(-1)}, Status.BAD_FRAME_SIZE),
        ({"max_frame_size": Int64(-(2**63))}, Status.BAD_FRAME_SIZE),
        ({"supported_versions": b"2.0"}, Status.INVALID),
        ({"supported_versions": 2}, Status.INVALID),
        ({"max_frame_size": "16380"}, Status.INVALID),
        ({"max_frame_size": True}, Status.INVALID),
        ({"max_frame_size": None, "supported_versions": None}, Status.NO_VERSION),
        ({"capabilities": 1}, Status.INVALID),
        ({"capabilities": b"pipelining"}, Status.INVALID),
    ],
)
def test_hello_checks(items: dict[str, Any], status: int) -> None:
    conn = AgentConnection()
    assert conn.receive(hello(**items)) == []
    assert_failed(conn, status)


@pytest.mark.parametrize(
    "size", [Int32(300), UInt32(300), Int64(300), UInt64(300)], ids=lambda v: type(v).__name__
)
def test_max_frame_size_any_integer_type(size: int) -> None:
    conn = AgentConnection()
    conn.receive(hello(max_frame_size=size))
    assert sent(conn)[0]["kv"][1] == ["max-frame-size", 3, 300]


def test_hello_without_capabilities_or_engine_id() -> None:
    conn = AgentConnection()
    conn.receive(hello(capabilities=None, engine_id=None))
    (event,) = conn.take_events()
    assert event.handshake.haproxy_capabilities == ()
    assert event.handshake.engine_id == ""
    assert not event.handshake.pipelining
    assert sent(conn)[0]["kv"][2] == ["capabilities", 8, String(b"fragmentation")]


@pytest.mark.parametrize(("sid", "fid"), [(1, 0), (0, 1), (20, 1)])
def test_hello_with_non_zero_ids(sid: int, fid: int) -> None:
    conn = AgentConnection()
    conn.receive(
        ENC.kv_frame(1, sid, fid, kv=[("supported-versions", "2.0"), ("max-frame-size", 16380)])
    )
    assert_failed(conn, Status.INVALID)


def test_hello_without_fin() -> None:
    conn = AgentConnection()
    data = bytearray(HELLO_26)
    data[8] = 0  # flags 00000000
    conn.receive(bytes(data))
    assert_failed(conn, Status.FRAGMENTATION_NOT_SUPPORTED)


@pytest.mark.parametrize(
    ("settings_", "caps", "announced"),
    [
        (AgentSettings(), "pipelining,async", "pipelining,fragmentation"),
        (AgentSettings(pipelining=False), "pipelining,async", "fragmentation"),
        (AgentSettings(), "async", "fragmentation"),
        (AgentSettings(), "", "fragmentation"),
        (AgentSettings(), "async, pipelining ", "pipelining,fragmentation"),
        (AgentSettings(), "pipeliningX,xpipelining", "fragmentation"),
        (AgentSettings(fragmentation=False), "pipelining", "pipelining"),
        (AgentSettings(pipelining=False, fragmentation=False), "pipelining", ""),
    ],
)
def test_announced_capabilities(settings_: AgentSettings, caps: str, announced: str) -> None:
    conn = AgentConnection(settings_)
    conn.receive(hello(capabilities=caps))
    assert sent(conn)[0]["kv"][2] == ["capabilities", 8, String(announced.encode())]
    (event,) = conn.take_events()
    assert event.handshake.pipelining == ("pipelining" in announced)
    assert event.handshake.fragmentation == settings_.fragmentation


def test_capability_and_version_parsers() -> None:
    assert parse_capabilities(b" pipelining , async,,") == ("pipelining", "async")
    assert parse_capabilities(b"") == ()
    assert supports_version(b"2.0")
    assert supports_version(b"1.0, 2.1")
    assert not supports_version(b"1.0")
    assert not supports_version(b"2")


def test_agent_settings_bounds() -> None:
    AgentSettings(max_frame_size=256)
    AgentSettings(max_frame_size=1 << 24)
    for bad in (255, (1 << 24) + 1):
        with pytest.raises(ValueError, match="max-frame-size"):
            AgentSettings(max_frame_size=bad)


# ------------------------------------------------------------------ frames before/after HELLO


@pytest.mark.parametrize(
    "name", ["notify check-client-ip ipv4 sid 20", "ack empty", "agent-hello pipelining"]
)
def test_frame_before_hello_is_invalid(name: str) -> None:
    conn = AgentConnection()
    assert conn.receive(V[name]) == []
    assert_failed(conn, Status.INVALID)


def test_unset_before_hello_is_invalid() -> None:
    conn = AgentConnection()
    conn.receive(ABORT_20)
    assert_failed(conn, Status.INVALID)


@pytest.mark.parametrize(
    "name",
    [
        "haproxy-disconnect 0 normal",
        "haproxy-disconnect 2 timeout",
        "haproxy-disconnect 8 unsupported version",
    ],
)
@pytest.mark.parametrize("after_hello", [True, False])
def test_haproxy_disconnect(name: str, after_hello: bool) -> None:
    decoded = next(f["decoded"] for f in VECTORS["frames"] if f["name"] == name)
    status, message = decoded["kv"][0][2], decoded["kv"][1][2]
    conn = ready() if after_hello else AgentConnection()
    assert conn.receive(V[name] + NOTIFY_20) == []
    assert conn.take_events() == [PeerDisconnected(status, message)]
    assert conn.closing
    data = conn.data_to_send()
    assert disconnect_status(data) == status
    if status == 0:
        assert data == V["agent-disconnect 0 normal"]
    assert conn.receive(NOTIFY_20) == []
    assert conn.ack([(20, 1, [])]) == []
    assert conn.data_to_send() == b""


def test_haproxy_disconnect_with_other_integer_types() -> None:
    for value in (Int32(3), Int64(3), UInt64(3)):
        conn = ready()
        conn.receive(ENC.kv_frame(2, 0, 0, kv=[("message", "m"), ("status-code", value)]))
        assert conn.take_events() == [PeerDisconnected(3, "m")]
        assert disconnect_status(conn.data_to_send()) == 3


def test_haproxy_disconnect_without_items() -> None:
    conn = ready()
    conn.receive(ENC.kv_frame(2, 0, 0))
    assert conn.take_events() == [PeerDisconnected(0, "")]
    assert disconnect_status(conn.data_to_send()) == 0


def test_haproxy_disconnect_with_a_huge_status_code() -> None:
    conn = ready()
    code = UInt32(2**32 - 1)  # also 2^31 and UInt64(2^64-1)
    conn.receive(ENC.kv_frame(2, 0, 0, kv=[("status-code", code), ("message", "x")]))
    assert conn.closing
    assert conn.take_events() == [PeerDisconnected(code, "x")]
    assert conn.data_to_send()[4] == 102


def test_hello_with_a_huge_version_number() -> None:
    conn = AgentConnection()
    conn.receive(hello(supported_versions="9" * 5000 + ".0"))
    assert_failed(conn, Status.BAD_VERSION)


def test_frame_behind_hello_uses_the_negotiated_limit() -> None:
    big = ENC.notify_frame(1, 1, messages=[("m", [("", String(b"x" * 1000))])])
    conn = AgentConnection()
    assert conn.receive(hello(max_frame_size=UInt32(300)) + big) == []
    assert conn.max_frame_size == 300
    assert conn.closing
    assert disconnect_status(conn.data_to_send()) == Status.TOO_BIG  # after the AGENT-HELLO


def test_our_disconnect() -> None:
    conn = ready()
    conn.disconnect()
    assert conn.closing
    assert conn.data_to_send() == V["agent-disconnect 0 normal"]
    conn.disconnect(Status.TIMEOUT, "again")
    assert conn.data_to_send() == b""
    conn = ready()
    conn.disconnect(Status.RESOURCE, "busy")
    frames, items, _, _ = Decoder().decode(data := conn.data_to_send(), MAX)
    kv = kv_items(data, frames[0], items)
    assert item_value(data, kv["status-code"]) == 13
    assert item_value(data, kv["message"]) == String(b"busy")


@pytest.mark.parametrize("type_", [0, 4, 10, 15, 50, 100, 104, 255])
def test_unknown_frame_type_is_skipped(type_: int) -> None:
    conn = ready()
    unknown = ENC.raw_frame(type_, 5, 6, payload=b"\x01\x02anything", flags=1)
    if type_ == 0:  # UNSET with FIN and nothing to continue: not skippable
        conn.receive(unknown)
        assert_failed(conn, Status.INTERLACED_FRAMES)
        return
    notes = conn.receive(unknown + NOTIFY_20 + unknown)
    assert notes_meaning(notes) == vector_notes("notify check-client-ip ipv4 sid 20")
    assert not conn.closing
    assert not conn.take_events()
    assert conn.data_to_send() == b""
    assert conn.buffered == 0


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (HELLO_3X, Status.INVALID),
        (V["ack empty"], Status.INVALID),
        (V["agent-hello pipelining"], Status.INVALID),
        (V["agent-disconnect 0 normal"], Status.INVALID),
        (bytes.fromhex("00000008030000000101010f"), Status.INVALID),  # truncated message
        (bytes.fromhex("00000003"), Status.INVALID),  # LENGTH < 7
        (bytes.fromhex("0000400d"), Status.TOO_BIG),  # LENGTH 16397 > 16380
    ],
    ids=["hello", "ack", "agent-hello", "agent-disconnect", "bad-notify", "short", "too-big"],
)
def test_errors_after_hello(frame: bytes, status: int) -> None:
    conn = ready()
    assert conn.receive(frame) == []
    assert_failed(conn, status)


def test_error_after_good_frames_returns_them() -> None:
    conn = ready()
    notes = conn.receive(NOTIFY_20 + bytes.fromhex("00000003") + NOTIFY_20)
    assert notes_meaning(notes) == vector_notes("notify check-client-ip ipv4 sid 20")
    assert_failed(conn, Status.INVALID)


def test_stream_id_zero_notify() -> None:
    name = "notify check-client-ip ipv4 sid 0 (2.6 first stream)"
    conn = ready()
    notes = conn.receive(V[name])
    assert notes_meaning(notes) == vector_notes(name)
    assert notes[0][:2] == (0, 1)
    assert not conn.closing


def test_too_big_as_soon_as_the_prefix_arrives() -> None:
    conn = ready(AgentSettings(max_frame_size=1000))
    assert conn.max_frame_size == 1000
    assert conn.receive(b"\x00\x00") == []
    assert not conn.closing
    assert conn.receive(b"\x03\xe9") == []  # 1001
    assert_failed(conn, Status.TOO_BIG)
    # exactly the limit only waits for the body
    conn = ready(AgentSettings(max_frame_size=1000))
    assert conn.receive(b"\x00\x00\x03\xe8\x03") == []
    assert not conn.closing
    assert conn.buffered == 5


def test_too_big_uses_haproxy_smaller_limit() -> None:
    conn = ready(hello=hello(max_frame_size=UInt32(300)))
    assert conn.receive((301).to_bytes(4, "big")) == []
    assert_failed(conn, Status.TOO_BIG)


# ------------------------------------------------------------------ notifications and acks


@pytest.mark.parametrize("name", NOTIFY_NAMES)
def test_notify_vectors(name: str) -> None:
    conn = ready()
    assert notes_meaning(conn.receive(V[name])) == vector_notes(name)
    assert not conn.take_events()
    assert conn.data_to_send() == b""


def test_frame_fed_byte_by_byte(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    whole = ready()
    notes_whole = whole.receive(data)
    outcome_whole = (whole.take_events(), whole.data_to_send(), whole.closing)

    conn = ready()
    notes = []
    for i in range(len(data)):
        notes += conn.receive(data[i : i + 1])
        if i < len(data) - 1 and not conn.closing:
            assert conn.buffered == i + 1
    assert notes_meaning(notes) == notes_meaning(notes_whole)
    assert (conn.take_events(), conn.data_to_send(), conn.closing) == outcome_whole
    if not conn.closing:
        assert conn.buffered == 0


def test_every_notify_vector_byte_by_byte_in_one_stream() -> None:
    stream = b"".join(V[n] for n in NOTIFY_NAMES) * 3
    expected = notes_meaning(ready().receive(stream))
    assert len(expected) == 3 * len(NOTIFY_NAMES)
    conn = ready()
    notes = []
    for i in range(len(stream)):
        notes += conn.receive(stream[i : i + 1])
    assert notes_meaning(notes) == expected
    assert not conn.closing


def test_empty_notify() -> None:
    # HAProxy 3.1.0 .. 3.3-dev6 sent NOTIFY frames without any message (spop.md §5.1)
    empty = ENC.notify_frame(5, 1)
    assert empty == bytes.fromhex("0000000703000000010501")
    conn = ready()
    assert conn.receive(empty) == [(5, 1, [])]
    assert conn.receive(NOTIFY_20 + empty + NOTIFY_20 + empty)[1] == (5, 1, [])
    assert not conn.closing
    assert conn.ack([(5, 1, [])]) == []
    assert conn.data_to_send() == bytes.fromhex("0000000767000000010501")


def test_handshake_and_notify_in_one_buffer() -> None:
    conn = AgentConnection()
    notes = conn.receive(HELLO_3X + NOTIFY_20)
    assert notes_meaning(notes) == vector_notes("notify check-client-ip ipv4 sid 20")
    (reply,) = sent(conn)
    assert reply["type"] == 101


def test_pipelined_notifies_3x_style() -> None:
    conn = AgentConnection()
    sids = [2 * i + 1 for i in range(20)]
    batch = b"".join(
        ENC.notify_frame(sid, 1, messages=[("check-client-ip", [("", String(str(sid).encode()))])])
        for sid in sids
    )
    notes = conn.receive(HELLO_3X + batch)
    assert [(sid, fid) for sid, fid, _ in notes] == [(s, 1) for s in sids]
    assert [msgs[0][0] for _, _, msgs in notes] == [String(str(s).encode()) for s in sids]
    assert all(msgs[0].name == "check-client-ip" for _, _, msgs in notes)
    assert conn.handshake is not None
    assert conn.handshake.pipelining


def test_more_notifies_than_the_decoder_takes_at_once() -> None:
    conn = ready()
    stream = b"".join(ENC.notify_frame(i, 1, messages=[("m", [("", i)])]) for i in range(300))
    notes = conn.receive(stream + NOTIFY_20[:10])
    assert [(sid, msgs[0][0]) for sid, _, msgs in notes] == [(i, i) for i in range(300)]
    assert conn.buffered == 10
    assert notes_meaning(conn.receive(NOTIFY_20[10:])) == vector_notes(
        "notify check-client-ip ipv4 sid 20"
    )


def test_ack_several_replies() -> None:
    conn = ready()
    replies = [
        (20, 1, [set_var("sess", "ip_score", UInt32(42))]),
        (0, 1, []),
        (
            2**64 - 1,
            2**32,
            [unset_var("txn", "foo"), set_var("req", "s", "é"), set_var(0, "b", b"")],
        ),
        (3, 1, [set_var("res", "n", Int64(-1)), set_var("txn", "t", True)]),
    ]
    assert conn.ack(replies) == []
    frames = sent(conn)
    assert [(f["type"], f["flags"], f["sid"], f["fid"]) for f in frames] == [
        (103, 1, sid, fid) for sid, fid, _ in replies
    ]
    assert tagged([f["actions"] for f in frames]) == tagged(
        [
            [["set-var", 1, "ip_score", 3, 42]],
            [],
            [
                ["unset-var", 2, "foo"],
                ["set-var", 3, "s", 8, String("é".encode())],
                ["set-var", 0, "b", 9, b""],
            ],
            [["set-var", 4, "n", 4, -1], ["set-var", 2, "t", 1, True]],
        ]
    )
    data = ENC.acks(replies[:1], MAX)[0]
    assert data == V["ack set-var sess ip_score uint32 42"]


def test_ack_nothing_and_before_handshake() -> None:
    conn = ready()
    assert conn.ack([]) == []
    assert conn.data_to_send() == b""
    fresh = AgentConnection()
    assert fresh.ack([(1, 1, [])]) == []
    assert fresh.data_to_send() == b""


def test_ack_cut_at_the_negotiated_size() -> None:
    conn = ready(AgentSettings(max_frame_size=256))
    many = [set_var("txn", f"v{i}", i) for i in range(60)]
    assert conn.ack([(1, 1, []), (3, 1, many)]) == [1]
    frames = sent(conn)
    assert [f["sid"] for f in frames] == [1, 3]
    assert 0 < len(frames[1]["actions"]) < 60
    assert [a[2] for a in frames[1]["actions"]] == [
        f"v{i}" for i in range(len(frames[1]["actions"]))
    ]
    conn.ack([(3, 1, many)])
    data = conn.data_to_send()
    assert Decoder(max_frame_size=256).decode(data, 256).consumed == len(data)


# ------------------------------------------------------------------ fragmentation


def test_fragmented_notify() -> None:
    conn = ready()
    payload = payload_of(NOTIFY_ALL)
    # cut inside the "all-types" name, the u64 varint, the IPv6 address, and the "hé"
    # string (between the two bytes of "é")
    assert payload[107:110] == "hé".encode()
    data = fragmented(7, 2, payload, [3, 70, 95, 109])
    frames = decode_meanings(data, MAX)[0]
    assert [(f["type"], f["flags"], f["sid"], f["fid"]) for f in frames] == [
        (3, 0, 7, 2),
        (0, 0, 7, 2),
        (0, 0, 7, 2),
        (0, 0, 7, 2),
        (0, 1, 7, 2),
    ]
    assert notes_meaning(conn.receive(data)) == vector_notes("notify two messages, every data type")
    assert not conn.take_events()
    assert conn.data_to_send() == b""
    assert not conn.closing
    # and the connection goes on
    assert notes_meaning(conn.receive(NOTIFY_20)) == vector_notes(
        "notify check-client-ip ipv4 sid 20"
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(NOTIFY_NAMES),
    st.lists(st.integers(0, 200), min_size=1, max_size=6),
    st.integers(1, 40),
)
def test_fragmented_notify_any_split(name: str, cuts: list[int], chunk: int) -> None:
    payload = payload_of(V[name])
    decoded = next(f["decoded"] for f in VECTORS["frames"] if f["name"] == name)
    cuts = [min(c, len(payload)) for c in cuts]
    data = fragmented(decoded["sid"], decoded["fid"], payload, cuts)
    conn = ready()
    notes = []
    for i in range(0, len(data), chunk):  # in arbitrary reads, too
        notes += conn.receive(data[i : i + chunk])
    assert notes_meaning(notes) == vector_notes(name)
    assert not conn.closing
    assert conn.data_to_send() == b""


def test_fragment_abort() -> None:
    conn = ready()
    payload = payload_of(NOTIFY_20)
    start = ENC.raw_frame(3, 20, 1, payload=payload[:5], flags=0)
    more = ENC.raw_frame(0, 20, 1, payload=payload[5:9], flags=0)
    assert conn.receive(start + more + ABORT_20) == []
    assert not conn.take_events()
    assert conn.data_to_send() == b""
    assert not conn.closing
    # the aborted payload is gone: a new fragmented NOTIFY starts clean
    assert notes_meaning(conn.receive(fragmented(20, 1, payload, [4]))) == vector_notes(
        "notify check-client-ip ipv4 sid 20"
    )
    # an ABORT with nothing in progress is ignored too
    assert conn.receive(ABORT_20) == []
    assert not conn.closing
    assert conn.data_to_send() == b""


def test_continuation_after_abort_is_interlaced() -> None:
    conn = ready()
    payload = payload_of(NOTIFY_20)
    conn.receive(ENC.raw_frame(3, 20, 1, payload=payload[:5], flags=0) + ABORT_20)
    conn.receive(ENC.raw_frame(0, 20, 1, payload=payload[5:], flags=1))
    assert_failed(conn, Status.INTERLACED_FRAMES)


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda p: ENC.raw_frame(3, 3, 1, payload=p, flags=0), id="second-notify"),
        pytest.param(lambda p: ENC.raw_frame(0, 3, 1, payload=p, flags=1), id="other-sid"),
        pytest.param(lambda p: ENC.raw_frame(0, 1, 2, payload=p, flags=0), id="other-fid"),
    ],
)
def test_interlaced_fragments(second: Any) -> None:
    conn = ready()
    payload = payload_of(NOTIFY_20)
    conn.receive(ENC.raw_frame(3, 1, 1, payload=payload[:5], flags=0) + second(payload[5:]))
    assert_failed(conn, Status.INTERLACED_FRAMES)


def test_unset_without_a_started_notify() -> None:
    conn = ready()
    conn.receive(ENC.raw_frame(0, 1, 1, payload=b"abc", flags=0))
    assert_failed(conn, Status.INTERLACED_FRAMES)


@pytest.mark.parametrize(("type_", "flags"), [(3, 0), (0, 0), (0, 1)])
def test_fragments_when_fragmentation_is_off(type_: int, flags: int) -> None:
    conn = ready(AgentSettings(fragmentation=False))
    sent_caps = AgentConnection(AgentSettings(fragmentation=False))
    sent_caps.receive(HELLO_26)
    assert sent(sent_caps)[0]["kv"][2] == ["capabilities", 8, String(b"pipelining")]
    conn.receive(ENC.raw_frame(type_, 20, 1, payload=payload_of(NOTIFY_20)[:5], flags=flags))
    assert_failed(conn, Status.FRAGMENTATION_NOT_SUPPORTED)


def test_reassembly_above_the_limit() -> None:
    conn = ready(AgentSettings(max_reassembled_size=1000))
    chunk = b"\x00" * 400
    data = ENC.raw_frame(3, 1, 1, payload=chunk, flags=0) + ENC.raw_frame(
        0, 1, 1, payload=chunk, flags=0
    )
    assert conn.receive(data) == []
    assert not conn.closing
    conn.receive(ENC.raw_frame(0, 1, 1, payload=chunk, flags=0))
    assert_failed(conn, Status.TOO_BIG)


def test_reassembly_bigger_than_one_frame() -> None:
    # the reassembled NOTIFY may exceed max-frame-size; each fragment does not
    conn = ready(AgentSettings(max_frame_size=256))
    big = String(b"A" * 600)
    whole = ENC.notify_frame(2, 1, messages=[("check-big", [("ip", big)])])
    payload = payload_of(whole)
    data = fragmented(2, 1, payload, [200, 400])
    notes = conn.receive(data)
    assert len(notes) == 1
    assert notes[0][:2] == (2, 1)
    assert notes[0][2][0]["ip"] == big


def test_malformed_reassembled_notify() -> None:
    conn = ready()
    conn.receive(fragmented(1, 1, b"\x01m\x05", [1]))
    assert_failed(conn, Status.INVALID)


# ------------------------------------------------------------------ robustness


@st.composite
def noisy_streams(draw: st.DrawFn) -> bytes:
    buf = bytearray(b"".join(draw(st.lists(st.sampled_from(list(V.values())), max_size=5))))
    for _ in range(draw(st.integers(0, 3))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = draw(st.integers(0, 255))
    return bytes(buf)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noisy_streams(), st.integers(1, 64))
def test_connection_survives_any_input(stream: bytes, chunk: int) -> None:
    conn = ready()
    for i in range(0, len(stream), chunk):
        for sid, fid, msgs in conn.receive(stream[i : i + chunk]):
            assert 0 <= sid < 2**64
            assert 0 <= fid < 2**64
            for m in msgs:
                list(m.items())
    out = conn.data_to_send()
    events = conn.take_events()
    if conn.closing:
        assert len(events) == 1
        assert isinstance(events[0], ProtocolError | PeerDisconnected)
        disconnect_status(out)
    else:
        assert not events
        assert out == b""

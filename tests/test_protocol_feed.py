"""AgentConnection.feed() -> Notifies and ack_for(): the column-wise hot path.

Every stream is built from known NOTIFYs, so what feed() returns is checked
against them, and against receive() on a twin connection fed the same reads;
ack_for() is checked against ack() byte for byte.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from itertools import pairwise
from typing import Any

import pytest
from conftest import encode_meaning, notes_meaning, tagged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import values
from test_protocol import MAX, V, disconnect_status

from spoa_mp.codec import F_PLEN, F_POFF, Decoder, Encoder, FrameType, Status
from spoa_mp.model import Action, DataType, String, UInt32, set_var, unset_var
from spoa_mp.protocol import (
    AgentConnection,
    AgentSettings,
    HandshakeDone,
    Notification,
    Notifies,
    ProtocolError,
)

HELLO = V["haproxy-hello 2.6"]
ENC = Encoder()
NAMES = ("check-client-ip", "ip", "a")
# type codes as plain ints, as decoded messages report them (tagged() tells int from DataType)
UINT32, IPV4, STRING, BINARY = (
    int(t) for t in (DataType.UINT32, DataType.IPV4, DataType.STRING, DataType.BINARY)
)

# A message as the tests describe it: [name, [[arg name, type code, value], ...]]
MessageMeaning = list[Any]


# ------------------------------------------------------------------ streams


def ip_message(i: int) -> MessageMeaning:
    return ["check-client-ip", [["", UINT32, i]]]


class Stream:
    """Frames from HAProxy, and the notifications they must give, in order."""

    def __init__(self, hello: bytes = HELLO) -> None:
        self.data = bytearray(hello)
        self.expected: list[list[Any]] = []  # [sid, fid, [message, ...]]

    def notify(self, sid: int, fid: int, msgs: list[MessageMeaning]) -> Stream:
        self.data += self.notify_bytes(sid, fid, msgs)
        self.expected.append([sid, fid, msgs])
        return self

    def fragmented(self, sid: int, fid: int, msgs: list[MessageMeaning], cuts: list[int]) -> Stream:
        """A NOTIFY sent as NOTIFY (no FIN), UNSET..., UNSET (FIN)."""
        whole = self.notify_bytes(sid, fid, msgs)
        payload = payload_of(whole)
        bounds = [0, *sorted(min(c, len(payload)) for c in cuts), len(payload)]
        parts = [payload[a:b] for a, b in pairwise(bounds)]
        self.data += ENC.raw_frame(FrameType.NOTIFY, sid, fid, payload=parts[0], flags=0)
        for i, part in enumerate(parts[1:], start=2):
            flags = 1 if i == len(parts) else 0
            self.data += ENC.raw_frame(FrameType.UNSET, sid, fid, payload=part, flags=flags)
        self.expected.append([sid, fid, msgs])
        return self

    def skipped(self, frame: bytes) -> Stream:
        """A frame that gives no notification (unknown type, ABORT of nothing)."""
        self.data += frame
        return self

    @staticmethod
    def notify_bytes(sid: int, fid: int, msgs: list[MessageMeaning]) -> bytes:
        return encode_meaning(
            {"type": 3, "flags": 1, "sid": sid, "fid": fid, "messages": msgs}, encoder=ENC
        )

    def want(self) -> Any:
        return tagged(self.expected)


def payload_of(frame: bytes) -> bytes:
    d = Decoder().decode(frame, MAX)
    assert d.error == 0
    return frame[d.frames[0][F_POFF] : d.frames[0][F_POFF] + d.frames[0][F_PLEN]]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def check_columns(n: Notifies) -> None:
    """The shape Notifies documents: pairs of uint64 ids, counts None while one message each."""
    assert isinstance(n.ids, array)
    assert n.ids.typecode == "Q"
    assert len(n.ids) == 2 * len(n)
    if n.counts is None:
        assert len(n.messages) == len(n)
    else:
        assert len(n.counts) == len(n)
        assert sum(n.counts) == len(n.messages)
        assert any(c != 1 for c in n.counts)  # counts appear only when needed


def connection(max_frames: int = 64, names: Sequence[str] = NAMES) -> AgentConnection:
    return AgentConnection(AgentSettings(), decoder=Decoder(max_frames=max_frames, names=names))


def ready(hello: bytes = HELLO) -> AgentConnection:
    conn = connection()
    assert len(conn.feed(hello)) == 0
    conn.data_to_send()
    conn.take_events()
    return conn


def as_actions(result: Action | Sequence[Action] | None) -> list[Action]:
    if result is None:
        return []
    return [result] if isinstance(result, Action) else list(result)


def feed_all(conn: AgentConnection, reads: Iterable[bytes]) -> list[Notifies]:
    out = []
    for data in reads:
        notifies = conn.feed(data)
        check_columns(notifies)
        out.append(notifies)
    return out


def receive_all(conn: AgentConnection, reads: Iterable[bytes]) -> list[Notification]:
    return [note for data in reads for note in conn.receive(data)]


def assert_feed_and_receive_agree(
    stream: Stream, reads: list[bytes], max_frames: int = 64, names: Sequence[str] = NAMES
) -> list[Notifies]:
    """feed() and receive() on twin connections give the stream's NOTIFYs, and
    the connections end alike (handshake done, only the AGENT-HELLO to send)."""
    fed, received = connection(max_frames, names), connection(max_frames, names)
    batches = feed_all(fed, reads)
    notes = receive_all(received, reads)
    assert notes_meaning(n for b in batches for n in b.notifications()) == stream.want()
    assert notes_meaning(notes) == stream.want()
    for conn in (fed, received):
        assert not conn.closing
        assert conn.buffered == 0
        assert [type(e) for e in conn.take_events()] == [HandshakeDone]
    hello = fed.data_to_send()
    assert hello == received.data_to_send()
    assert hello[4] == FrameType.AGENT_HELLO
    return batches


# ------------------------------------------------------------------ Notifies


def test_notifies_columns_while_every_notify_has_one_message() -> None:
    n = Notifies()
    assert (len(n), n.counts, list(n.ids), n.messages, n.notifications()) == (0, None, [], [], [])
    a, b, c = (object() for _ in range(3))
    n.add(1, 2, [a])  # type: ignore[list-item]
    n.add(2**64 - 1, 0, [b])  # type: ignore[list-item]
    assert (len(n), n.counts, list(n.ids), n.messages) == (2, None, [1, 2, 2**64 - 1, 0], [a, b])
    assert n.notifications() == [(1, 2, [a]), (2**64 - 1, 0, [b])]
    n.add(5, 6, [])  # a NOTIFY without message: counts appear, earlier ones count 1
    assert n.counts == [1, 1, 0]
    n.add(7, 8, [a, c])  # type: ignore[list-item]
    n.add(9, 9, [b])  # type: ignore[list-item]
    assert n.counts == [1, 1, 0, 2, 1]
    assert len(n) == 5
    assert n.notifications() == [
        (1, 2, [a]),
        (2**64 - 1, 0, [b]),
        (5, 6, []),
        (7, 8, [a, c]),
        (9, 9, [b]),
    ]


def test_notifies_counts_from_a_first_notify_of_several_messages() -> None:
    n = Notifies()
    n.add(1, 1, ["m1", "m2"])  # type: ignore[list-item]
    n.add(2, 1, ["m3"])  # type: ignore[list-item]
    assert n.counts == [2, 1]
    assert n.notifications() == [(1, 1, ["m1", "m2"]), (2, 1, ["m3"])]


# ------------------------------------------------------------ feed() == receive() == the stream


def test_first_read_with_hello_and_plain_notifies() -> None:
    stream = Stream()
    for i in range(5):
        stream.notify(2 * i + 1, i, [ip_message(i)])
    stream.notify(2**64 - 1, 2**64 - 1, [["unlisted", []]])
    (batch,) = assert_feed_and_receive_agree(stream, [bytes(stream.data)])
    assert batch.counts is None
    assert list(batch.ids) == [1, 0, 3, 1, 5, 2, 7, 3, 9, 4, 2**64 - 1, 2**64 - 1]
    assert [m.name for m in batch.messages] == ["check-client-ip"] * 5 + ["unlisted"]


def mixed_stream() -> Stream:
    """Plain NOTIFYs around one of two messages, one of none, a fragmented
    one and skippable frames."""
    return (
        Stream()
        .notify(1, 1, [ip_message(1)])
        .notify(3, 1, [ip_message(3), ["ip", [["x", STRING, String(b"y")]]]])
        .notify(5, 1, [])
        .skipped(ENC.raw_frame(50, 7, 7, payload=b"\x01\x02", flags=1))
        .fragmented(7, 2, [ip_message(7), ["a", [["", BINARY, b"\x00" * 40]]]], [3, 30])
        .skipped(V["unset fragment fin+abort"])  # an ABORT with nothing in progress
        .notify(9, 1, [ip_message(9)])
        .fragmented(11, 1, [ip_message(11)], [5])
        .notify(13, 1, [["zz", [["", IPV4, IPv4Address(1)]]]])
    )


def test_mixed_read_with_several_none_and_fragmented() -> None:
    stream = mixed_stream()
    (batch,) = assert_feed_and_receive_agree(stream, [bytes(stream.data)])
    assert batch.counts == [1, 2, 0, 2, 1, 1, 1]
    assert list(batch.ids[::2]) == [1, 3, 5, 7, 9, 11, 13]


def test_zero_message_notify_between_plain_ones() -> None:
    stream = Stream().notify(1, 1, [ip_message(1)]).notify(2, 1, []).notify(3, 1, [ip_message(3)])
    (batch,) = assert_feed_and_receive_agree(stream, [bytes(stream.data)])
    assert batch.counts == [1, 0, 1]
    assert batch.notifications()[1] == (2, 1, [])


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_mixed_stream_in_small_reads(size: int) -> None:
    stream = mixed_stream()
    assert_feed_and_receive_agree(stream, pieces(bytes(stream.data), size))


@pytest.mark.parametrize(
    "several_at",
    [
        pytest.param(None, id="all-plain"),
        pytest.param(9, id="several-in-the-last-round"),
        pytest.param(2, id="several-in-an-earlier-round"),
    ],
)
def test_more_frames_than_max_frames_in_one_read(several_at: int | None) -> None:
    """12 NOTIFYs after the HELLO, decoded 4 at a time; one of them may carry two messages."""
    stream = Stream()
    for i in range(12):
        msgs = [ip_message(i), ip_message(100 + i)] if i == several_at else [ip_message(i)]
        stream.notify(i, 1, msgs)
    tail = Stream.notify_bytes(999, 1, [ip_message(999)])
    read = bytes(stream.data) + tail[:9]
    fed, received = connection(max_frames=4), connection(max_frames=4)
    (batch,) = feed_all(fed, [read])
    assert notes_meaning(batch.notifications()) == stream.want()
    assert notes_meaning(received.receive(read)) == stream.want()
    if several_at is None:
        assert batch.counts is None
    else:
        assert batch.counts == [2 if i == several_at else 1 for i in range(12)]
    for conn in (fed, received):
        assert conn.buffered == 9
    (rest,) = feed_all(fed, [tail[9:]])
    assert notes_meaning(rest.notifications()) == tagged([[999, 1, [ip_message(999)]]])
    assert notes_meaning(received.receive(tail[9:])) == notes_meaning(rest.notifications())


def test_a_zero_message_notify_early_in_a_long_pipelined_read_loses_nothing() -> None:
    """The default decoder (64 frames a round), 150 NOTIFYs in one read, the
    third one without message (HAProxy 3.1.0 .. 3.3-dev6 sends those)."""
    stream = Stream(b"")
    for i in range(150):
        stream.notify(i, 1, [] if i == 2 else [ip_message(i)])
    conn = ready()
    notes = conn.receive(bytes(stream.data))
    assert len(notes) == 150
    assert notes_meaning(notes) == stream.want()


def test_hello_with_a_smaller_max_frame_size_then_notifies_in_one_read() -> None:
    hello = ENC.kv_frame(
        1,
        0,
        0,
        kv=[
            ("supported-versions", String(b"2.0")),
            ("max-frame-size", UInt32(300)),
            ("capabilities", String(b"pipelining")),
        ],
    )
    stream = Stream(hello)
    for i in range(8):
        stream.notify(i, 1, [ip_message(i)])
    stream.notify(50, 1, [ip_message(1), ip_message(2)])
    fed = connection()
    (batch,) = feed_all(fed, [bytes(stream.data)])
    assert fed.max_frame_size == 300
    assert notes_meaning(batch.notifications()) == stream.want()
    assert notes_meaning(connection().receive(bytes(stream.data))) == stream.want()


# ------------------------------------------------------------------ any stream, any reads

message_meanings = st.tuples(
    st.sampled_from(["check-client-ip", "ip", "a", "", "zz"]),
    st.lists(st.tuples(st.sampled_from(["", "ip", "x"]), values), max_size=3),
).map(lambda m: [m[0], [[a, t, v] for a, (t, v) in m[1]]])


def stream_parts(n_messages: st.SearchStrategy[list[MessageMeaning]]) -> st.SearchStrategy[Any]:
    """Stream parts: plain NOTIFYs (drawn twice as often), NOTIFYs with
    `n_messages`, fragmented NOTIFYs and frames to skip."""
    one = st.lists(message_meanings, min_size=1, max_size=1)
    return st.one_of(
        st.tuples(st.just("notify"), one),
        st.tuples(st.just("notify"), one),
        st.tuples(st.just("notify"), n_messages),
        st.tuples(
            st.just("fragmented"),
            n_messages.filter(bool),
            st.lists(st.integers(0, 60), min_size=1, max_size=3),
        ),
        st.tuples(st.just("skipped"), st.sampled_from([50, 104, 255])),
    )


def build(parts: list[tuple[Any, ...]]) -> Stream:
    stream = Stream()
    for sid, (kind, *rest) in enumerate(parts, start=1):
        if kind == "notify":
            stream.notify(sid, 1, rest[0])
        elif kind == "fragmented":
            stream.fragmented(sid, 2, rest[0], rest[1])
        else:
            stream.skipped(ENC.raw_frame(rest[0], sid, 1, payload=b"\xff\x00", flags=1))
    return stream


name_lists = st.sampled_from([(), NAMES, ("zz", "", "ip")])
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    st.lists(stream_parts(st.lists(message_meanings, max_size=3)), max_size=10),
    st.integers(1, 200),
    name_lists,
)
def test_feed_gives_the_notifies_of_any_stream(
    parts: list[tuple[Any, ...]], size: int, names: tuple[str, ...]
) -> None:
    """Up to 41 frames a read: one decoder round each (64 frames)."""
    stream = build(parts)
    assert_feed_and_receive_agree(stream, pieces(bytes(stream.data), size), 64, names)


@PROPERTY
@given(
    st.lists(stream_parts(st.lists(message_meanings, min_size=1, max_size=1)), max_size=10),
    st.integers(1, 200),
    st.sampled_from([1, 2, 4]),
    name_lists,
)
def test_feed_gives_the_one_message_notifies_of_any_stream_in_several_rounds(
    parts: list[tuple[Any, ...]], size: int, max_frames: int, names: tuple[str, ...]
) -> None:
    """Reads decoded a few frames at a time, one-message NOTIFYs only (every
    round plain); any frames: test_feed_gives_the_notifies_of_any_stream_in_several_rounds."""
    stream = build(parts)
    assert_feed_and_receive_agree(stream, pieces(bytes(stream.data), size), max_frames, names)


# ------------------------------------------------------------------ ack_for == ack


SCORE = set_var("sess", "ip_score", 42)
RESULTS: list[Any] = [
    SCORE,
    None,
    (unset_var("txn", "foo"), set_var("req", "s", "é")),
    [set_var("res", "n", -1)],
    set_var("txn", "fresh", 7),  # not encoded yet
    (),
    SCORE,
]


@pytest.mark.parametrize("kind", ["array", "bytes"])
def test_ack_for_writes_what_ack_writes(kind: str) -> None:
    stream = Stream(b"")
    for i, sid in enumerate([0, 1, 239, 240, 2**32, 2**63, 2**64 - 1]):
        stream.notify(sid, i, [ip_message(i)])
    by_columns, by_tuples = ready(), ready()
    notifies = by_columns.feed(bytes(stream.data))
    notes = by_tuples.receive(bytes(stream.data))
    ids = notifies.ids if kind == "array" else notifies.ids.tobytes()
    assert by_columns.ack_for(ids, RESULTS) == []
    replies = [(sid, fid, as_actions(r)) for (sid, fid, _), r in zip(notes, RESULTS, strict=True)]
    assert by_tuples.ack(replies) == []
    data = by_columns.data_to_send()
    assert data == by_tuples.data_to_send()
    assert data == b"".join(ENC.ack_frame(s, f, actions=a) for s, f, a in replies)


def test_ack_for_cuts_like_ack_at_the_negotiated_size() -> None:
    hello = ENC.kv_frame(
        1, 0, 0, kv=[("supported-versions", String(b"2.0")), ("max-frame-size", UInt32(256))]
    )
    many = [set_var("txn", f"v{i}", i) for i in range(60)]
    results = [SCORE, many, None, tuple(many)]
    pairs = [(1, 1), (3, 1), (5, 1), (2**64 - 1, 2**64 - 1)]
    by_columns, by_tuples = ready(hello), ready(hello)
    ids = array("Q", [i for p in pairs for i in p])
    cut = by_columns.ack_for(ids, results)
    assert cut == [1, 3]
    assert (
        by_tuples.ack([(s, f, as_actions(r)) for (s, f), r in zip(pairs, results, strict=True)])
        == cut
    )
    data = by_columns.data_to_send()
    assert data == by_tuples.data_to_send()
    assert Decoder(max_frame_size=256).decode(data, 256).consumed == len(data)


def test_ack_for_queues_nothing_before_the_handshake_or_when_closing() -> None:
    fresh = connection()
    assert fresh.ack_for(array("Q", [1, 1]), [SCORE]) == []
    assert fresh.data_to_send() == b""
    conn = ready()
    assert conn.ack_for(array("Q"), []) == []
    assert conn.data_to_send() == b""
    conn.disconnect()
    conn.data_to_send()
    assert conn.ack_for(array("Q", [1, 1]), [SCORE]) == []
    assert conn.data_to_send() == b""


# ------------------------------------------------------------------ protocol errors


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (bytes.fromhex("00000003"), Status.INVALID),  # LENGTH below 7
        ((MAX + 1).to_bytes(4, "big"), Status.TOO_BIG),
        (
            bytes.fromhex(
                "0000001e 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 02 00 06 7f000001"
            ),
            Status.INVALID,
        ),
        (V["haproxy-hello 3.x"], Status.INVALID),  # a second HELLO
        (V["ack empty"], Status.INVALID),  # an agent frame
    ],
    ids=["short", "too-big", "nb-args", "hello-again", "ack"],
)
@pytest.mark.parametrize("before", ["plain", "mixed"])
def test_after_a_protocol_error_feed_returns_what_came_before(
    bad: bytes, status: int, before: str
) -> None:
    stream = Stream(b"").notify(1, 1, [ip_message(1)]).notify(3, 1, [ip_message(3)])
    if before == "mixed":
        stream.notify(5, 1, [ip_message(5), ip_message(6)])
    after = Stream.notify_bytes(7, 1, [ip_message(7)])
    conn = ready()
    (batch,) = feed_all(conn, [bytes(stream.data) + bad + after])
    assert notes_meaning(batch.notifications()) == stream.want()
    assert conn.closing
    assert disconnect_status(conn.data_to_send()) == status
    events = conn.take_events()
    assert [type(e) for e in events] == [ProtocolError]
    assert events[0].status == status
    later = conn.feed(after)
    assert (len(later), later.messages, later.counts) == (0, [], None)
    assert conn.data_to_send() == b""


@PROPERTY
@given(
    st.lists(stream_parts(st.lists(message_meanings, max_size=3)), max_size=10),
    st.integers(1, 200),
    st.sampled_from([1, 2, 4]),
    name_lists,
)
def test_feed_gives_the_notifies_of_any_stream_in_several_rounds(
    parts: list[tuple[Any, ...]], size: int, max_frames: int, names: tuple[str, ...]
) -> None:
    """Any frames, decoded a few at a time: each round starts where the
    previous one ended (an offset, no slice), in a read or across reads."""
    stream = build(parts)
    assert_feed_and_receive_agree(stream, pieces(bytes(stream.data), size), max_frames, names)


def test_a_frame_arriving_byte_by_byte_is_joined_once() -> None:
    """A partial frame grows in place; its bytes are decoded once, when the
    last one arrives (no re-join and no decode of the whole so far per read)."""
    stream = Stream()
    stream.notify(7, 1, [["check-client-ip", [["", STRING, String(b"x" * 3000)]]]])
    stream.notify(8, 1, [ip_message(3)])
    conn = AgentConnection(decoder=Decoder(names=NAMES))
    data = bytes(stream.data)
    got: list[Notification] = []
    for i in range(len(data)):
        got += conn.feed(data[i : i + 1]).notifications()
        # a partial frame is held as one growing buffer, never re-made
        if conn.buffered > 4:
            assert conn.bytes_to_boundary() > 0
    assert notes_meaning(got) == stream.want()
    assert conn.at_frame_boundary
    assert conn.buffered == 0


def test_the_rest_of_a_read_after_a_completed_partial_frame_is_decoded_in_place() -> None:
    stream = Stream()
    for sid in range(1, 6):
        stream.notify(sid, 1, [ip_message(sid)])
    data = bytes(stream.data)
    cut = len(HELLO) + 10  # inside the first NOTIFY
    conn = AgentConnection(decoder=Decoder(names=NAMES))
    first = conn.feed(data[:cut]).notifications()
    assert first == []
    assert conn.buffered == 10
    rest = conn.feed(data[cut:]).notifications()
    assert notes_meaning(rest) == stream.want()
    assert conn.buffered == 0


def test_one_notify_fast_path_gives_what_the_general_path_gives() -> None:
    """feed()'s one-NOTIFY shortcut against receive() of the same frame
    with a listed name, an unlisted one and no names at all."""
    for names in (NAMES, ("zz",), ()):
        for name in ("check-client-ip", "zz", "unknown"):
            stream = Stream()
            stream.notify(5, 2, [[name, [["", IPV4, IPv4Address("10.0.0.1")], ["x", UINT32, 4]]]])
            conn = AgentConnection(decoder=Decoder(names=names))
            conn.feed(HELLO)
            notes = conn.feed(bytes(stream.data)[len(HELLO) :])
            assert notes.counts is None
            assert list(notes.ids) == [5, 2]
            (msg,) = notes.messages
            assert msg.name == name
            assert msg[0] == IPv4Address("10.0.0.1")
            assert msg["x"] == 4
            assert notes_meaning(notes.notifications()) == stream.want()


def test_a_decoder_smaller_than_the_settings_is_refused() -> None:
    with pytest.raises(ValueError, match="decoder"):
        AgentConnection(AgentSettings(max_frame_size=65536), decoder=Decoder(max_frame_size=1024))
    state = AgentConnection().handover_state()
    state["max_frame_size"] = 1 << 20
    with pytest.raises(ValueError, match="decoder"):
        AgentConnection.adopt(state)


def test_ack_for_one_notify_takes_one_call_and_still_refuses_narrow_ids() -> None:
    conn = AgentConnection()
    conn.feed(HELLO)
    conn.data_to_send()
    wires = Encoder()
    wires.action_wire(SCORE)
    assert conn.ack_for(array("Q", [1000, 1]), [SCORE]) == []
    assert conn.data_to_send() == ENC.ack_frame(1000, 1, actions=[SCORE])
    with pytest.raises(TypeError, match="array\\('Q'\\)"):
        conn.ack_for(array("I", [1000, 1]), [SCORE])
    assert conn.data_to_send() == b""

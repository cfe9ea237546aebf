"""The agent side of SPOP 2.0 as a sans-IO state machine.

Bytes in (`receive`), notifications and events out, bytes to send
(`data_to_send`). No sockets, no processes, no handler code: the worker,
the tests and the load generator drive it.

Hot path: `feed` returns the NOTIFY frames of a read column-wise (Notifies:
ids, messages), answered with `ack_for`; `receive` gives the same as
`(sid, fid, messages)` tuples, answered with `ack`. Everything rarer
(handshake done, HAProxy said goodbye, protocol error, health check) is
an event object in `take_events()`. After an error, a DISCONNECT or a
health check, `closing` is True: send what `data_to_send()` returns, then
close the connection.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from spoa_mp._spop import lib
from spoa_mp.codec import (
    DEFAULT_FRAME_SIZE,
    F_FID,
    F_FLAGS,
    F_LENGTH,
    F_OFFSET,
    F_PARSED,
    F_PLEN,
    F_POFF,
    F_SID,
    F_TYPE,
    FLAG_ABORT,
    FLAG_FIN,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    OTHER,
    OUT_HEAD,
    CodecError,
    Decoder,
    Encoder,
    FrameRecord,
    FrameType,
    Indexed,
    Status,
    encode_varint,
    index_message,
    item_bytes,
    item_value,
    kv_items,
    messages,
    notify_messages,
    status_reason,
    unlisted_message,
    whole_notify_messages,
)
from spoa_mp.model import (
    I_NUM,
    I_TYPE,
    ITEM_RECORD,
    Action,
    DataType,
    ItemRecord,
    Message,
    String,
)

if TYPE_CHECKING:  # the types only: protocol.py knows no sockets
    from spoa_mp.control import HandoverState

SPOP_VERSION = "2.0"
_new_tuple = tuple.__new__
_decode_batch = lib.spop_decode_batch
_ITEM_SIZE = ITEM_RECORD.size
Notification: TypeAlias = tuple[int, int, list[Message]]
"""(stream-id, frame-id, messages) of one NOTIFY; answer with ack()."""


class Notifies:
    """The NOTIFY frames of one feed(), in arrival order, column-wise.

    `ids` holds (stream-id, frame-id) pairs; `messages` every message in
    order; `counts` the number of messages of each NOTIFY, or None while
    each carries exactly one (HAProxy sends one message per event unless a
    group says otherwise). Columns cost no object per NOTIFY, and ack_for()
    hands `ids` to the encoder as they are.
    """

    __slots__ = ("counts", "ids", "messages")

    def __init__(
        self, ids: array[int] | None = None, messages: list[Message] | None = None
    ) -> None:
        self.ids = array("Q") if ids is None else ids
        self.messages: list[Message] = [] if messages is None else messages
        self.counts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids) >> 1

    def extend(self, other: Notifies) -> None:
        """Append the NOTIFYs of another feed (in order)."""
        if other.counts is not None and self.counts is None:
            self.counts = [1] * len(self)
        if self.counts is not None:
            self.counts += [1] * len(other) if other.counts is None else other.counts
        self.ids += other.ids
        self.messages += other.messages

    def add(self, sid: int, fid: int, msgs: list[Message]) -> None:
        if self.counts is None and len(msgs) != 1:
            self.counts = [1] * len(self)
        if self.counts is not None:
            self.counts.append(len(msgs))
        self.ids.append(sid)
        self.ids.append(fid)
        self.messages += msgs

    def notifications(self) -> list[Notification]:
        """One (sid, fid, messages) tuple per NOTIFY."""
        ids = self.ids
        if self.counts is None:
            return [(ids[2 * k], ids[2 * k + 1], [m]) for k, m in enumerate(self.messages)]
        notes = []
        at = 0
        for k, count in enumerate(self.counts):
            notes.append((ids[2 * k], ids[2 * k + 1], self.messages[at : at + count]))
            at += count
        return notes


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What this agent offers in the handshake."""

    max_frame_size: int = DEFAULT_FRAME_SIZE
    pipelining: bool = True  # announced only when HAProxy offers it
    fragmentation: bool = True  # reassemble fragmented NOTIFY (HAProxy <= 3.0)
    max_reassembled_size: int = 1 << 20  # bound on a reassembled NOTIFY payload

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max-frame-size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE}]")


@dataclass(frozen=True, slots=True)
class Handshake:
    """The outcome of HAPROXY-HELLO / AGENT-HELLO on one connection."""

    max_frame_size: int
    pipelining: bool
    fragmentation: bool
    engine_id: str
    haproxy_capabilities: tuple[str, ...]
    healthcheck: bool


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    handshake: Handshake


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A health-check HELLO was answered; close once sent."""


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """HAProxy sent HAPROXY-DISCONNECT; our AGENT-DISCONNECT is queued."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """HAProxy's bytes broke the protocol; AGENT-DISCONNECT(status) is queued."""

    status: int
    detail: str


Event: TypeAlias = HandshakeDone | HealthCheck | PeerDisconnected | ProtocolError


class FrameCounts:
    """Frames counted where they are rare: everything but NOTIFY in and ACK
    out, which the caller counts in bulk (one worker-wide instance is shared
    by its connections)."""

    __slots__ = ("disconnects_in", "disconnects_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in: dict[str, int] = {}
        self.frames_out: dict[str, int] = {}
        self.disconnects_in: dict[str, int] = {}  # by status code
        self.disconnects_out: dict[str, int] = {}

    @staticmethod
    def add(table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


FRAME_NAMES: dict[int, str] = {
    FrameType.UNSET: "unset",
    FrameType.HAPROXY_HELLO: "haproxy-hello",
    FrameType.HAPROXY_DISCONNECT: "haproxy-disconnect",
    FrameType.NOTIFY: "notify",
    FrameType.AGENT_HELLO: "agent-hello",
    FrameType.AGENT_DISCONNECT: "agent-disconnect",
    FrameType.ACK: "ack",
}

_HELLO, _READY, _CLOSING = range(3)
_INTEGER_TYPES = frozenset((DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64))


class _FailError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_capabilities(value: bytes) -> tuple[str, ...]:
    """HAProxy's capability list: comma-separated, blanks ignored (a blank also
    ends a name, as in HAProxy's own parser)."""
    return tuple(t.decode("ascii", "replace") for t in re.split(rb"[,\s]+", value) if t)


def supports_version(value: bytes) -> bool:
    """Whether a `supported-versions` list includes 2.0 (a major version
    announces all its minors)."""
    for entry in value.split(b","):
        major, _, minor = entry.strip().partition(b".")
        # bounded before int(): a peer could send thousands of digits
        numeric = major.isdigit() and minor.isdigit() and len(major) <= 3 and len(minor) <= 3
        if numeric and int(major) == 2:
            return True
    return False


class AgentConnection:
    """One HAProxy connection, agent side.

    `decoder` and `encoder` hold reusable C buffers; share one of each among
    all connections of a worker (they keep no per-connection state).
    """

    def __init__(
        self,
        settings: AgentSettings | None = None,
        decoder: Decoder | None = None,
        encoder: Encoder | None = None,
        counts: FrameCounts | None = None,
    ) -> None:
        self.settings = settings or AgentSettings()
        self.counts = counts or FrameCounts()
        self._decoder = decoder or Decoder(max_frame_size=self.settings.max_frame_size)
        self._encoder = encoder or Encoder()
        self._acks_for = self._encoder.acks_for
        self._one_ack = self._encoder.one_ack
        self._phase = _HELLO
        self._pending = bytearray()  # bytes of a frame not complete yet
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.max_frame_size = self.settings.max_frame_size  # negotiated in the handshake
        if self.max_frame_size > self._decoder.max_frame_size:
            raise ValueError("the decoder was sized for smaller frames")
        self.handshake: Handshake | None = None
        # a fragmented NOTIFY being reassembled: (sid, fid, the frame so far,
        # where its payload starts)
        self._fragment: tuple[int, int, bytearray, int] | None = None

    # -------------------------------------------------------------- state

    @property
    def closing(self) -> bool:
        """True once the connection must close after sending what is queued."""
        return self._phase == _CLOSING

    @property
    def buffered(self) -> int:
        """Bytes received but not yet a whole frame."""
        return len(self._pending)

    def take_events(self) -> Sequence[Event]:
        """The events since the last call (most reads have none: no allocation)."""
        events = self._events
        if not events:
            return ()
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def at_frame_boundary(self) -> bool:
        """No partial frame buffered and no fragmented NOTIFY under way: the
        connection can move to another process as it stands."""
        return not self._pending and self._fragment is None

    def bytes_to_boundary(self) -> int:
        """How many more bytes complete the buffered partial frame (or at
        least its length prefix); 0 at a frame boundary with no fragmented
        NOTIFY under way. Reading no more than this stops a connection
        exactly between two frames."""
        pending = self._pending
        if not pending:
            # between frames, but a fragmented NOTIFY is not complete: go on
            # frame by frame (its next length prefix first) until it is
            return 4 if self._fragment is not None else 0
        if len(pending) < 4:
            return 4 - len(pending)
        return 4 + int.from_bytes(pending[:4], "big") - len(pending)

    def handover_state(self) -> HandoverState:
        """The negotiated state, as JSON-able data, for `AgentConnection.adopt`
        in another process. Only at a frame boundary."""
        if not self.at_frame_boundary:
            raise RuntimeError("a connection moves only between two frames")
        hs = self.handshake
        return {
            "phase": self._phase,
            "max_frame_size": self.max_frame_size,
            "handshake": None if hs is None else {
                "max_frame_size": hs.max_frame_size,
                "pipelining": hs.pipelining,
                "fragmentation": hs.fragmentation,
                "engine_id": hs.engine_id,
                "haproxy_capabilities": list(hs.haproxy_capabilities),
                "healthcheck": hs.healthcheck,
            },
        }  # fmt: skip

    @classmethod
    def adopt(
        cls,
        state: HandoverState,
        settings: AgentSettings | None = None,
        decoder: Decoder | None = None,
        encoder: Encoder | None = None,
        counts: FrameCounts | None = None,
    ) -> AgentConnection:
        """Carry on a connection another process started (see handover_state)."""
        conn = cls(settings, decoder, encoder, counts)
        phase = state["phase"]
        if phase not in (_HELLO, _READY):
            raise ValueError(f"cannot adopt a connection in phase {phase!r}")
        conn._phase = phase
        size = int(state["max_frame_size"])
        if size > conn._decoder.max_frame_size:
            raise ValueError(f"max-frame-size {size} is above what the decoder takes")
        conn.max_frame_size = size
        hs = state.get("handshake")
        if isinstance(hs, dict):
            conn.handshake = Handshake(
                max_frame_size=int(hs["max_frame_size"]),
                pipelining=bool(hs["pipelining"]),
                fragmentation=bool(hs["fragmentation"]),
                engine_id=str(hs["engine_id"]),
                haproxy_capabilities=tuple(str(c) for c in hs["haproxy_capabilities"]),
                healthcheck=bool(hs["healthcheck"]),
            )
        return conn

    # -------------------------------------------------------------- input

    def receive(self, data: bytes) -> list[Notification]:
        """Feed bytes read from HAProxy; returns the NOTIFY frames completed."""
        return self.feed(data).notifications()

    def feed(self, data: bytes) -> Notifies:
        """receive(), column-wise: the hot path of a worker (see Notifies)."""
        if self._pending or self._phase != _READY:
            return self._feed_general(data)
        # the usual read, one whole one-message NOTIFY: one C call, read inline
        dec = self._decoder
        if _decode_batch(data, len(data), 0, self.max_frame_size, dec.batch) == 1:
            # out[1:10]: the head after the frame count, then sid, fid and the columns
            plain, n_items, end, _, sid, fid, idx, first, nargs = dec.out_view[1:10].tolist()
            if plain and end == len(data):
                records = dec.items_view[: n_items * _ITEM_SIZE].tobytes()
                names = dec.names
                if idx < len(names):
                    msg = Message(names[idx], data, records, first, nargs)
                else:
                    msg = unlisted_message(data, records, first, nargs)
                return Notifies(array("Q", (sid, fid)), [msg])
        return self._feed_general(data)

    def _feed_general(self, data: bytes) -> Notifies:
        """feed() for every read but the one-NOTIFY one: several frames,
        a partial frame, other frame types, errors."""
        notes = Notifies(array("Q"), [])
        if self._phase == _CLOSING:
            return notes
        start = 0
        if self._pending:
            if len(self._pending) < 4:  # not even a length prefix yet: join (once per frame)
                data = bytes(self._pending) + data
                self._pending = bytearray()
            else:
                start = self._complete_pending(data, notes)
                if start < 0 or self._phase == _CLOSING:
                    return notes
        end = len(data)
        while start < end:
            out, records = self._decoder.read(data, start, self.max_frame_size)
            n, plain, _, consumed, error = out[:OUT_HEAD]
            ix = _new_tuple(Indexed, (
                n, plain, b"", out[OUT_HEAD + 2 * n : OUT_HEAD + 3 * n],
                out[OUT_HEAD + 3 * n : OUT_HEAD + 4 * n], out[OUT_HEAD + 4 * n :], records,
                b"", consumed, error,
            ))  # fmt: skip
            if plain == n and self._phase == _READY:
                notes.ids.frombytes(self._decoder.ids_bytes(n))
                notes.messages += notify_messages(data, ix, self._decoder.names)
                if notes.counts is not None:  # an earlier round had another shape
                    notes.counts += [1] * n
            else:
                ix = ix._replace(frames=self._decoder.frames_bytes(n))
                try:
                    ended = self._mixed(data, ix, notes)
                except _FailError as e:
                    self._fail(e.status, e.detail)
                    return notes
                if self._phase == _CLOSING:
                    return notes
                if ended:  # the handshake set max-frame-size: decode the rest again
                    consumed, error = ended, 0
            if error:
                self._fail(error, "malformed frame")
                return notes
            if not n:
                break
            start = consumed  # records full, or a new limit: go on from there
        if start < end:
            self._pending = bytearray(memoryview(data)[start:])
        return notes

    def _complete_pending(self, data: bytes, notes: Notifies) -> int:
        """Add data to a buffered partial frame whose length prefix is known
        (so checked): only the frame's own bytes are joined, once, when it is
        complete. Returns where the rest of data starts, or -1 when all of it
        went into the partial frame."""
        pending = self._pending
        need = 4 + int.from_bytes(pending[:4], "big") - len(pending)
        if len(data) < need:
            pending += data
            return -1
        pending += memoryview(data)[:need]
        frame = bytes(pending)
        self._pending = bytearray()
        rest = self._feed_general(frame)  # one whole frame: no pending is left
        notes.extend(rest)
        return need

    def _mixed(self, data: bytes, ix: Indexed, out: Notifies) -> int:
        """Frame by frame, in order: NOTIFYs and everything else. Returns the
        bytes to consume when the handshake ended and the rest of `data`
        must be decoded under the negotiated limit, else 0."""
        frames = ix.frame_records()
        items: list[ItemRecord] | None = None
        for k, f in enumerate(frames):
            ready = self._phase == _READY
            if f[F_TYPE] == FrameType.NOTIFY and f[F_PARSED] and ready:
                if ix.names[k] == OTHER:  # several messages (or none)
                    out.add(f[F_SID], f[F_FID], messages(data, f, ix.records))
                else:
                    out.add(f[F_SID], f[F_FID], [index_message(data, ix, k, self._decoder.names)])
                continue
            if items is None:
                items = ix.item_records()
            self._other_frame(data, f, items, out)
            if self._phase == _CLOSING:
                return 0
            if not ready and self._phase == _READY:
                return f[F_OFFSET] + 4 + f[F_LENGTH]
        return 0

    def _other_frame(
        self, data: bytes, f: FrameRecord, items: list[ItemRecord], out: Notifies
    ) -> None:
        type_, flags = f[F_TYPE], f[F_FLAGS]
        FrameCounts.add(self.counts.frames_in, FRAME_NAMES.get(type_, "unknown"))
        if type_ == FrameType.HAPROXY_DISCONNECT and f[F_PARSED]:
            self._peer_disconnect(data, f, items)
        elif self._phase == _HELLO:
            if type_ != FrameType.HAPROXY_HELLO:
                raise _FailError(Status.INVALID, f"frame type {type_} before HAPROXY-HELLO")
            if not flags & FLAG_FIN:
                raise _FailError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragmented HELLO")
            self._hello(data, f, items)
        elif type_ in (FrameType.NOTIFY, FrameType.UNSET):
            note = self._fragmented_notify(data, f)
            if note is not None:
                out.add(*note)
        elif type_ in (FrameType.HAPROXY_HELLO, FrameType.HAPROXY_DISCONNECT):
            if not flags & FLAG_FIN:
                raise _FailError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragmented frame")
            raise _FailError(Status.INVALID, "HAPROXY-HELLO after the handshake")
        elif type_ >= FrameType.AGENT_HELLO and type_ <= FrameType.ACK:
            raise _FailError(Status.INVALID, f"agent frame type {type_} sent to the agent")
        # any other type: unknown to us, skipped as the spec allows

    # -------------------------------------------------------------- handshake

    def _hello(self, data: bytes, f: FrameRecord, items: list[ItemRecord]) -> None:
        if f[F_SID] or f[F_FID]:
            raise _FailError(Status.INVALID, "HELLO with non-zero stream-id or frame-id")
        kv = kv_items(data, f, items)

        versions = kv.get("supported-versions")
        if versions is None:
            raise _FailError(Status.NO_VERSION, "no supported-versions")
        if versions[I_TYPE] != DataType.STRING:
            raise _FailError(Status.INVALID, "supported-versions is not a string")
        if not supports_version(item_bytes(data, versions)):
            raise _FailError(Status.BAD_VERSION, "HAProxy does not offer SPOP 2.x")

        size = kv.get("max-frame-size")
        if size is None:
            raise _FailError(Status.NO_FRAME_SIZE, "no max-frame-size")
        if size[I_TYPE] not in _INTEGER_TYPES:
            raise _FailError(Status.INVALID, "max-frame-size is not an integer")
        theirs = item_value(data, size)
        assert isinstance(theirs, int)
        if theirs < MIN_FRAME_SIZE:
            raise _FailError(
                Status.BAD_FRAME_SIZE, f"max-frame-size {theirs} is below {MIN_FRAME_SIZE}"
            )

        caps: tuple[str, ...] = ()
        cap_item = kv.get("capabilities")
        if cap_item is not None:
            if cap_item[I_TYPE] != DataType.STRING:
                raise _FailError(Status.INVALID, "capabilities is not a string")
            caps = parse_capabilities(item_bytes(data, cap_item))

        check = kv.get("healthcheck")
        healthcheck = check is not None and check[I_TYPE] == DataType.BOOL and bool(check[I_NUM])
        engine = kv.get("engine-id")
        engine_id = ""
        if engine is not None and engine[I_TYPE] == DataType.STRING:
            engine_id = item_bytes(data, engine).decode("utf-8", "replace")

        hs = Handshake(
            max_frame_size=min(self.settings.max_frame_size, theirs),
            pipelining=self.settings.pipelining and "pipelining" in caps,
            fragmentation=self.settings.fragmentation,
            engine_id=engine_id,
            haproxy_capabilities=caps,
            healthcheck=healthcheck,
        )
        ours = [
            c
            for c, on in (("pipelining", hs.pipelining), ("fragmentation", hs.fragmentation))
            if on
        ]
        self._out.append(
            self._encoder.frame(
                FrameType.AGENT_HELLO, 0, 0,
                kv=[
                    ("version", String(SPOP_VERSION.encode())),
                    ("max-frame-size", (DataType.UINT32, hs.max_frame_size, b"")),
                    ("capabilities", String(",".join(ours).encode())),
                ],
            )
        )  # fmt: skip
        FrameCounts.add(self.counts.frames_out, "agent-hello")
        self.handshake = hs
        self.max_frame_size = hs.max_frame_size
        if healthcheck:
            # HAProxy closes right after reading our HELLO: do not wait
            self._events.append(HealthCheck())
            self._phase = _CLOSING
        else:
            self._events.append(HandshakeDone(hs))
            self._phase = _READY

    # -------------------------------------------------------------- fragments

    def _fragmented_notify(self, data: bytes, f: FrameRecord) -> Notification | None:
        """NOTIFY without FIN starts a payload, UNSET frames continue it (HAProxy
        <= 3.0, and only if we announced fragmentation)."""
        sid, fid, flags, type_ = f[F_SID], f[F_FID], f[F_FLAGS], f[F_TYPE]
        if flags & FLAG_ABORT:
            # HAProxy gave up on this NOTIFY: forget it, nothing to answer
            if self._fragment is not None and self._fragment[:2] == (sid, fid):
                self._fragment = None
            return None
        if not (self.handshake and self.handshake.fragmentation):
            raise _FailError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragment, not announced")
        if type_ == FrameType.NOTIFY:
            if self._fragment is not None:
                raise _FailError(Status.INTERLACED_FRAMES, "new NOTIFY inside a fragmented one")
            # the whole frame is built in place: a length prefix (set at the
            # end), the header of a NOTIFY with FIN, then the payloads
            head = bytes((0, 0, 0, 0, FrameType.NOTIFY, 0, 0, 0, FLAG_FIN))
            buf = bytearray(head + encode_varint(sid) + encode_varint(fid))
            self._fragment = (sid, fid, buf, len(buf))
            buf += data[f[F_POFF] : f[F_POFF] + f[F_PLEN]]
            return None
        if self._fragment is None or self._fragment[:2] != (sid, fid):
            raise _FailError(Status.INTERLACED_FRAMES, "continuation of an unknown NOTIFY")
        _, _, buf, head_len = self._fragment
        buf += memoryview(data)[f[F_POFF] : f[F_POFF] + f[F_PLEN]]
        if len(buf) - head_len > self.settings.max_reassembled_size:
            raise _FailError(Status.TOO_BIG, "reassembled NOTIFY above the limit")
        if not flags & FLAG_FIN:
            return None
        self._fragment = None
        buf[:4] = (len(buf) - 4).to_bytes(4, "big")
        frame = bytes(buf)
        del buf[:]  # the only copy left is `frame`, which the messages keep
        try:
            return (sid, fid, whole_notify_messages(frame))
        except CodecError as e:
            raise _FailError(e.status, "malformed reassembled NOTIFY") from None

    # -------------------------------------------------------------- endings

    def _peer_disconnect(self, data: bytes, f: FrameRecord, items: list[ItemRecord]) -> None:
        kv = kv_items(data, f, items)
        code = kv.get("status-code")
        status = (
            item_value(data, code) if code is not None and code[I_TYPE] in _INTEGER_TYPES else 0
        )
        msg = kv.get("message")
        text = ""
        if msg is not None and msg[I_TYPE] == DataType.STRING:
            text = item_bytes(data, msg).decode("utf-8", "replace")
        assert isinstance(status, int)
        if not 0 <= status <= 0xFFFFFFFF:
            status = Status.UNKNOWN
        FrameCounts.add(self.counts.disconnects_in, str(status))
        self._events.append(PeerDisconnected(status, text))
        # answer with the same status, as HAProxy's example agent does
        self._queue_disconnect(status, status_reason(status))
        self._phase = _CLOSING

    def _fail(self, status: int, detail: str) -> None:
        self._events.append(ProtocolError(status, detail))
        self._queue_disconnect(status, Status(status).reason)
        self._phase = _CLOSING

    def _queue_disconnect(self, status: int, message: str) -> None:
        FrameCounts.add(self.counts.frames_out, "agent-disconnect")
        FrameCounts.add(self.counts.disconnects_out, str(status))
        self._out.append(
            self._encoder.frame(
                FrameType.AGENT_DISCONNECT, 0, 0,
                kv=[
                    ("status-code", (DataType.UINT32, status & 0xFFFFFFFF, b"")),
                    ("message", String(message.encode()[:255])),
                ],
            )
        )  # fmt: skip

    def disconnect(self, status: int = Status.NORMAL, message: str = "normal") -> None:
        """Close on our side: AGENT-DISCONNECT, then `closing`."""
        if self._phase != _CLOSING:
            self._queue_disconnect(status, message)
            self._phase = _CLOSING

    # -------------------------------------------------------------- output

    def ack(self, replies: Sequence[tuple[int, int, Sequence[Action]]]) -> list[int]:
        """Queue one ACK per (stream-id, frame-id, actions), encoded in one call.

        Returns the indexes of replies whose actions did not all fit in the
        negotiated max-frame-size (the ACK carries the leading ones that fit).
        Nothing is queued once the connection is closing.
        """
        if self._phase != _READY or not replies:
            return []
        data, cut = self._encoder.acks(replies, self.max_frame_size)
        self._out.append(data)
        return cut

    def ack_for(
        self, ids: bytes | array[int], results: Sequence[Action | Sequence[Action] | None]
    ) -> list[int]:
        """ack() column-wise: `ids` as in Notifies.ids, one actions sequence
        per NOTIFY in `results`. Returns the indexes of cut ACKs."""
        if self._phase != _READY or not results:
            return []
        if len(results) == 1 and ids.__class__ is array:  # one NOTIFY per read
            action = results[0]
            if action.__class__ is Action and action.wire is not None:
                one = self._one_ack(ids, action.wire, self.max_frame_size)
                if one is not None:
                    self._out.append(one)
                    return []
        data, cut = self._acks_for(ids, results, self.max_frame_size)
        self._out.append(data)
        return cut


__all__ = [
    "SPOP_VERSION",
    "AgentConnection",
    "AgentSettings",
    "CodecError",
    "Event",
    "FrameCounts",
    "Handshake",
    "HandshakeDone",
    "HealthCheck",
    "Notification",
    "PeerDisconnected",
    "ProtocolError",
    "parse_capabilities",
    "supports_version",
]

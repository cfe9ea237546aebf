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

This module is the per-connection state machine; what it reads and writes
lives beside it: handshake.py (HELLO negotiation), reassembly.py (fragmented
NOTIFY), disconnect.py (DISCONNECT frames), notifies.py (the hot path's
column-wise NOTIFYs), events.py (what take_events() returns) and
frame_counts.py. Their public names are importable from here too.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spoa_mp._spop import lib
from spoa_mp.codec import (
    F_FID,
    F_FLAGS,
    F_LENGTH,
    F_OFFSET,
    F_PARSED,
    F_SID,
    F_TYPE,
    FLAG_FIN,
    OTHER,
    OUT_HEAD,
    CodecError,
    Decoder,
    Encoder,
    FrameRecord,
    FrameType,
    Indexed,
    Status,
    index_message,
    messages,
    notify_messages,
    status_reason,
    unlisted_message,
)
from spoa_mp.disconnect import agent_disconnect, read_disconnect
from spoa_mp.events import (
    Event,
    HandshakeDone,
    HealthCheck,
    PeerDisconnected,
    ProtocolError,
    ViolationError,
)
from spoa_mp.frame_counts import FRAME_NAMES, FrameCounts
from spoa_mp.handshake import (
    SPOP_VERSION,
    AgentSettings,
    Handshake,
    agent_hello,
    negotiate,
    parse_capabilities,
    supports_version,
)
from spoa_mp.model import ITEM_RECORD, Action, ItemRecord, Message
from spoa_mp.notifies import Notification, Notifies
from spoa_mp.reassembly import Reassembly

if TYPE_CHECKING:  # the types only: protocol.py knows no sockets
    from spoa_mp.control import HandoverState

_new_tuple = tuple.__new__
_decode_batch = lib.spop_decode_batch
_ITEM_SIZE = ITEM_RECORD.size
_HELLO, _READY, _CLOSING = range(3)


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
        self._reassembly = Reassembly(self.settings.max_reassembled_size)

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
        return not self._pending and not self._reassembly.under_way

    def bytes_to_boundary(self) -> int:
        """How many more bytes complete the buffered partial frame (or at
        least its length prefix); 0 at a frame boundary with no fragmented
        NOTIFY under way. Reading no more than this stops a connection
        exactly between two frames."""
        pending = self._pending
        if not pending:
            # between frames, but a fragmented NOTIFY is not complete: go on
            # frame by frame (its next length prefix first) until it is
            return 4 if self._reassembly.under_way else 0
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
            "handshake": None if hs is None else hs.state(),
        }

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
            conn.handshake = Handshake.from_state(hs)
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
                except ViolationError as e:
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
                raise ViolationError(Status.INVALID, f"frame type {type_} before HAPROXY-HELLO")
            if not flags & FLAG_FIN:
                raise ViolationError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragmented HELLO")
            self._hello(data, f, items)
        elif type_ in (FrameType.NOTIFY, FrameType.UNSET):
            announced = self.handshake is not None and self.handshake.fragmentation
            note = self._reassembly.take(data, f, announced)
            if note is not None:
                out.add(*note)
        elif type_ in (FrameType.HAPROXY_HELLO, FrameType.HAPROXY_DISCONNECT):
            if not flags & FLAG_FIN:
                raise ViolationError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragmented frame")
            raise ViolationError(Status.INVALID, "HAPROXY-HELLO after the handshake")
        elif type_ >= FrameType.AGENT_HELLO and type_ <= FrameType.ACK:
            raise ViolationError(Status.INVALID, f"agent frame type {type_} sent to the agent")
        # any other type: unknown to us, skipped as the spec allows

    # -------------------------------------------------------------- handshake

    def _hello(self, data: bytes, f: FrameRecord, items: list[ItemRecord]) -> None:
        hs = negotiate(self.settings, data, f, items)
        self._out.append(agent_hello(self._encoder, hs))
        FrameCounts.add(self.counts.frames_out, "agent-hello")
        self.handshake = hs
        self.max_frame_size = hs.max_frame_size
        if hs.healthcheck:
            # HAProxy closes right after reading our HELLO: do not wait
            self._events.append(HealthCheck())
            self._phase = _CLOSING
        else:
            self._events.append(HandshakeDone(hs))
            self._phase = _READY

    # -------------------------------------------------------------- endings

    def _peer_disconnect(self, data: bytes, f: FrameRecord, items: list[ItemRecord]) -> None:
        status, text = read_disconnect(data, f, items)
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
        self._out.append(agent_disconnect(self._encoder, status, message))

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
    "Notifies",
    "PeerDisconnected",
    "ProtocolError",
    "parse_capabilities",
    "supports_version",
]

"""Python face of the C frame codec (spoa_mp._spop, built from csrc/).

C is called once per receive buffer (decode) and once per batch of frames to
send (encode), never per field: the C side fills fixed-layout records that
are read and written here with `struct`, which costs far less than touching
cdata fields one by one.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from enum import IntEnum
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple, TypeAlias, cast

from spoa_mp._spop import ffi, lib
from spoa_mp.model import (
    I_NAME_LEN,
    I_NAME_OFF,
    I_NARGS,
    I_NUM,
    I_TYPE,
    I_VAL_LEN,
    I_VAL_OFF,
    ITEM_RECORD,
    Action,
    ItemRecord,
    Message,
    TypedEncoding,
    Value,
    encode_value,
    typed_value,
)

# Record layouts; they must match spop_frame / spop_item in csrc/spop.h.
FRAME_RECORD = struct.Struct("=QQIIIIIIIBB2x")

# The protocol's frame-size limits, from csrc/spop.h (their one definition)
MIN_FRAME_SIZE: int = lib.SPOP_MIN_FRAME_SIZE
DEFAULT_FRAME_SIZE: int = lib.SPOP_DEFAULT_FRAME_SIZE
MAX_FRAME_SIZE: int = (
    lib.SPOP_MAX_FRAME_SIZE
)  # what we buffer per frame; HAProxy caps at tune.bufsize
FLAG_FIN = 0x1
FLAG_ABORT = 0x2


def _check_layout() -> None:
    for ctype, record, fields in (
        ("spop_frame", FRAME_RECORD, ("sid", "fid", "flags", "offset", "n_items", "type")),
        ("spop_item", ITEM_RECORD, ("num", "name_off", "val_len", "kind", "scope")),
    ):
        if ffi.sizeof(ctype) != record.size:
            raise ImportError(f"{ctype} is {ffi.sizeof(ctype)} bytes, record {record.size}")
        offsets = [ffi.offsetof(ctype, f) for f in fields]
        if offsets != sorted(offsets):
            raise ImportError(f"{ctype} field order differs from its record")


_check_layout()


class FrameType(IntEnum):
    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class Status(IntEnum):
    """DISCONNECT status codes."""

    NORMAL = 0
    IO = 1
    TIMEOUT = 2
    TOO_BIG = 3
    INVALID = 4
    NO_VERSION = 5
    NO_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    BAD_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE = 13
    UNKNOWN = 99

    @property
    def reason(self) -> str:
        """The message HAProxy uses for this code."""
        return status_reason(self)


def status_reason(status: int) -> str:
    if not 0 <= status <= Status.UNKNOWN:  # the C side takes an int
        status = Status.UNKNOWN
    reason: bytes = ffi.string(lib.spop_status_reason(status))
    return reason.decode()


class ItemKind(IntEnum):
    KV = 1
    MESSAGE = 2
    ARG = 3
    ACTION = 4


# Decoded records, as struct unpacks them.
# frame: (sid, fid, flags, offset, length, payload_off, payload_len,
#         first_item, n_items, type, items_parsed)
FrameRecord: TypeAlias = tuple[int, int, int, int, int, int, int, int, int, int, int]
# item: ItemRecord (see spoa_mp.model)

F_SID, F_FID, F_FLAGS, F_OFFSET, F_LENGTH, F_POFF, F_PLEN, F_FIRST, F_NITEMS, F_TYPE, F_PARSED = (
    range(11)
)


class Decoded(NamedTuple):
    """What one decode call found at the start of a buffer."""

    frames: list[FrameRecord]
    items: list[ItemRecord]
    consumed: int  # bytes taken by `frames`
    error: int  # 0, or the status of the malformed frame at `consumed`


class Indexed(NamedTuple):
    """One decode call, indexed for the hot path (Decoder.index).

    `ids` holds each frame's stream-id and frame-id (uint64 pairs, native
    order). `names`, `firsts` and `nargs` are columns, one entry per frame:
    for a one-message NOTIFY, the index of its message's name in
    Decoder.names (len(names) for a name not listed), its first argument
    record and its argument count; for every other frame OTHER, 0, 0.
    `plain` counts the one-message NOTIFYs.
    """

    n: int  # frames decoded
    plain: int
    ids: bytes
    names: list[int]
    firsts: list[int]
    nargs: list[int]
    records: bytes  # the item records (Message reads them)
    frames: bytes  # the frame records (frame_records()); see Decoder.index
    consumed: int
    error: int

    def frame_records(self) -> list[FrameRecord]:
        return list(FRAME_RECORD.iter_unpack(self.frames))

    def item_records(self) -> list[ItemRecord]:
        return list(ITEM_RECORD.iter_unpack(self.records))


OTHER = lib.SPOP_INDEX_OTHER
# the head of spop_decode_batch's flat result (spop.h, enum spop_batch_out)
OUT_FRAMES, OUT_PLAIN, OUT_ITEMS, OUT_END, OUT_STATUS, OUT_HEAD = (
    lib.SPOP_OUT_FRAMES, lib.SPOP_OUT_PLAIN, lib.SPOP_OUT_ITEMS, lib.SPOP_OUT_END,
    lib.SPOP_OUT_STATUS, lib.SPOP_OUT_HEAD,
)  # fmt: skip
_decode_batch = lib.spop_decode_batch

# NamedTuple's own constructor is Python code; this is the C one (per read)
_new_tuple = tuple.__new__
_frame_size = FRAME_RECORD.size
_item_size = ITEM_RECORD.size


class CodecError(ValueError):
    """A frame could not be decoded or encoded; `status` is the SPOP code."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        super().__init__(detail or status_reason(status))


def _pack_names(names: Sequence[str]) -> bytes:
    out = bytearray()
    for name in names:
        raw = name.encode()
        out += encode_varint(len(raw)) + raw
    return bytes(out)


class Decoder:
    """Decodes receive buffers into records; owns reusable C record arrays.

    One per worker is enough: results are copied out before it returns.
    `names` are the message names the caller has handlers for: the C side
    matches them, so a message's name costs no slice or lookup.
    """

    def __init__(
        self,
        max_frames: int = 64,
        max_frame_size: int = DEFAULT_FRAME_SIZE,
        names: Sequence[str] = (),
        max_items: int = 0,
    ) -> None:
        self.max_frames = max_frames
        # enough records for any single frame of this size (>= 2 bytes per
        # item), unless the caller sizes them (and retries when they run out)
        self.max_items = max_items or max(max_frame_size // 2 + 1, 256)
        self.max_frame_size = 2 * self.max_items - 1  # the largest max_frame_size it takes
        self._frames = ffi.new("spop_frame[]", max_frames)
        self._items = ffi.new("spop_item[]", self.max_items)
        self._frames_view = memoryview(ffi.buffer(self._frames))
        # public for a caller that inlines the one-frame read (AgentConnection.feed)
        self.items_view = memoryview(ffi.buffer(self._items))
        self._out = ffi.new("uint64_t[]", OUT_HEAD + 5 * max_frames)
        self.out_view = memoryview(ffi.buffer(self._out)).cast("Q")
        self.names = tuple(names)
        self._names_raw = _pack_names(self.names)  # kept alive: C points into it
        batch = self.batch = ffi.new("spop_batch *")
        batch.frames, batch.items, batch.out = self._frames, self._items, self._out
        batch.names = ffi.from_buffer("uint8_t[]", self._names_raw) if self._names_raw else ffi.NULL
        batch.names_len, batch.n_names = len(self._names_raw), len(self.names)
        batch.max_frames, batch.max_items = max_frames, self.max_items

    def read(self, data: bytes, start: int, max_frame_size: int) -> tuple[list[int], bytes]:
        """Decode and index the complete frames of data[start:] in one C
        call, for the hot path: (out, records).

        `out` is the C side's flat result (spop.h, spop_decode_batch): the
        OUT_* counts, then with n = out[OUT_FRAMES], 2n ids, n name indexes,
        n first records, n argument counts. `records` are the item records
        (what Message reads). Offsets count from data[0], not from start.
        The caller keeps max_frame_size <= self.max_frame_size.
        """
        n = _decode_batch(data, len(data), start, max_frame_size, self.batch)
        if n < 0:  # nothing written: the previous call's results must not be read
            raise CodecError(-n, f"cannot decode from {start} in {len(data)} bytes (or bad names)")
        out = self.out_view[: OUT_HEAD + 5 * n].tolist()
        return out, self.items_view[: out[OUT_ITEMS] * _item_size].tobytes()

    def ids_bytes(self, n: int) -> bytes:
        """The ids of the last read()'s n frames, as native uint64 pairs."""
        return self.out_view[OUT_HEAD : OUT_HEAD + 2 * n].tobytes()

    def frames_bytes(self, n: int) -> bytes:
        """The frame records of the last read()'s n frames (FRAME_RECORD)."""
        return self._frames_view[: n * _frame_size].tobytes()

    def decode(self, data: bytes, max_frame_size: int) -> Decoded:
        """Decode the complete frames at the start of `data` into records
        (one C call): the general form of index(), for rare frames and tests.

        Stops early when the record arrays are full; call again on the rest.
        """
        ix = self.index(data, max_frame_size, all_frames=True)
        return Decoded(ix.frame_records(), ix.item_records(), ix.consumed, ix.error)

    def index(
        self, data: bytes, max_frame_size: int, all_frames: bool = False, start: int = 0
    ) -> Indexed:
        """Decode and index the complete frames of data[start:]: one C call,
        and no Python object per frame but a few ints (Indexed). Offsets
        (and `consumed`) count from data[0].

        The frame records are copied out only when some frame is not a plain
        NOTIFY, or when `all_frames` asks for them.
        """
        if max_frame_size > self.max_frame_size:
            raise ValueError("decoder was sized for smaller frames")
        out, records = self.read(data, start, max_frame_size)
        n, plain, _, end, error = out[:OUT_HEAD]
        if n == 0:
            return _new_tuple(Indexed, (0, 0, b"", [], [], [], b"", b"", end, error))
        cols = out[OUT_HEAD + 2 * n :]
        return _new_tuple(
            Indexed,
            (
                n,
                plain,
                self.ids_bytes(n),
                cols[:n],
                cols[n : 2 * n],
                cols[2 * n :],
                records,
                # the columns say all a plain read needs: skip this copy then
                self.frames_bytes(n) if plain != n or all_frames else b"",
                end,
                error,
            ),
        )


def whole_notify_messages(frame: bytes) -> list[Message]:
    """The messages of one whole NOTIFY frame of any size, e.g. a reassembled
    fragmented one, decoded once: records start small and grow only when a
    payload has more items (memory follows the items, not the worst case).

    Raises CodecError for a malformed frame.
    """
    size = len(frame) - 4
    items = 256
    while True:
        dec = Decoder(max_frames=1, max_items=items)
        out, records = dec.read(frame, 0, size)
        status = out[OUT_STATUS]
        if out[OUT_FRAMES] == 1 and out[OUT_END] == len(frame):
            return messages(frame, FRAME_RECORD.unpack(dec.frames_bytes(1)), records)
        if status != Status.RESOURCE or items > size // 2:
            raise CodecError(status or Status.INVALID, "malformed reassembled NOTIFY")
        items = min(4 * items, size // 2 + 1)


def item_value(data: bytes, item: ItemRecord) -> Value:
    """The Python value of a decoded KV / ARG / set-var record."""
    raw = data[item[I_VAL_OFF] : item[I_VAL_OFF] + item[I_VAL_LEN]]
    return typed_value(item[I_TYPE], item[I_NUM], raw)


def item_bytes(data: bytes, item: ItemRecord) -> bytes:
    """The payload of a STRING or BINARY record, as bytes (the caller checked
    its type): what bytes(item_value()) gives, without the value object."""
    return bytes(data[item[I_VAL_OFF] : item[I_VAL_OFF] + item[I_VAL_LEN]])


def item_name(data: bytes, item: ItemRecord) -> bytes:
    return data[item[I_NAME_OFF] : item[I_NAME_OFF] + item[I_NAME_LEN]]


def kv_items(data: bytes, frame: FrameRecord, items: list[ItemRecord]) -> dict[str, ItemRecord]:
    """A HELLO / DISCONNECT payload as key -> record (the last one wins)."""
    first = frame[F_FIRST]
    return {
        item_name(data, it).decode("utf-8", "replace"): it
        for it in items[first : first + frame[F_NITEMS]]
    }


MESSAGE_NAMES: dict[bytes, str] = {}


def pack_records(items: list[ItemRecord]) -> bytes:
    """Item records back to the bytes Message reads (tests, rare paths)."""
    return b"".join([ITEM_RECORD.pack(*rec) for rec in items])


def message_name(raw: bytes) -> str:
    """A message name as text, decoded once: names come from HAProxy's
    config, so there are few of them."""
    name = MESSAGE_NAMES.get(raw)
    if name is None:
        if len(MESSAGE_NAMES) >= 1024:  # a peer sending junk names: stay bounded
            MESSAGE_NAMES.clear()
        name = MESSAGE_NAMES[raw] = raw.decode("utf-8", "replace")
    return name


def messages(data: bytes, frame: FrameRecord, items: list[ItemRecord] | bytes) -> list[Message]:
    """The messages of a decoded NOTIFY, arguments left undecoded.

    `items` is Decoded.items or Indexed.records of the same decode.
    """
    records = items if isinstance(items, bytes) else pack_records(items)
    out = []
    i = frame[F_FIRST]
    end = i + frame[F_NITEMS]
    while i < end:
        rec = ITEM_RECORD.unpack_from(records, i * _item_size)
        name = message_name(data[rec[I_NAME_OFF] : rec[I_NAME_OFF] + rec[I_NAME_LEN]])
        out.append(Message(name, data, records, i + 1, rec[I_NARGS]))
        i += 1 + rec[I_NARGS]
    return out


def notify_messages(data: bytes, ix: Indexed, names: Sequence[str]) -> list[Message]:
    """The Message of each frame of an index whose frames are all
    one-message NOTIFYs (ix.plain == ix.n), in order. `names` are the
    decoder's names."""
    n_names = len(names)
    records = ix.records
    # C-level iteration over the columns: only Message.__init__ runs per message
    msgs = list(
        map(Message, map((*names, "").__getitem__, ix.names), repeat(data), repeat(records),
            ix.firsts, ix.nargs)
    )  # fmt: skip
    if n_names in ix.names:  # a name nobody registered: read it from its record
        for k, idx in enumerate(ix.names):
            if idx == n_names:
                msgs[k] = index_message(data, ix, k, names)
    return msgs


def index_message(data: bytes, ix: Indexed, k: int, names: Sequence[str]) -> Message:
    """The Message of frame k of an index, a one-message NOTIFY."""
    idx, first, nargs = ix.names[k], ix.firsts[k], ix.nargs[k]
    if idx < len(names):
        return Message(names[idx], data, ix.records, first, nargs)
    return unlisted_message(data, ix.records, first, nargs)


def unlisted_message(data: bytes, records: bytes, first: int, nargs: int) -> Message:
    """A message whose name the decoder was not given: read it from its record."""
    rec = ITEM_RECORD.unpack_from(records, (first - 1) * _item_size)
    name = message_name(data[rec[I_NAME_OFF] : rec[I_NAME_OFF] + rec[I_NAME_LEN]])
    return Message(name, data, records, first, nargs)


# ------------------------------------------------------------------ encoding

# A KV item to encode: (key, value) or (key, (DataType, num, raw)).
KV: TypeAlias = tuple[str, "Value | TypedEncoding"]


_wire_of = attrgetter("wire")
_encode_acks = lib.spop_encode_acks
_ACK_ROOM = 4 + lib.SPOP_FRAME_HDR_MAX  # per ACK: the length prefix and the longest header


class _FrameItems:
    """The item records of one frame being encoded, and the strings buffer
    (names and byte values, then the raw payload) they point into."""

    __slots__ = ("payload", "records", "strings")

    def __init__(self) -> None:
        self.strings = bytearray()
        self.records: list[tuple[int, ...]] = []
        self.payload = b""

    def ref(self, b: bytes) -> tuple[int, int]:
        """Append b to the strings; its (offset, length) there."""
        self.strings.extend(b)
        return len(self.strings) - len(b), len(b)

    def _typed(self, name: bytes, value: Value | TypedEncoding, kind: int) -> None:
        t, num, b = value if isinstance(value, tuple) else encode_value(value)
        name_off, name_len = self.ref(name)
        val_off, val_len = self.ref(b)
        self.records.append((num, name_off, name_len, val_off, val_len, kind, t, 0, 0, 0))

    def add_kv(self, kv: Sequence[KV]) -> None:
        for key, value in kv:
            self._typed(key.encode(), value, ItemKind.KV)

    def add_messages(
        self, messages: Sequence[tuple[str, Sequence[tuple[str, Value | TypedEncoding]]]]
    ) -> None:
        for name, args in messages:
            name_off, name_len = self.ref(name.encode())
            self.records.append((0, name_off, name_len, 0, 0, ItemKind.MESSAGE, 0, len(args), 0, 0))
            for arg_name, value in args:
                self._typed(arg_name.encode(), value, ItemKind.ARG)

    def add_actions(self, actions: Sequence[Action]) -> None:
        for a in actions:
            name_off, name_len = self.ref(a.name)
            val_off, val_len = self.ref(a.raw)
            self.records.append(
                (a.num, name_off, name_len, val_off, val_len, ItemKind.ACTION, a.type, 0,
                 a.action, a.scope)
            )  # fmt: skip


class Encoder:
    """Encodes whole frames into one bytes object per batch (one C call).

    The caller's records go into reusable C arrays; names and byte values are
    gathered into one strings buffer that the records point into.
    """

    def __init__(self, max_frames: int = 64, max_items: int = 1024, out_size: int = 65536) -> None:
        self._max_frames = max_frames
        self._max_items = max_items
        self._frames = ffi.new("spop_frame[]", max_frames)
        self._items = ffi.new("spop_item[]", max_items)
        self._frames_view = memoryview(ffi.buffer(self._frames))
        self._items_view = memoryview(ffi.buffer(self._items))
        self._new_out(out_size)
        self._ids_cap = 2 * max_frames  # reused for the ids of every ACK batch
        self._ids = ffi.new("uint64_t[]", self._ids_cap)
        self._ids_view = memoryview(ffi.buffer(self._ids)).cast("Q")
        self._wire_encoder: Encoder | None = None

    def _grow(self, frames: int, items: int, out: int) -> None:
        if frames > self._max_frames:
            self._max_frames = frames
            self._frames = ffi.new("spop_frame[]", frames)
            self._frames_view = memoryview(ffi.buffer(self._frames))
        if items > self._max_items:
            self._max_items = items
            self._items = ffi.new("spop_item[]", items)
            self._items_view = memoryview(ffi.buffer(self._items))
        if out > self._out_size:
            self._new_out(out)

    def acks(
        self, replies: Sequence[tuple[int, int, Sequence[Action]]], max_frame_size: int
    ) -> tuple[bytes, list[int]]:
        """Encode one ACK per (sid, fid, actions), in one C call.

        Returns the bytes and the indexes of replies whose actions did not all
        fit in max_frame_size; those ACKs carry the leading actions that fit.
        """
        ids = array("Q")
        for sid, fid, _ in replies:
            ids.append(sid)
            ids.append(fid)
        return self.acks_for(ids, [actions for _, _, actions in replies], max_frame_size)

    def acks_for(
        self,
        ids: bytes | array[int],
        results: Sequence[Action | Sequence[Action] | None],
        max_frame_size: int,
    ) -> tuple[bytes, list[int]]:
        """acks() column-wise: `ids` holds (stream-id, frame-id) pairs as
        native uint64 (Indexed.ids, Notifies.ids), one pair per result; a
        result is one Action, a sequence of Actions, or None (no action).

        When every result is one Action encoded before (a handler picking a
        prebuilt Action: the usual case), no Python code runs per ACK.
        """
        n = len(results)
        if ids.__class__ is array:
            if ids.typecode != "Q":
                # C reads 16 bytes per pair: anything narrower would be read past
                raise TypeError(f"ids must be array('Q'), not array({ids.typecode!r})")
            if len(ids) != 2 * n:
                raise ValueError(f"ids for {n} ACKs must be {2 * n} uint64, not {len(ids)}")
        elif len(ids) != 16 * n:
            raise ValueError(f"ids for {n} ACKs must be {2 * n} uint64 ({16 * n} bytes)")
        if n == 1 and results[0].__class__ is Action:  # one NOTIFY per read: no join
            payload = results[0].wire
            if payload is None:
                return self._acks_general(ids, results, max_frame_size)
        else:
            try:
                # AttributeError: a result is not an Action; TypeError: not encoded yet
                payload = b"".join(map(_wire_of, results))
            except (AttributeError, TypeError):
                return self._acks_general(ids, results, max_frame_size)
        try:
            return self._encode_acks(ids, None, payload, n, max_frame_size), []
        except CodecError as e:  # an ACK too big: the general path cuts it
            if e.status != Status.TOO_BIG:
                raise  # pragma: no cover - the actions were encoded by us
        return self._acks_general(ids, results, max_frame_size)

    def one_ack(self, ids: array[int], wire: bytes, max_frame_size: int) -> bytes | None:
        """One ACK carrying `wire` (one encoded Action) for ids = array('Q',
        (sid, fid)): the reply to a one-NOTIFY read, in one C call. None when
        it needs the general path (not one uint64 pair, too big, no room)."""
        if len(ids) != 2 or ids.typecode != "Q" or len(wire) + _ACK_ROOM > self._out_size:
            return None
        self._ids_view[:2] = ids
        rc = _encode_acks(
            self._out, self._out_size, max_frame_size, self._ids, ffi.NULL, 1, wire, len(wire)
        )
        return self._out_view[:rc].tobytes() if rc > 0 else None

    def _acks_general(
        self,
        ids: bytes | array[int],
        results: Sequence[Action | Sequence[Action] | None],
        max_frame_size: int,
    ) -> tuple[bytes, list[int]]:
        ends = array("I")
        payload = bytearray()
        cut = []
        safe = max_frame_size - 25  # fits whatever the header (ids of 10 bytes each)
        pairs = ids if isinstance(ids, array) else memoryview(ids).cast("Q")
        for k, result in enumerate(results):
            # exact class, as acks_for: not an Action, so a sequence of them
            # (a __class__ test narrows only the positive branch)
            actions = cast(
                "Sequence[Action]", (result,) if result.__class__ is Action else result or ()
            )
            start = len(payload)
            for a in actions:
                payload += a.wire or self.action_wire(a)
            if len(payload) - start > safe:
                sid, fid = pairs[2 * k], pairs[2 * k + 1]
                budget = max_frame_size - 5 - len(encode_varint(sid)) - len(encode_varint(fid))
                if len(payload) - start > budget:
                    del payload[self._fit(start, actions, budget) :]
                    cut.append(k)
            ends.append(len(payload))
        return self._encode_acks(ids, ends, bytes(payload), len(ends), max_frame_size), cut

    def _encode_acks(
        self,
        ids: bytes | array[int],
        ends: array[int] | None,
        payload: bytes | bytearray,
        n: int,
        max_frame_size: int,
    ) -> bytes:
        """n ACKs in one C call; without `ends`, one action each."""
        if len(payload) + _ACK_ROOM * n > self._out_size:
            self._grow_out(len(payload) + _ACK_ROOM * n)
        self._set_ids(ids, n)
        rc = _encode_acks(
            self._out, self._out_size, max_frame_size, self._ids,
            ffi.NULL if ends is None else ffi.from_buffer("uint32_t[]", ends),
            n, payload, len(payload),
        )  # fmt: skip
        if rc < 0:
            raise CodecError(-rc, "cannot encode ACKs")
        return self._out_view[:rc].tobytes()

    def _set_ids(self, ids: bytes | array[int], n: int) -> None:
        """Copy n (stream-id, frame-id) pairs, checked by acks_for(), into
        the reused C ids array (the copy also refuses a buffer that is not
        uint64: its format must match)."""
        pairs = ids if ids.__class__ is array else memoryview(ids).cast("B").cast("Q")
        if 2 * n > self._ids_cap:
            self._ids_cap = max(2 * n, 2 * self._ids_cap)
            self._ids = ffi.new("uint64_t[]", self._ids_cap)
            self._ids_view = memoryview(ffi.buffer(self._ids)).cast("Q")
        self._ids_view[: 2 * n] = pairs

    @staticmethod
    def _fit(start: int, actions: Sequence[Action], budget: int) -> int:
        """Where the payload must end to keep only the leading actions that fit."""
        end = start
        for a in actions:
            assert a.wire is not None
            if end - start + len(a.wire) > budget:
                break
            end += len(a.wire)
        return end

    def action_wire(self, action: Action) -> bytes:
        """Encode one action (once: the bytes are kept on the action)."""
        if self._wire_encoder is None:  # own records: acks() may be mid-batch
            self._wire_encoder = Encoder(max_frames=1, max_items=1, out_size=1024)
        ack = self._wire_encoder.ack_frame(0, 0, [action])
        wire = ack[11:]  # after length, type, flags and the 0/0 ids
        action.wire = wire
        return wire

    # The slow, general path, one frame per call: handshakes, DISCONNECTs,
    # the test kit, tests and the load generator. Each raises CodecError
    # when its items do not all fit in max_frame_size.

    def kv_frame(
        self,
        type_: int,
        sid: int,
        fid: int,
        kv: Sequence[KV] = (),
        *,
        flags: int = FLAG_FIN,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> bytes:
        """A frame of KV items: the HELLOs and DISCONNECTs (any type_, so that
        tests can send what a peer must refuse)."""
        items = _FrameItems()
        items.add_kv(kv)
        return self._encode_one(type_, sid, fid, flags, items, max_frame_size)

    def notify_frame(
        self,
        sid: int,
        fid: int,
        messages: Sequence[tuple[str, Sequence[tuple[str, Value | TypedEncoding]]]] = (),
        *,
        flags: int = FLAG_FIN,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> bytes:
        """A NOTIFY of (name, [(argument name, value), ...]) messages."""
        items = _FrameItems()
        items.add_messages(messages)
        return self._encode_one(FrameType.NOTIFY, sid, fid, flags, items, max_frame_size)

    def ack_frame(
        self,
        sid: int,
        fid: int,
        actions: Sequence[Action] = (),
        *,
        flags: int = FLAG_FIN,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> bytes:
        """One ACK, encoded from the actions' fields (not their cached wire:
        this is how action_wire() makes it, and what tests compare acks() with)."""
        items = _FrameItems()
        items.add_actions(actions)
        return self._encode_one(FrameType.ACK, sid, fid, flags, items, max_frame_size)

    def raw_frame(
        self,
        type_: int,
        sid: int,
        fid: int,
        payload: bytes,
        *,
        flags: int = FLAG_FIN,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> bytes:
        """A frame whose payload is given as bytes: fragments, unknown types."""
        items = _FrameItems()
        items.payload = payload
        return self._encode_one(type_, sid, fid, flags, items, max_frame_size)

    def _encode_one(
        self, type_: int, sid: int, fid: int, flags: int, items: _FrameItems, max_frame_size: int
    ) -> bytes:
        records = items.records
        payload_off, payload_len = items.ref(items.payload)
        self._grow(1, len(records), max_frame_size + 4)
        for j, rec in enumerate(records):
            ITEM_RECORD.pack_into(self._items_view, j * _item_size, *rec)
        FRAME_RECORD.pack_into(
            self._frames_view, 0, sid, fid, flags, 0, 0, payload_off, payload_len, 0,
            len(records), type_, 0,
        )  # fmt: skip
        data = self._run(1, len(records), items.strings, max_frame_size)
        if self._frames[0].n_items != len(records):
            raise CodecError(Status.TOO_BIG, "frame would exceed max-frame-size")
        return data

    def _run(self, n_frames: int, n_items: int, strings: bytearray, max_frame_size: int) -> bytes:
        """Encode the packed records; loops if the output buffer fills up."""
        blob = bytes(strings)
        frames = self._frames
        rc = lib.spop_encode_frames(
            self._out, self._out_size, max_frame_size, frames, n_frames,
            self._items, n_items, blob, len(blob),
        )  # fmt: skip
        if rc == n_frames:  # the usual case: everything fitted at once
            last = frames[rc - 1]
            data: bytes = ffi.buffer(self._out, last.offset + 4 + last.length)[:]
            return data
        chunks = []
        done = 0
        while True:
            if rc < 0:
                raise CodecError(-rc, "cannot encode frame records")
            if rc == 0:  # one frame larger than the buffer: make room and retry
                self._grow_out(max_frame_size + 4)
            else:
                last = frames[done + rc - 1]
                chunks.append(ffi.buffer(self._out, last.offset + 4 + last.length)[:])
                done += rc
            if done == n_frames:
                return b"".join(chunks)
            rc = lib.spop_encode_frames(
                self._out, self._out_size, max_frame_size, frames + done, n_frames - done,
                self._items, n_items, blob, len(blob),
            )  # fmt: skip

    def _grow_out(self, size: int) -> None:
        if size <= self._out_size:
            raise CodecError(Status.TOO_BIG, "frame does not fit the output buffer")
        self._new_out(max(size, 2 * self._out_size))

    def _new_out(self, size: int) -> None:
        self._out_size = size
        self._out = ffi.new("uint8_t[]", size)
        self._out_view = memoryview(ffi.buffer(self._out))


def encode_varint(value: int) -> bytes:
    """HAProxy varint of a value in [0, 2^64-1] (rare paths and tests)."""
    out = ffi.new("uint8_t[10]")
    n = lib.spop_varint_encode(value, out, 10)
    data: bytes = ffi.buffer(out, n)[:]
    return data


def decode_varint(data: bytes) -> tuple[int, int]:
    """(value, bytes used); used == 0 when `data` is a truncated varint.

    Raises CodecError for a varint longer than 10 bytes or above 2^64-1.
    """
    value = ffi.new("uint64_t *")
    n = lib.spop_varint_decode(data, len(data), value)
    if n < 0:
        raise CodecError(-n, "invalid varint")
    return (value[0], n) if n else (0, 0)

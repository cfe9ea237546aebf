"""A straightforward pure-Python SPOP 2.0 codec: the benchmark's baseline.

Written the way a Python SPOA library without C would do it (offsets into
`bytes`, `struct` for fixed-size fields, `ipaddress` objects for addresses),
correct for the whole wire format but without tricks. It is not used by
spoa-mp; bench_codec.py checks it against the shared test vectors before
timing it, so the comparison is against a codec that actually works.

Wire format: /work/shared/docs/spop.md (sections 1-5). Varints are HAProxy's
additive encoding, not LEB128 (section 2).
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any, NamedTuple

# frame types
UNSET = 0
HAPROXY_HELLO = 1
HAPROXY_DISCONNECT = 2
NOTIFY = 3
AGENT_HELLO = 101
AGENT_DISCONNECT = 102
ACK = 103

FLAG_FIN = 0x1
FLAG_ABORT = 0x2

# typed-data codes (low nibble of the type byte)
T_NULL = 0
T_BOOL = 1
T_INT32 = 2
T_UINT32 = 3
T_INT64 = 4
T_UINT64 = 5
T_IPV4 = 6
T_IPV6 = 7
T_STRING = 8
T_BINARY = 9

ACTION_SET_VAR = 1
ACTION_UNSET_VAR = 2
SCOPES = {"proc": 0, "sess": 1, "txn": 2, "req": 3, "res": 4}

# DISCONNECT status codes used here
STATUS_TOO_BIG = 3
STATUS_INVALID = 4

DEFAULT_FRAME_SIZE = 16380
U64 = (1 << 64) - 1

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BI")  # type, flags


class SpopError(ValueError):
    """Malformed input; `status` is the DISCONNECT code to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Typed(NamedTuple):
    """A value with an explicit SPOP type, for encoding (e.g. INT32 42)."""

    type: int
    value: Any


class ControlFrame(NamedTuple):
    """Any frame other than a complete NOTIFY.

    `content` is a list of (key, value) for HELLO / DISCONNECT, a list of
    actions for ACK ((1, scope, name, value) or (2, scope, name)), and the
    raw payload bytes for UNSET frames and NOTIFY fragments.
    """

    type: int
    flags: int
    sid: int
    fid: int
    content: Any


# ------------------------------------------------------------------ varints


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, new position); additive decoding, as HAProxy does it."""
    try:
        value = buf[pos]
        pos += 1
        if value < 240:
            return value, pos
        shift = 4
        while True:
            b = buf[pos]
            pos += 1
            value += b << shift
            if b < 128:
                break
            shift += 7
            if shift > 60:  # an 11th byte: more than HAProxy's 10
                raise SpopError(STATUS_INVALID, "varint too long")
    except IndexError:
        raise SpopError(STATUS_INVALID, "truncated varint") from None
    if value > U64:
        raise SpopError(STATUS_INVALID, "varint above 2^64-1")
    return value, pos


def encode_varint(value: int) -> bytes:
    if value < 240:
        return bytes((value,))
    out = bytearray((0xF0 | (value & 0x0F),))
    value = (value - 240) >> 4
    while value >= 128:
        out.append(0x80 | (value & 0x7F))
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


# ------------------------------------------------------------------ decoding


def _decode_string(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    length, pos = decode_varint(buf, pos)
    if length > end - pos:
        raise SpopError(STATUS_INVALID, "truncated string")
    return buf[pos : pos + length], pos + length


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_data(buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    """One typed value -> (Python value, new position)."""
    if pos >= end:
        raise SpopError(STATUS_INVALID, "truncated typed data")
    type_byte = buf[pos]
    pos += 1
    t = type_byte & 0x0F
    if t == T_IPV4:
        if pos + 4 > end:
            raise SpopError(STATUS_INVALID, "truncated IPv4")
        return IPv4Address(buf[pos : pos + 4]), pos + 4
    if t in (T_STRING, T_BINARY):
        return _decode_string(buf, pos, end)
    if t in (T_INT32, T_INT64):
        value, pos = decode_varint(buf, pos)
        return _signed(value), pos
    if t in (T_UINT32, T_UINT64):
        return decode_varint(buf, pos)
    if t == T_NULL:
        return None, pos
    if t == T_BOOL:
        return bool(type_byte & 0x10), pos
    if t == T_IPV6:
        if pos + 16 > end:
            raise SpopError(STATUS_INVALID, "truncated IPv6")
        return IPv6Address(buf[pos : pos + 16]), pos + 16
    raise SpopError(STATUS_INVALID, f"unknown data type {t}")


def _decode_messages(buf: bytes, pos: int, end: int) -> list[tuple[str, list[tuple[str, Any]]]]:
    messages = []
    while pos < end:
        name, pos = _decode_string(buf, pos, end)
        if pos >= end:
            raise SpopError(STATUS_INVALID, "truncated message")
        nargs = buf[pos]
        pos += 1
        args = []
        for _ in range(nargs):
            arg_name, pos = _decode_string(buf, pos, end)
            value, pos = decode_data(buf, pos, end)
            args.append((arg_name.decode("utf-8", "replace"), value))
        messages.append((name.decode("utf-8", "replace"), args))
    return messages


def _decode_kv(buf: bytes, pos: int, end: int) -> list[tuple[str, Any]]:
    items = []
    while pos < end:
        key, pos = _decode_string(buf, pos, end)
        value, pos = decode_data(buf, pos, end)
        items.append((key.decode("utf-8", "replace"), value))
    return items


def _decode_actions(buf: bytes, pos: int, end: int) -> list[tuple[Any, ...]]:
    actions: list[tuple[Any, ...]] = []
    while pos < end:
        if pos + 3 > end:
            raise SpopError(STATUS_INVALID, "truncated action")
        action, nargs, scope = buf[pos], buf[pos + 1], buf[pos + 2]
        pos += 3
        name, pos = _decode_string(buf, pos, end)
        if action == ACTION_SET_VAR and nargs == 3:
            value, pos = decode_data(buf, pos, end)
            actions.append((action, scope, name, value))
        elif action == ACTION_UNSET_VAR and nargs == 2:
            actions.append((action, scope, name))
        else:
            raise SpopError(STATUS_INVALID, f"bad action {action}/{nargs}")
    return actions


def decode_frames(buf: bytes, max_frame_size: int = DEFAULT_FRAME_SIZE) -> tuple[list[Any], int]:
    """Decode the complete frames at the start of `buf`.

    Returns (frames, bytes consumed); an incomplete last frame is left for
    the next read. A complete NOTIFY frame is (sid, fid, messages) with
    messages = [(name, [(arg_name, value), ...]), ...]; anything else is a
    ControlFrame. Raises SpopError on malformed input.
    """
    frames: list[Any] = []
    pos = 0
    size = len(buf)
    while size - pos >= 4:
        (length,) = _LENGTH.unpack_from(buf, pos)
        if length > max_frame_size:
            raise SpopError(STATUS_TOO_BIG, f"frame of {length} bytes")
        if length < 7:
            raise SpopError(STATUS_INVALID, f"frame of {length} bytes")
        end = pos + 4 + length
        if end > size:
            break
        type_, flags = _HEADER.unpack_from(buf, pos + 4)
        sid, p = decode_varint(buf, pos + 9)
        fid, p = decode_varint(buf, p)
        if p > end:
            raise SpopError(STATUS_INVALID, "frame header longer than the frame")
        if type_ == NOTIFY and flags & FLAG_FIN:
            frames.append((sid, fid, _decode_messages(buf, p, end)))
        elif type_ in (HAPROXY_HELLO, HAPROXY_DISCONNECT, AGENT_HELLO, AGENT_DISCONNECT):
            frames.append(ControlFrame(type_, flags, sid, fid, _decode_kv(buf, p, end)))
        elif type_ == ACK and flags & FLAG_FIN:
            frames.append(ControlFrame(type_, flags, sid, fid, _decode_actions(buf, p, end)))
        else:  # UNSET, fragments, unknown types: raw payload
            frames.append(ControlFrame(type_, flags, sid, fid, buf[p:end]))
        pos = end
    return frames, pos


# ------------------------------------------------------------------ encoding


def encode_data(value: Any) -> bytes:
    """Typed data for a Python value (or a Typed for an explicit type).

    Plain ints go as UINT32 when they fit (like HAProxy's example agent),
    otherwise INT64 (sign-extended) or UINT64; str is STRING, bytes BINARY.
    """
    if value is None:
        return b"\x00"
    if isinstance(value, bool):
        return b"\x11" if value else b"\x01"
    if isinstance(value, int):
        if 0 <= value <= 0xFFFFFFFF:
            return b"\x03" + encode_varint(value)
        if -(1 << 63) <= value < (1 << 63):
            return b"\x04" + encode_varint(value & U64)
        if 0 <= value <= U64:
            return b"\x05" + encode_varint(value)
        raise ValueError(f"integer does not fit in 64 bits: {value}")
    if isinstance(value, Typed):
        return _encode_typed(value.type, value.value)
    if isinstance(value, str):
        raw = value.encode()
        return b"\x08" + encode_varint(len(raw)) + raw
    if isinstance(value, bytes | bytearray):
        return b"\x09" + encode_varint(len(value)) + bytes(value)
    if isinstance(value, IPv4Address):
        return b"\x06" + value.packed
    if isinstance(value, IPv6Address):
        return b"\x07" + value.packed
    raise TypeError(f"no SPOP type for {type(value).__name__}")


def _encode_typed(t: int, value: Any) -> bytes:
    if t in (T_INT32, T_UINT32, T_INT64, T_UINT64):
        return bytes((t,)) + encode_varint(value & U64)
    if t == T_BOOL:
        return b"\x11" if value else b"\x01"
    if t in (T_STRING, T_BINARY):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return bytes((t,)) + encode_varint(len(raw)) + raw
    if t == T_IPV4:
        return b"\x06" + IPv4Address(value).packed
    if t == T_IPV6:
        return b"\x07" + IPv6Address(value).packed
    if t == T_NULL:
        return b"\x00"
    raise ValueError(f"unknown data type {t}")


def _encode_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return encode_varint(len(raw)) + raw


def _frame(type_: int, sid: int, fid: int, payload: bytes, flags: int = FLAG_FIN) -> bytes:
    body = _HEADER.pack(type_, flags) + encode_varint(sid) + encode_varint(fid) + payload
    return _LENGTH.pack(len(body)) + body


def encode_action(action: tuple[Any, ...]) -> bytes:
    """(scope, name, value) -> set-var; (scope, name) -> unset-var."""
    scope = action[0]
    if isinstance(scope, str):
        scope = SCOPES[scope]
    if len(action) == 2:
        return bytes((ACTION_UNSET_VAR, 2, scope)) + _encode_string(action[1])
    return bytes((ACTION_SET_VAR, 3, scope)) + _encode_string(action[1]) + encode_data(action[2])


def encode_ack(sid: int, fid: int, actions: list[tuple[Any, ...]]) -> bytes:
    """A whole ACK frame, length prefix included."""
    return _frame(ACK, sid, fid, b"".join([encode_action(a) for a in actions]))


def encode_notify(sid: int, fid: int, messages: list[tuple[str, list[tuple[str, Any]]]]) -> bytes:
    """A whole NOTIFY frame (what HAProxy sends; used by tests and benchmarks)."""
    parts = []
    for name, args in messages:
        parts.append(_encode_string(name))
        parts.append(bytes((len(args),)))
        for arg_name, value in args:
            parts.append(_encode_string(arg_name))
            parts.append(encode_data(value))
    return _frame(NOTIFY, sid, fid, b"".join(parts))


def encode_kv_frame(type_: int, items: list[tuple[str, Any]]) -> bytes:
    """HELLO / DISCONNECT frame from (key, value) pairs."""
    payload = b"".join([_encode_string(k) + encode_data(v) for k, v in items])
    return _frame(type_, 0, 0, payload)

"""SPOP values, actions and messages: the objects a handler sees and returns.

Pure Python, no codec or server imports, so handler code can be unit-tested
on its own. The codec builds `Message` objects over its decoded item records
(their layout, ITEM_RECORD, is here; spoa_mp.codec checks it against the C
struct) and encodes `Action` objects; both stay lazy where a handler may not
look.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Callable, Iterator
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias

U64 = (1 << 64) - 1


class DataType(IntEnum):
    """Typed-data codes (low nibble of the type byte)."""

    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class Scope(IntEnum):
    """Variable scopes of set-var / unset-var actions."""

    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class String(bytes):
    """A STRING value: raw bytes as HAProxy sent them (not guaranteed UTF-8).

    Plain `bytes` values are BINARY; wrap bytes in `String` to send them as
    STRING, or pass a `str` (encoded as UTF-8).
    """

    __slots__ = ()

    def text(self, errors: str = "replace") -> str:
        """The value decoded as UTF-8 (invalid bytes replaced by default)."""
        return self.decode("utf-8", errors)


class _SizedInt(int):
    """An int that is sent with an explicit SPOP integer type."""

    __slots__ = ()
    data_type: DataType
    lo: int
    hi: int

    def __new__(cls, value: int) -> _SizedInt:
        if not cls.lo <= value <= cls.hi:
            raise ValueError(f"{cls.__name__} out of range: {value}")
        return super().__new__(cls, value)


class Int32(_SizedInt):
    __slots__ = ()
    data_type, lo, hi = DataType.INT32, -(1 << 31), (1 << 31) - 1


class UInt32(_SizedInt):
    __slots__ = ()
    data_type, lo, hi = DataType.UINT32, 0, (1 << 32) - 1


class Int64(_SizedInt):
    __slots__ = ()
    data_type, lo, hi = DataType.INT64, -(1 << 63), (1 << 63) - 1


class UInt64(_SizedInt):
    __slots__ = ()
    data_type, lo, hi = DataType.UINT64, 0, U64


Value: TypeAlias = bool | int | IPv4Address | IPv6Address | bytes | str | None
"""What a typed value decodes to: None, bool, int, IPv4Address, IPv6Address,
String (STRING) or bytes (BINARY). Encoding also takes str (as STRING)."""

TypedEncoding: TypeAlias = tuple[int, int, bytes]
"""(DataType, integer payload, byte payload) as the encoder takes it."""


def encode_value(value: Value) -> TypedEncoding:
    """Pick the SPOP type for a Python value.

    Plain ints travel as UINT32 when they fit (what HAProxy's example agent
    sends), otherwise INT64, or UINT64 above 2^63-1; HAProxy stores every
    integer type as a signed 64-bit integer. Negative numbers are
    sign-extended to 64 bits, which is what HAProxy expects.
    """
    if type(value) is int and 0 <= value <= 0xFFFFFFFF:  # the usual case
        return (DataType.UINT32, value, b"")
    if value is None:
        return (DataType.NULL, 0, b"")
    if value is True or value is False:
        return (DataType.BOOL, int(value), b"")
    if isinstance(value, int):
        if isinstance(value, _SizedInt):
            return (value.data_type, value & U64, b"")
        if 0 <= value <= 0xFFFFFFFF:
            return (DataType.UINT32, value, b"")
        if -(1 << 63) <= value < (1 << 63):
            return (DataType.INT64, value & U64, b"")
        if 0 <= value <= U64:
            return (DataType.UINT64, value, b"")
        raise ValueError(f"integer does not fit in 64 bits: {value}")
    if isinstance(value, String):
        return (DataType.STRING, 0, bytes(value))
    if isinstance(value, str):
        return (DataType.STRING, 0, value.encode())
    if isinstance(value, bytes | bytearray | memoryview):
        return (DataType.BINARY, 0, bytes(value))
    if isinstance(value, IPv4Address):
        return (DataType.IPV4, int(value), value.packed)  # num as the decoder gives it
    if isinstance(value, IPv6Address):
        return (DataType.IPV6, 0, value.packed)
    raise TypeError(f"no SPOP type for {type(value).__name__}")


SCOPES = {s.name.lower(): s for s in Scope}
_SCOPE_OF: dict[object, Scope] = {key: s for s in Scope for key in (int(s), s.name.lower())}
_VAR_NAME = re.compile(r"[A-Za-z0-9._]+")
ACTION_SET_VAR = 1
ACTION_UNSET_VAR = 2


def _scope(scope: object) -> Scope:
    """The Scope a caller's value names (any value: it checks)."""
    found = None
    if scope.__class__ is not bool:  # True == 1 would pass as "sess"
        with contextlib.suppress(TypeError):  # unhashable: not a scope either
            found = _SCOPE_OF.get(scope)
    if found is None:
        raise ValueError(f"unknown scope {scope!r} (one of {', '.join(SCOPES)})")
    return found


_names: dict[str, bytes] = {}


def _var_name(name: str) -> bytes:
    """Validate a variable name once; HAProxy silently ignores bad ones."""
    encoded = _names.get(name)
    if encoded is None:
        if not isinstance(name, str) or not _VAR_NAME.fullmatch(name):
            raise ValueError(f"variable name must match [A-Za-z0-9._]+: {name!r}")
        encoded = _names[name] = name.encode()
    return encoded


class Action:
    """One set-var or unset-var action of an ACK; build with set_var/unset_var.

    Do not modify one after it is built: the codec caches its encoded bytes
    on it (`wire`), so an action built once (say, one per possible score)
    costs nothing to encode again.
    """

    __slots__ = ("action", "name", "num", "raw", "scope", "type", "wire")

    action: int
    scope: Scope
    name: bytes
    type: int
    num: int
    raw: bytes
    wire: bytes | None

    def __init__(
        self, action: int, scope: Scope, name: bytes, type_: int, num: int, raw: bytes
    ) -> None:
        # treated as immutable (equality and the cached `wire` rely on it)
        self.action = action
        self.scope = scope
        self.name = name
        self.type = type_
        self.num = num
        self.raw = raw
        self.wire = None

    def __repr__(self) -> str:
        scope = Scope(self.scope).name.lower()
        if self.action == ACTION_UNSET_VAR:
            return f"unset_var({scope!r}, {self.name.decode()!r})"
        return f"set_var({scope!r}, {self.name.decode()!r}, {self.value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Action):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, int, bytes, int, int, bytes]:
        return (self.action, self.scope, self.name, self.type, self.num, self.raw)

    @property
    def value(self) -> Value:
        """The value a set-var carries, as it would decode."""
        return typed_value(self.type, self.num, self.raw)


def set_var(scope: Scope | str, name: str, value: Value) -> Action:
    """Set HAProxy variable `<scope>.<var-prefix>.<name>` to `value`.

    HAProxy only sets variables it knows (used in its config or listed in
    `register-var-names`) unless the agent has `option force-set-var`.
    """
    type_, num, raw = encode_value(value)
    return Action(ACTION_SET_VAR, _scope(scope), _var_name(name), type_, num, raw)


def unset_var(scope: Scope | str, name: str) -> Action:
    """Unset HAProxy variable `<scope>.<var-prefix>.<name>`."""
    return Action(ACTION_UNSET_VAR, _scope(scope), _var_name(name), DataType.NULL, 0, b"")


def _signed(num: int) -> int:
    return num - (1 << 64) if num >> 63 else num


_new_ipv4 = IPv4Address.__new__


def _ipv4_from_int(num: int) -> IPv4Address:
    """IPv4Address from a trusted 32-bit int, skipping the range check the
    constructor repeats (a third of a decode's cost)."""
    addr = _new_ipv4(IPv4Address)
    addr._ip = num  # type: ignore[attr-defined]  # ipaddress's private int: not in typeshed
    return addr


_new_ipv6 = IPv6Address.__new__


def _ipv6_from_bytes(raw: bytes) -> IPv6Address:
    """IPv6Address from 16 trusted bytes; the constructor's checks cost ~2 us."""
    addr = _new_ipv6(IPv6Address)
    # ipaddress's private attributes, not in typeshed:
    addr._ip = int.from_bytes(raw, "big")  # type: ignore[attr-defined]  # (see above)
    addr._scope_id = None  # type: ignore[attr-defined]  # no zone on the wire
    return addr


# Both shortcuts set the private attribute ipaddress keeps; fall back to the
# constructors on a Python where that differs.
ipv4_from_int: Callable[[int], IPv4Address] = _ipv4_from_int
ipv6_from_bytes: Callable[[bytes], IPv6Address] = _ipv6_from_bytes
_IPV4_SHORTCUT = ipv4_from_int(0x7F000001) == IPv4Address("127.0.0.1")
if not _IPV4_SHORTCUT:  # pragma: no cover
    ipv4_from_int = IPv4Address
try:
    _probe = bytes(range(16))
    if str(ipv6_from_bytes(_probe)) != str(IPv6Address(_probe)):  # pragma: no cover
        raise AttributeError
except AttributeError:  # pragma: no cover
    ipv6_from_bytes = IPv6Address


def typed_value(type_: int, num: int, raw: bytes) -> Value:
    """Python value of a typed datum: `num` holds integers, booleans and IPv4
    (as an int); `raw` holds IPv6, STRING and BINARY bytes."""
    if type_ == DataType.IPV4:
        return ipv4_from_int(num)
    if type_ == DataType.STRING:
        return String(raw)
    if type_ in (DataType.INT64, DataType.INT32):
        return _signed(num)
    if type_ in (DataType.UINT32, DataType.UINT64):
        return num
    if type_ == DataType.BOOL:
        return bool(num)
    if type_ == DataType.IPV6:
        return ipv6_from_bytes(raw) if len(raw) == 16 else IPv6Address(raw)
    if type_ == DataType.BINARY:
        return bytes(raw)
    return None


# One decoded item record (spop_item in csrc/spop.h), as struct unpacks it:
# (num, name_off, name_len, val_off, val_len, kind, type, nargs, action, scope)
ItemRecord: TypeAlias = tuple[int, int, int, int, int, int, int, int, int, int]
ITEM_RECORD = struct.Struct("=QIIIIBBBBB3x")
# the fields of an ItemRecord, by name
I_NUM, I_NAME_OFF, I_NAME_LEN, I_VAL_OFF, I_VAL_LEN, I_KIND, I_TYPE, I_NARGS, I_ACTION, I_SCOPE = (
    range(10)
)
# type codes as plain ints: the hot path compares them to record fields
_T_IPV4 = int(DataType.IPV4)
_T_UNSIGNED = (int(DataType.UINT32), int(DataType.UINT64))
_ITEM_SIZE = ITEM_RECORD.size
_unpack_item = ITEM_RECORD.unpack_from
_unpack_num_type = struct.Struct("=Q17xB").unpack_from  # (num, type) of a record


class Message:
    """One SPOE message of a NOTIFY: a name and typed arguments.

    Arguments are read by position (`msg[0]`, what `args src` produces) or by
    name (`msg["ip"]`, from `args ip=src`). Values are decoded only when read,
    from the codec's item records (`records`: the bytes of the spop_item
    array, shared by the messages of one read). A NULL argument (sample not
    available in HAProxy) reads as None.
    """

    __slots__ = ("_first", "_records", "data", "name", "nargs")

    def __init__(self, name: str, data: bytes, records: bytes, first: int, nargs: int) -> None:
        self.name = name
        self.data = data  # the buffer the records point into
        self._records = records
        self._first = first  # index of the first argument record
        self.nargs = nargs

    def __len__(self) -> int:
        return self.nargs

    def __repr__(self) -> str:
        args = ", ".join(f"{n or i}={v!r}" for i, (n, v) in enumerate(self.items()))
        return f"Message({self.name!r}, {args})"

    def _args(self) -> Iterator[ItemRecord]:
        start = self._first * _ITEM_SIZE
        return ITEM_RECORD.iter_unpack(self._records[start : start + self.nargs * _ITEM_SIZE])

    def _find(self, key: int | str) -> ItemRecord:
        if isinstance(key, int):
            if not -self.nargs <= key < self.nargs:
                raise IndexError(key)
            return _unpack_item(self._records, (self._first + key % self.nargs) * _ITEM_SIZE)
        wanted = key.encode()
        data = self.data
        for rec in self._args():
            if data[rec[I_NAME_OFF] : rec[I_NAME_OFF] + rec[I_NAME_LEN]] == wanted:
                return rec
        raise KeyError(key)

    def _value(self, rec: ItemRecord) -> Value:
        raw = self.data[rec[I_VAL_OFF] : rec[I_VAL_OFF] + rec[I_VAL_LEN]]
        return typed_value(rec[I_TYPE], rec[I_NUM], raw)

    def __getitem__(self, key: int | str) -> Value:
        """Argument value by position or by name (IndexError / KeyError)."""
        if key.__class__ is int and 0 <= key < self.nargs:
            # the common case: one small unpack, and IPv4 needs nothing else
            num: int
            type_: int
            num, type_ = _unpack_num_type(self._records, (self._first + key) * _ITEM_SIZE)
            if type_ == _T_IPV4 and _IPV4_SHORTCUT:  # ipv4_from_int, inlined
                addr = _new_ipv4(IPv4Address)
                addr._ip = num  # type: ignore[attr-defined]  # private, as in _ipv4_from_int
                return addr
            if type_ in _T_UNSIGNED:
                return num
        return self._value(self._find(key))

    def get(self, key: int | str, default: Value = None) -> Value:
        try:
            return self[key]
        except (KeyError, IndexError):
            return default

    def type_of(self, key: int | str) -> DataType:
        """The SPOP type an argument was sent with."""
        return DataType(self._find(key)[I_TYPE])

    def names(self) -> list[str]:
        """Argument names in order ("" for unnamed arguments)."""
        data = self.data
        return [
            data[r[I_NAME_OFF] : r[I_NAME_OFF] + r[I_NAME_LEN]].decode("utf-8", "replace")
            for r in self._args()
        ]

    def items(self) -> Iterator[tuple[str, Value]]:
        """(name, value) pairs in order."""
        return zip(self.names(), map(self._value, self._args()), strict=True)

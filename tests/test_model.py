"""spoa_mp.model: typed values, actions and the Message API."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from conftest import tagged
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa_mp.codec import Decoder, Encoder, messages
from spoa_mp.model import (
    DataType,
    Int32,
    Int64,
    Message,
    Scope,
    String,
    UInt32,
    UInt64,
    encode_value,
    set_var,
    typed_value,
    unset_var,
)

U64 = 2**64 - 1


# ------------------------------------------------------------------ encode_value


ENCODE_CASES: list[tuple[Any, tuple[int, int, bytes]]] = [
    (0, (DataType.UINT32, 0, b"")),
    (42, (DataType.UINT32, 42, b"")),
    (2**32 - 1, (DataType.UINT32, 2**32 - 1, b"")),
    (2**32, (DataType.INT64, 2**32, b"")),
    (2**63 - 1, (DataType.INT64, 2**63 - 1, b"")),
    (2**63, (DataType.UINT64, 2**63, b"")),
    (U64, (DataType.UINT64, U64, b"")),
    (-1, (DataType.INT64, U64, b"")),
    (-(2**63), (DataType.INT64, 2**63, b"")),
    (True, (DataType.BOOL, 1, b"")),
    (False, (DataType.BOOL, 0, b"")),
    (None, (DataType.NULL, 0, b"")),
    ("hé", (DataType.STRING, 0, "hé".encode())),
    ("", (DataType.STRING, 0, b"")),
    (String(b"\xff"), (DataType.STRING, 0, b"\xff")),
    (b"\x00\xff", (DataType.BINARY, 0, b"\x00\xff")),
    (bytearray(b"ab"), (DataType.BINARY, 0, b"ab")),
    (memoryview(b"cd"), (DataType.BINARY, 0, b"cd")),
    (b"", (DataType.BINARY, 0, b"")),
    (IPv4Address("10.0.0.1"), (DataType.IPV4, 0x0A000001, bytes([10, 0, 0, 1]))),
    (IPv6Address("2001:db8::1"), (DataType.IPV6, 0, IPv6Address("2001:db8::1").packed)),
    (Int32(-1), (DataType.INT32, U64, b"")),
    (Int32(5), (DataType.INT32, 5, b"")),
    (UInt32(42), (DataType.UINT32, 42, b"")),
    (Int64(-2), (DataType.INT64, U64 - 1, b"")),
    (Int64(7), (DataType.INT64, 7, b"")),
    (UInt64(3), (DataType.UINT64, 3, b"")),
    (UInt64(U64), (DataType.UINT64, U64, b"")),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    ENCODE_CASES,
    ids=[f"{i}-{type(v).__name__}" for i, (v, _) in enumerate(ENCODE_CASES)],
)
def test_encode_value_type_choice(value: Any, expected: tuple[int, int, bytes]) -> None:
    got = encode_value(value)
    assert got == expected
    assert type(got[2]) is bytes
    assert int(got[0]) == int(expected[0])


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, -(2**100)])
def test_encode_value_rejects_ints_beyond_64_bits(value: int) -> None:
    with pytest.raises(ValueError, match="64 bits"):
        encode_value(value)


@pytest.mark.parametrize("value", [1.5, [1], {"a": 1}, object(), (1, 2), 1j])
def test_encode_value_rejects_other_types(value: Any) -> None:
    with pytest.raises(TypeError):
        encode_value(value)


@pytest.mark.parametrize(
    ("cls", "lo", "hi"),
    [
        (Int32, -(2**31), 2**31 - 1),
        (UInt32, 0, 2**32 - 1),
        (Int64, -(2**63), 2**63 - 1),
        (UInt64, 0, U64),
    ],
)
def test_sized_int_ranges(cls: type, lo: int, hi: int) -> None:
    assert cls(lo) == lo
    assert cls(hi) == hi
    assert isinstance(cls(hi), int)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match="out of range"):
            cls(bad)


# ------------------------------------------------------------------ typed_value


@pytest.mark.parametrize(
    ("type_", "num", "raw", "expected"),
    [
        (0, 0, b"", None),
        (1, 1, b"", True),
        (1, 0, b"", False),
        (2, U64, b"", -1),  # INT32 sent sign-extended
        (2, 2**32 - 1, b"", 2**32 - 1),  # INT32 sent as a 32-bit pattern: what HAProxy reads
        (3, 2**32 - 1, b"", 2**32 - 1),
        (4, 2**63, b"", -(2**63)),
        (4, U64, b"", -1),
        (5, U64, b"", U64),
        (6, 0x7F000001, b"\x7f\x00\x00\x01", IPv4Address("127.0.0.1")),
        (7, 0, bytes(15) + b"\x01", IPv6Address("::1")),
        (8, 0, b"h\xc3\xa9", String(b"h\xc3\xa9")),
        (9, 0, b"\x00\xff", b"\x00\xff"),
    ],
)
def test_typed_value(type_: int, num: int, raw: bytes, expected: Any) -> None:
    assert tagged(typed_value(type_, num, raw)) == tagged(expected)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), U64),
        st.binary(max_size=20),
        st.binary(max_size=20).map(String),
        st.integers(0, 2**32 - 1).map(IPv4Address),
        st.integers(0, 2**128 - 1).map(IPv6Address),
    )
)
def test_encode_then_typed_value(value: Any) -> None:
    t, num, raw = encode_value(value)
    if t == DataType.IPV4:
        num = int.from_bytes(raw, "big")  # the decoder gives IPv4 as an int too
    assert tagged(typed_value(t, num, raw)) == tagged(value)


def test_string_text() -> None:
    assert String(b"h\xc3\xa9").text() == "hé"
    assert String(b"a\xffb").text() == "a\ufffdb"
    assert String(b"a\xffb").text("ignore") == "ab"
    with pytest.raises(UnicodeDecodeError):
        String(b"\xff").text("strict")
    assert String(b"").text() == ""
    assert isinstance(String(b"x"), bytes)


# ------------------------------------------------------------------ actions


def test_set_var_fields() -> None:
    a = set_var("sess", "ip_score", 42)
    assert (a.action, a.scope, a.name, a.type, a.num, a.raw) == (
        1,
        Scope.SESS,
        b"ip_score",
        3,
        42,
        b"",
    )
    assert a.value == 42
    assert a.wire is None
    u = unset_var(Scope.TXN, "foo")
    assert (u.action, u.scope, u.name, u.type, u.num, u.raw) == (2, Scope.TXN, b"foo", 0, 0, b"")
    assert u.value is None


@pytest.mark.parametrize(
    "scope",
    ["proc", "sess", "txn", "req", "res", 0, 1, 2, 3, 4, *Scope],
    ids=lambda s: repr(s) if isinstance(s, Scope) else None,
)
def test_scope_spellings(scope: Any) -> None:
    expected = Scope[scope.upper()] if isinstance(scope, str) else Scope(scope)
    assert set_var(scope, "x", 1).scope is expected
    assert unset_var(scope, "x").scope is expected


@pytest.mark.parametrize("scope", ["SESS", "session", "", 5, -1, None, 1.0 + 0.5, [1], "txn."])
def test_bad_scope(scope: Any) -> None:
    with pytest.raises(ValueError, match="scope"):
        set_var(scope, "x", 1)
    with pytest.raises(ValueError, match="scope"):
        unset_var(scope, "x")


@pytest.mark.parametrize("name", ["", "a b", "é", "a-b", "a/b", "x\n", "txn.a:b", b"foo", 7, None])
def test_bad_variable_name(name: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        set_var("txn", name, 1)
    with pytest.raises((ValueError, TypeError)):
        unset_var("txn", name)


@pytest.mark.parametrize("name", ["a", "ip_score", "A.b_9", "..", "_"])
def test_good_variable_names(name: str) -> None:
    assert set_var("txn", name, 1).name == name.encode()


def test_set_var_bad_values() -> None:
    with pytest.raises(ValueError, match="out of range"):
        set_var("txn", "x", Int32(2**31))
    with pytest.raises(ValueError, match="out of range"):
        set_var("txn", "x", UInt32(-1))
    with pytest.raises(ValueError, match="out of range"):
        set_var("txn", "x", UInt64(2**64))
    with pytest.raises(ValueError, match="64 bits"):
        set_var("txn", "x", 2**64)
    with pytest.raises(TypeError):
        set_var("txn", "x", 1.5)
    with pytest.raises(TypeError):
        set_var("txn", "x", [1, 2])


def test_action_equality_and_hash() -> None:
    a = set_var("sess", "ip_score", 42)
    b = set_var(1, "ip_score", UInt32(42))
    c = set_var("sess", "ip_score", Int32(42))
    d = set_var("sess", "ip_score", 43)
    e = set_var("txn", "ip_score", 42)
    assert a == b
    assert hash(a) == hash(b)
    assert a != c  # same number, another type
    assert a != d
    assert a != e
    assert unset_var("txn", "x") == unset_var(2, "x")
    assert unset_var("txn", "x") != set_var("txn", "x", None)  # set-var NULL is not unset
    assert len({a, b, c, d, e}) == 4
    assert (a == "x") is False
    assert a != 42
    # the cached wire bytes do not take part
    Encoder().action_wire(a)
    assert a.wire is not None
    assert b.wire is None
    assert a == b


def test_action_repr() -> None:
    assert repr(set_var("sess", "ip_score", 42)) == "set_var('sess', 'ip_score', 42)"
    assert repr(set_var("txn", "n", -1)) == "set_var('txn', 'n', -1)"
    assert repr(set_var("req", "s", "x")) == "set_var('req', 's', b'x')"
    assert repr(set_var("req", "s", b"\x00")) == "set_var('req', 's', b'\\x00')"
    assert repr(unset_var("res", "foo")) == "unset_var('res', 'foo')"
    assert repr(set_var(0, "b", True)) == "set_var('proc', 'b', True)"


def test_action_value_ipv4() -> None:
    a = set_var("txn", "ip", IPv4Address("10.0.0.1"))
    assert a.value == IPv4Address("10.0.0.1")
    assert repr(a) == "set_var('txn', 'ip', IPv4Address('10.0.0.1'))"


def test_action_value_other_types() -> None:
    for value in (None, True, -1, 2**64 - 1, IPv6Address("::1"), b"\x00", String(b"s")):
        assert tagged(set_var("txn", "v", value).value) == tagged(value)
    assert tagged(set_var("txn", "v", "é").value) == tagged(String("é".encode()))
    assert set_var("txn", "v", Int32(-7)).value == -7


def test_action_wire_is_cached_and_correct() -> None:
    enc = Encoder()
    a = set_var("sess", "ip_score", 42)
    wire = enc.action_wire(a)
    assert wire == bytes.fromhex("010301" + "08" + b"ip_score".hex() + "032a")
    assert a.wire is wire
    assert enc.action_wire(unset_var("txn", "foo")) == bytes.fromhex("02020203666f6f")


# ------------------------------------------------------------------ Message


def _message(args: list[tuple[str, Any]], name: str = "msg") -> Message:
    data = Encoder().notify_frame(1, 1, messages=[("other", [("z", 0)]), (name, args)])
    frames, items, _, error = Decoder().decode(data, 16380)
    assert error == 0
    return messages(data, frames[0], items)[1]


ARGS: list[tuple[str, Any]] = [
    ("", IPv4Address("192.0.2.1")),
    ("ip", IPv6Address("2001:db8::1")),
    ("n", None),
    ("s", String(b"a\xffb")),
    ("b", b"\x00"),
    ("i", -5),
    ("t", True),
    ("ip", 7),  # duplicate name: the first one wins
]


def test_message_positional_access() -> None:
    m = _message(ARGS)
    assert m.name == "msg"
    assert len(m) == m.nargs == 8
    for i, (_, v) in enumerate(ARGS):
        assert tagged(m[i]) == tagged(v)
    assert tagged(m[-1]) == tagged(7)
    assert tagged(m[-8]) == tagged(IPv4Address("192.0.2.1"))
    assert tagged(m[-3]) == tagged(-5)


def test_message_named_access() -> None:
    m = _message(ARGS)
    assert m["ip"] == IPv6Address("2001:db8::1")
    assert m[""] == IPv4Address("192.0.2.1")
    assert m["n"] is None
    assert tagged(m["s"]) == tagged(String(b"a\xffb"))
    assert m["s"].text() == "a\ufffdb"  # type: ignore[union-attr]
    assert tagged(m["b"]) == tagged(b"\x00")
    assert m["t"] is True


@pytest.mark.parametrize("index", [8, 9, -9, 100, -100])
def test_message_index_error(index: int) -> None:
    m = _message(ARGS)
    with pytest.raises(IndexError):
        m[index]
    assert m.get(index) is None
    assert m.get(index, "d") == "d"
    with pytest.raises(IndexError):
        m.type_of(index)


def test_message_key_error() -> None:
    m = _message(ARGS)
    with pytest.raises(KeyError):
        m["missing"]
    with pytest.raises(KeyError):
        m["IP"]
    with pytest.raises(KeyError):
        m.type_of("missing")
    assert m.get("missing") is None
    assert m.get("missing", 3) == 3
    assert m.get("n", 3) is None  # a NULL argument is there: its value is None
    assert m.get("i") == -5
    assert m.get(0) == IPv4Address("192.0.2.1")


def test_message_type_of() -> None:
    m = _message(ARGS)
    types = [m.type_of(i) for i in range(len(ARGS))]
    assert types == [
        DataType.IPV4,
        DataType.IPV6,
        DataType.NULL,
        DataType.STRING,
        DataType.BINARY,
        DataType.INT64,
        DataType.BOOL,
        DataType.UINT32,
    ]
    assert all(type(t) is DataType for t in types)
    assert m.type_of("ip") is DataType.IPV6
    assert m.type_of(-1) is DataType.UINT32


def test_message_names_and_items() -> None:
    m = _message(ARGS)
    assert m.names() == ["", "ip", "n", "s", "b", "i", "t", "ip"]
    assert tagged(list(m.items())) == tagged([list(a) for a in ARGS])


def test_message_without_args() -> None:
    m = _message([], name="")
    assert (m.name, len(m), m.names(), list(m.items())) == ("", 0, [], [])
    with pytest.raises(IndexError):
        m[0]
    assert m.get(0, "x") == "x"
    assert "Message(''" in repr(m)


def test_message_non_utf8_names() -> None:
    body = bytes.fromhex("03000000010101" + "02ff41" + "01" + "01fe" + "0801ff")
    data = len(body).to_bytes(4, "big") + body
    frames, items, _, error = Decoder().decode(data, 16380)
    assert error == 0
    (m,) = messages(data, frames[0], items)
    assert m.name == "\ufffdA"
    assert m.names() == ["\ufffd"]
    assert tagged(m[0]) == tagged(String(b"\xff"))
    with pytest.raises(KeyError):
        m["\ufffd"]  # lookup compares the raw bytes


def test_message_repr() -> None:
    m = _message([("", 1), ("x", None)])
    assert repr(m) == "Message('msg', 0=1, x=None)"

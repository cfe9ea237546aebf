"""Codec properties: round trips, incomplete input, robustness, error codes, encoder limits."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from itertools import accumulate
from typing import Any

import pytest
from conftest import (
    VECTORS,
    decode_meanings,
    encode_meaning,
    tagged,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa_mp import codec
from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_FLAGS,
    F_LENGTH,
    F_NITEMS,
    F_OFFSET,
    F_PARSED,
    F_PLEN,
    F_POFF,
    F_SID,
    F_TYPE,
    CodecError,
    Decoder,
    Encoder,
    FrameType,
    ItemKind,
    Status,
    decode_varint,
    encode_varint,
    item_name,
    item_value,
    kv_items,
    messages,
    status_reason,
)
from spoa_mp.model import DataType, String, UInt32, set_var, unset_var

U64 = 2**64 - 1
MAX = 16380
BIG = 1 << 18  # max-frame-size for generated frames (they can hold 255 large args)
DEC = Decoder(max_frame_size=BIG)
VECTOR_FRAMES = [bytes.fromhex(f["hex"]) for f in VECTORS["frames"]]
CONCAT = b"".join(VECTOR_FRAMES)
CONCAT_STARTS = [0, *accumulate(len(f) for f in VECTOR_FRAMES)][:-1]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def body(type_: int, payload: bytes, flags: int = 1, ids: bytes = b"\x00\x00") -> bytes:
    """A frame with a hand-written header and payload, length prefix included."""
    b = bytes([type_]) + flags.to_bytes(4, "big") + ids + payload
    return len(b).to_bytes(4, "big") + b


def decode(data: bytes, max_frame_size: int = MAX) -> codec.Decoded:
    return Decoder(max_frame_size=max(max_frame_size, 256)).decode(data, max_frame_size)


# ------------------------------------------------------------------ strategies

small_bytes = st.binary(max_size=40)
typed_values = st.one_of(
    st.just((0, None)),
    st.booleans().map(lambda b: (1, b)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: (2, v)),
    st.integers(0, 2**32 - 1).map(lambda v: (3, v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: (4, v)),
    st.integers(0, U64).map(lambda v: (5, v)),
    st.integers(0, 2**32 - 1).map(lambda v: (6, IPv4Address(v))),
    st.integers(0, 2**128 - 1).map(lambda v: (7, IPv6Address(v))),
    st.binary(max_size=300).map(lambda b: (8, String(b))),
    st.binary(max_size=300).map(lambda b: (9, b)),
)
# boundary integers, drawn often on purpose
edge_ints = st.sampled_from(
    [
        (2, -1),
        (2, -(2**31)),
        (2, 2**31 - 1),
        (3, 2**32 - 1),
        (4, -1),
        (4, -(2**63)),
        (4, 2**63 - 1),
        (5, U64),
        (5, 2**63),
        (5, 240),
        (3, 239),
        (8, String(b"")),
        (9, b""),
        (8, String(b"\xff\xfe\x00")),
        (7, IPv6Address("::")),
    ]
)
values = st.one_of(typed_values, edge_ints)
names = st.text(max_size=12)
ids = st.integers(0, U64)
# reserved flag bits are carried as is; FIN set, ABORT clear: the payload is walked
fin_flags = st.integers(0, 2**32 - 1).map(lambda f: (f & ~3) | 1)
fin_or_plain = st.one_of(st.just(1), fin_flags)


def meaning(type_: int, sid: int, fid: int, flags: int, **payload: Any) -> dict[str, Any]:
    return {"type": type_, "flags": flags, "sid": sid, "fid": fid, **payload}


def flat(pairs: list[tuple[str, tuple[int, Any]]]) -> list[list[Any]]:
    return [[n, t, v] for n, (t, v) in pairs]


kv_frames = st.builds(
    lambda type_, sid, fid, flags, kv: meaning(type_, sid, fid, flags, kv=flat(kv)),
    st.sampled_from([1, 2, 101, 102]),
    ids,
    ids,
    fin_or_plain,
    st.lists(st.tuples(names, values), max_size=12),
)
message = st.tuples(names, st.lists(st.tuples(names, values), max_size=8))
# 200..255 arguments: the whole range of the NB-ARGS byte (unsigned), small values
few_values = st.one_of(
    edge_ints,
    st.sampled_from([(0, None), (1, True), (3, 7), (6, IPv4Address("127.0.0.1"))]),
    st.binary(max_size=3).map(lambda b: (8, String(b))),
)
many_args_message = st.tuples(
    st.text(max_size=3),
    st.lists(st.tuples(st.sampled_from(["", "a", "ip"]), few_values), min_size=200, max_size=255),
)


def _notify(messages: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(
        lambda sid, fid, flags, msgs: meaning(
            3, sid, fid, flags, messages=[[n, flat(args)] for n, args in msgs]
        ),
        ids,
        ids,
        fin_or_plain,
        messages,
    )


notify_frames = _notify(st.lists(message, max_size=5))
notify_many_args = _notify(
    st.tuples(many_args_message, st.lists(message, max_size=1)).map(lambda t: [t[0], *t[1]])
)
set_var_actions = st.builds(
    lambda scope, name, tv: ["set-var", scope, name, *tv],
    st.integers(0, 4),
    names,
    values,
)
unset_var_actions = st.builds(
    lambda scope, name: ["unset-var", scope, name], st.integers(0, 4), names
)
ack_frames = st.builds(
    lambda sid, fid, flags, actions: meaning(103, sid, fid, flags, actions=actions),
    ids,
    ids,
    fin_or_plain,
    st.lists(set_var_actions | unset_var_actions, max_size=10),
)


def _raw_flags(type_: int, flags: int) -> int:
    # known types only stay raw when the frame is a fragment (FIN clear, or ABORT)
    if type_ in (1, 2, 3, 101, 102, 103) and flags & 3 == 1:
        return flags & ~1
    return flags


raw_frames = st.builds(
    lambda type_, sid, fid, flags, raw: meaning(type_, sid, fid, _raw_flags(type_, flags), raw=raw),
    st.integers(0, 255),
    ids,
    ids,
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
)
any_frames = st.one_of(kv_frames, notify_frames, ack_frames, raw_frames)


# ------------------------------------------------------------------ round trips


def _round_trip(m: dict[str, Any]) -> None:
    data = encode_meaning(m)
    frames, consumed, error = decode_meanings(data, BIG)
    assert (consumed, error) == (len(data), 0)
    assert tagged(frames) == tagged([m])
    # decode -> encode gives the same bytes back
    assert encode_meaning(frames[0]) == data
    assert int.from_bytes(data[:4], "big") == len(data) - 4


@FAST
@given(kv_frames)
def test_kv_frame_round_trip(m: dict[str, Any]) -> None:
    _round_trip(m)


@FAST
@given(notify_frames)
def test_notify_round_trip(m: dict[str, Any]) -> None:
    _round_trip(m)


@settings(FAST, max_examples=40)
@given(notify_many_args)
def test_notify_with_up_to_255_args_round_trip(m: dict[str, Any]) -> None:
    assert len(m["messages"][0][1]) >= 200
    _round_trip(m)


@FAST
@given(ack_frames)
def test_ack_round_trip(m: dict[str, Any]) -> None:
    _round_trip(m)


@FAST
@given(raw_frames)
def test_raw_frame_round_trip(m: dict[str, Any]) -> None:
    _round_trip(m)


@FAST
@given(st.lists(any_frames, min_size=2, max_size=6))
def test_concatenated_frames_decode_in_one_call(ms: list[dict[str, Any]]) -> None:
    data = b"".join(encode_meaning(m) for m in ms)
    frames, consumed, error = decode_meanings(data, BIG)
    assert (consumed, error) == (len(data), 0)
    assert tagged(frames) == tagged(ms)


@FAST
@given(st.lists(any_frames, min_size=1, max_size=3), st.data())
def test_random_prefix_of_frames_is_incomplete(ms: list[dict[str, Any]], data: Any) -> None:
    parts = [encode_meaning(m) for m in ms]
    buf = b"".join(parts)
    n = data.draw(st.integers(0, len(buf) - 1))
    ends = [e for e in accumulate(len(p) for p in parts) if e <= n]
    frames, consumed, error = decode_meanings(buf[:n], BIG)
    assert error == 0
    assert consumed == (ends[-1] if ends else 0)
    assert tagged(frames) == tagged(ms[: len(ends)])


@given(st.integers(0, U64))
@FAST
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert 1 <= len(raw) <= 10
    assert decode_varint(raw) == (value, len(raw))
    for n in range(len(raw)):
        assert decode_varint(raw[:n])[1] == 0


def test_varint_size_classes() -> None:
    # spop.md §2.3: first value needing n bytes
    lo = [0, 240]
    while len(lo) < 10:
        lo.append(lo[-1] + 2 ** (4 + 7 * (len(lo) - 1)))
    for n, first in enumerate(lo, start=1):
        assert len(encode_varint(first)) == n
        if first:
            assert len(encode_varint(first - 1)) == n - 1
    assert len(encode_varint(U64)) == 10


def test_messages_and_items_api() -> None:
    data = Encoder().notify_frame(
        5, 6, messages=[("a", [("x", 1), ("", None)]), ("", []), ("b", [("y", "s")])]
    )
    frames, items, _, error = Decoder().decode(data, MAX)
    assert error == 0
    msgs = messages(data, frames[0], items)
    assert [(m.name, m.nargs) for m in msgs] == [("a", 2), ("", 0), ("b", 1)]
    assert [it[5] for it in items] == [
        ItemKind.MESSAGE,
        ItemKind.ARG,
        ItemKind.ARG,
        ItemKind.MESSAGE,
        ItemKind.MESSAGE,
        ItemKind.ARG,
    ]
    assert frames[0][F_NITEMS] == 6


def test_kv_items_last_one_wins() -> None:
    data = Encoder().kv_frame(2, 0, 0, kv=[("k", 1), ("m", "x"), ("k", 2)])
    frames, items, _, _ = Decoder().decode(data, MAX)
    kv = kv_items(data, frames[0], items)
    assert list(kv) == ["k", "m"]
    assert item_value(data, kv["k"]) == 2
    assert item_value(data, kv["m"]) == String(b"x")
    assert item_name(data, kv["m"]) == b"m"


def test_bool_and_type_byte_flags() -> None:
    # BOOL true is 0x11; the high nibble of other types is ignored on receive
    data = body(1, b"\x01a\x11\x01b\x01\x01c\x33\x05")
    (m,), _, error = decode_meanings(data)
    assert error == 0
    assert tagged(m["kv"]) == tagged([["a", 1, True], ["b", 1, False], ["c", 3, 5]])


def test_decoded_ipv4_record_carries_host_order_int() -> None:
    data = Encoder().notify_frame(1, 1, messages=[("m", [("", IPv4Address("10.1.2.3"))])])
    _, items, _, _ = Decoder().decode(data, MAX)
    arg = items[1]
    assert arg[6] == DataType.IPV4
    assert arg[0] == 0x0A010203
    assert data[arg[3] : arg[3] + arg[4]] == bytes([10, 1, 2, 3])


# ------------------------------------------------------------------ robustness


def check_invariants(data: bytes, max_frame_size: int) -> codec.Decoded:
    dec = Decoder(max_frame_size=max(max_frame_size, 256))
    d = dec.decode(data, max_frame_size)
    frames, items, consumed, error = d
    assert error in (0, Status.TOO_BIG, Status.INVALID, Status.RESOURCE)
    assert 0 <= consumed <= len(data)
    pos = next_item = 0
    for f in frames:
        assert f[F_OFFSET] == pos
        assert 7 <= f[F_LENGTH] <= max_frame_size
        end = pos + 4 + f[F_LENGTH]
        assert end <= len(data)
        assert int.from_bytes(data[pos : pos + 4], "big") == f[F_LENGTH]
        assert pos + 4 + 7 <= f[F_POFF] <= end
        assert f[F_POFF] + f[F_PLEN] == end
        assert f[F_FIRST] == next_item
        assert f[F_TYPE] == data[pos + 4]
        assert f[F_FLAGS] == int.from_bytes(data[pos + 5 : pos + 9], "big")
        if not f[F_PARSED]:
            assert f[F_NITEMS] == 0
        for it in items[f[F_FIRST] : f[F_FIRST] + f[F_NITEMS]]:
            assert f[F_POFF] <= it[1]
            assert it[1] + it[2] <= end
            assert it[4] == 0 or (f[F_POFF] <= it[3] and it[3] + it[4] <= end)
            assert 0 <= it[6] <= 9
            if it[5] != ItemKind.MESSAGE and not (it[5] == ItemKind.ACTION and it[8] == 2):
                item_value(data, it)  # every value converts
        if f[F_PARSED] and f[F_TYPE] == FrameType.NOTIFY:
            for m in messages(data, f, items):
                assert len(list(m.items())) == m.nargs
        if f[F_PARSED] and f[F_TYPE] in (1, 2, 101, 102):
            kv_items(data, f, items)
        next_item += f[F_NITEMS]
        pos = end
    assert len(items) == next_item
    assert consumed == pos
    rest = data[consumed:]
    if error:
        # the malformed frame starts right at `consumed`
        again = dec.decode(rest, max_frame_size)
        assert (again.frames, again.error) == ([], error)
        assert len(rest) >= 4
        flen = int.from_bytes(rest[:4], "big")
        if error == Status.TOO_BIG:
            assert flen > max_frame_size
        elif flen > max_frame_size:
            pytest.fail("LENGTH above max reported as something else than 3")
    elif rest and len(frames) < dec.max_frames:
        flen = int.from_bytes(rest[:4], "big") if len(rest) >= 4 else None
        if flen is not None and 4 + flen <= len(rest):
            # a complete frame left over only when the item records ran out
            assert dec.decode(rest, max_frame_size).frames
    return d


sizes = st.sampled_from([7, 11, 256, 1000, MAX])


@FUZZ
@given(st.binary(max_size=600), sizes)
def test_random_bytes_never_crash(data: bytes, max_frame_size: int) -> None:
    check_invariants(data, max_frame_size)


@FUZZ
@given(st.integers(0, 300), st.binary(max_size=300), sizes)
def test_random_bodies_with_plausible_length(n: int, rest: bytes, max_frame_size: int) -> None:
    data = n.to_bytes(4, "big") + rest
    check_invariants(data, max_frame_size)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    use_concat = draw(st.booleans())
    buf = bytearray(CONCAT if use_concat else draw(st.sampled_from(VECTOR_FRAMES)))
    starts = CONCAT_STARTS if use_concat else [0]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "length"]))
        if op == "length":
            at = draw(st.sampled_from(starts))
            value = draw(
                st.one_of(
                    st.integers(0, 6),
                    st.integers(7, 200),
                    st.integers(MAX + 1, 2**32 - 1),
                    st.just(2**32 - 1),
                )
            )
            if at + 4 <= len(buf):
                buf[at : at + 4] = value.to_bytes(4, "big")
            continue
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del buf[i : i + draw(st.integers(1, 4))]
    return bytes(buf)


@FUZZ
@given(mutated_frames(), sizes)
def test_mutated_frames_never_crash(data: bytes, max_frame_size: int) -> None:
    check_invariants(data, max_frame_size)


def test_invariants_on_every_vector_truncation() -> None:
    for n in range(len(CONCAT) + 1):
        d = check_invariants(CONCAT[:n], MAX)
        assert d.error == 0


# ------------------------------------------------------------------ error codes


def test_length_above_max_with_only_the_prefix() -> None:
    for max_fs in (256, 1000, MAX):
        for flen in (max_fs + 1, 2**31, 2**32 - 1):
            d = decode(flen.to_bytes(4, "big"), max_fs)
            assert (d.frames, d.consumed, d.error) == ([], 0, Status.TOO_BIG)
    # exactly max is fine: incomplete
    assert decode(MAX.to_bytes(4, "big"), MAX).error == 0


def test_length_above_max_after_whole_frames() -> None:
    data = VECTOR_FRAMES[0] + VECTOR_FRAMES[3] + (MAX + 1).to_bytes(4, "big")
    d = decode(data, MAX)
    assert len(d.frames) == 2
    assert d.consumed == len(VECTOR_FRAMES[0]) + len(VECTOR_FRAMES[3])
    assert d.error == Status.TOO_BIG


def test_length_above_max_uses_the_given_limit() -> None:
    frame = VECTOR_FRAMES[0]  # 129-byte body
    assert decode(frame, 128).error == Status.TOO_BIG
    assert decode(frame, 129).error == 0
    assert len(decode(frame, 129).frames) == 1


@pytest.mark.parametrize("flen", range(7))
def test_length_below_7_is_invalid(flen: int) -> None:
    assert decode(flen.to_bytes(4, "big"), MAX).error == Status.INVALID
    d = decode(flen.to_bytes(4, "big") + b"\x03\x00\x00\x00\x01\x00\x00" * 2, MAX)
    assert (d.frames, d.error) == ([], Status.INVALID)


@pytest.mark.parametrize("reserved", range(10, 16))
def test_reserved_data_type_is_invalid(reserved: int) -> None:
    for type_byte in (reserved, reserved | 0x10, reserved | 0xF0):
        kv = body(1, b"\x01k" + bytes([type_byte]) + b"\x01z\x00")
        arg = body(3, b"\x01m\x01\x00" + bytes([type_byte]), ids=b"\x01\x01")
        action = body(103, b"\x01\x03\x02\x01n" + bytes([type_byte]), ids=b"\x01\x01")
        for data in (kv, arg, action):
            d = decode(data)
            assert (d.frames, d.error) == ([], Status.INVALID)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(body(1, b"\x01k\x03\xf0"), id="kv-value"),
        pytest.param(body(1, b"\x01k\x04\xff\xff\xff"), id="kv-value-3-bytes"),
        pytest.param(body(1, b"\xf0"), id="kv-key-length"),
        pytest.param(body(3, b"", ids=b"\xff\xff"), id="stream-id"),
        pytest.param(body(3, b"", ids=b"\x01\xf5"), id="frame-id"),
        pytest.param(body(103, b"\x01\x03\x02\xf0", ids=b"\x01\x01"), id="action-name-length"),
        pytest.param(body(3, b"\x01m\x01\x01a\x02\xff", ids=b"\x01\x01"), id="arg-int"),
    ],
)
def test_truncated_varint_inside_a_frame_is_invalid(data: bytes) -> None:
    d = decode(data)
    assert (d.frames, d.error) == ([], Status.INVALID)


def test_eleven_byte_varint_is_invalid() -> None:
    eleven = b"\xff" + b"\x80" * 9 + b"\x00"
    with pytest.raises(CodecError) as exc:
        decode_varint(eleven)
    assert exc.value.status == Status.INVALID
    # 10 bytes that are all continuation bytes: the 11th could only make it longer
    with pytest.raises(CodecError):
        decode_varint(b"\xff" + b"\x80" * 9)
    for data in (
        body(3, b"", ids=eleven + b"\x01"),
        body(3, b"", ids=b"\x01" + eleven),
        body(1, b"\x01k\x05" + eleven),
    ):
        d = decode(data)
        assert (d.frames, d.error) == ([], Status.INVALID)


def test_varint_above_2_64_is_invalid() -> None:
    # U64 is ff f0 fe fe fe fe fe fe fe 0e; one more in the last byte overflows
    for raw in (
        bytes.fromhex("fff0fefefefefefefe0f"),
        bytes.fromhex("fff0fefefefefefefe7f"),
        bytes.fromhex("f0f1fefefefefefefe0e"),  # 2^64 exactly: carry out of the sum
    ):
        with pytest.raises(CodecError) as exc:
            decode_varint(raw)
        assert exc.value.status == Status.INVALID
        assert decode(body(5, b"", ids=raw + b"\x00")).error == Status.INVALID


def test_nb_args_beyond_the_data_is_invalid() -> None:
    for nargs in (2, 3, 255):
        data = body(3, b"\x01m" + bytes([nargs]) + b"\x00\x00", ids=b"\x01\x01")
        d = decode(data)
        assert (d.frames, d.error) == ([], Status.INVALID)
    # the same message with the right count is fine
    assert decode(body(3, b"\x01m\x01\x00\x00", ids=b"\x01\x01")).error == 0
    # the NB-ARGS byte itself missing
    assert decode(body(3, b"\x01m", ids=b"\x01\x01")).error == Status.INVALID


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x03\x02\x01\x01n", id="unknown-action-3"),
        pytest.param(b"\x00\x02\x01\x01n", id="unknown-action-0"),
        pytest.param(b"\xff\x03\x01\x01n\x00", id="unknown-action-255"),
        pytest.param(b"\x01\x02\x01\x01n", id="set-var-with-2-args"),
        pytest.param(b"\x02\x03\x01\x01n\x00", id="unset-var-with-3-args"),
        pytest.param(b"\x02\x02\x05\x01n", id="scope-5"),
        pytest.param(b"\x01\x03", id="truncated-action"),
        pytest.param(b"\x01\x03\x01\x01n", id="set-var-without-value"),
    ],
)
def test_bad_action_is_invalid(payload: bytes) -> None:
    good = b"\x02\x02\x02\x03foo"  # a valid unset-var first
    d = decode(body(103, good + payload, ids=b"\x01\x01"))
    assert (d.frames, d.error) == ([], Status.INVALID)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(body(1, b"\x01k\x08\x05abc"), id="string-past-end"),
        pytest.param(body(1, b"\x05ab"), id="key-past-end"),
        pytest.param(body(1, b"\x01k"), id="key-without-value"),
        pytest.param(body(1, b"\x01k\x06\x7f\x00\x00"), id="short-ipv4"),
        pytest.param(body(1, b"\x01k\x07" + bytes(15)), id="short-ipv6"),
        pytest.param(body(3, b"\x01m\x01\x02a"), id="arg-name-past-end"),
        pytest.param(body(1, b"\x01k\x09\xfc\xf0\x06abc"), id="huge-binary-length"),
        pytest.param(body(1, b"\x01k\x08\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"), id="2^64-len"),
    ],
)
def test_truncated_items_are_invalid(data: bytes) -> None:
    d = decode(data)
    assert (d.frames, d.error) == ([], Status.INVALID)


def test_error_after_valid_frames_keeps_them() -> None:
    bad = body(3, b"\x01m\x05", ids=b"\x01\x01")
    data = VECTOR_FRAMES[3] + VECTOR_FRAMES[4] + bad + VECTOR_FRAMES[5]
    d = decode(data)
    assert len(d.frames) == 2
    assert d.consumed == len(VECTOR_FRAMES[3]) + len(VECTOR_FRAMES[4])
    assert d.error == Status.INVALID


def test_fragments_and_unknown_types_are_not_walked() -> None:
    # the payload would be invalid as items, but a fragment's payload is raw
    garbage = b"\x05\xff\xff"
    for type_, flags in ((3, 0), (3, 3), (1, 0), (103, 2), (0, 1), (50, 1), (255, 0)):
        (m,), _, error = decode_meanings(body(type_, garbage, flags=flags))
        assert error == 0
        assert m == {"type": type_, "flags": flags, "sid": 0, "fid": 0, "raw": garbage}


def test_decoder_stops_when_record_arrays_are_full() -> None:
    frame = VECTOR_FRAMES[3]
    dec = Decoder(max_frames=3)
    d = dec.decode(frame * 7, MAX)
    assert (len(d.frames), d.consumed, d.error) == (3, 3 * len(frame), 0)


def test_decoder_refuses_a_larger_max_frame_size() -> None:
    with pytest.raises(ValueError, match="sized"):
        Decoder(max_frame_size=256).decode(b"", MAX)


# ------------------------------------------------------------------ encoder


def _decoded_acks(data: bytes, max_frame_size: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    dec = Decoder(max_frame_size=max_frame_size)
    while data:
        frames, _, consumed, error = dec.decode(data, max_frame_size)
        assert error == 0
        assert frames
        for f in frames:
            assert f[F_LENGTH] <= max_frame_size
        out += decode_meanings(data[:consumed], max_frame_size)[0]
        data = data[consumed:]
    return out


def test_ack_larger_than_max_frame_size_is_cut() -> None:
    actions = [set_var("txn", f"var{i:03d}", String(b"x" * 20)) for i in range(40)]
    enc = Encoder()
    for max_fs in (256, 300, 1000):
        data, cut = enc.acks([(7, 9, actions)], max_fs)
        assert cut == [0]
        (m,) = _decoded_acks(data, max_fs)
        assert (m["sid"], m["fid"], m["type"], m["flags"]) == (7, 9, 103, 1)
        kept = len(m["actions"])
        assert 0 < kept < len(actions)
        assert [a[2] for a in m["actions"]] == [f"var{i:03d}" for i in range(kept)]
        # the next action would not have fit
        wire = len(enc.action_wire(actions[kept]))
        assert len(data) - 4 + wire > max_fs - 25 + 7


def test_only_the_oversized_reply_is_reported() -> None:
    big = [set_var("txn", f"v{i}", i) for i in range(100)]
    replies = [(1, 1, [set_var("sess", "a", 1)]), (3, 1, big), (5, 1, []), (7, 1, big)]
    data, cut = Encoder().acks(replies, 256)
    assert cut == [1, 3]
    ms = _decoded_acks(data, 256)
    assert [(m["sid"], m["fid"]) for m in ms] == [(1, 1), (3, 1), (5, 1), (7, 1)]
    assert len(ms[0]["actions"]) == 1
    assert ms[2]["actions"] == []
    assert ms[1]["actions"] == ms[3]["actions"]
    assert 0 < len(ms[1]["actions"]) < 100


def test_action_larger_than_a_frame_leaves_an_empty_ack() -> None:
    huge = set_var("txn", "blob", b"\x00" * 400)
    data, cut = Encoder().acks([(1, 2, [huge, unset_var("txn", "x")])], 256)
    assert cut == [0]
    (m,) = _decoded_acks(data, 256)
    assert m["actions"] == []


def test_many_acks_larger_than_the_output_buffer() -> None:
    n = 3000
    replies = [
        (2 * i + 1, i, [set_var("txn", "score", i), set_var("txn", "blob", String(b"y" * 40))])
        for i in range(n)
    ]
    enc = Encoder()
    data, cut = enc.acks(replies, MAX)
    assert cut == []
    assert len(data) > 65536
    ms = _decoded_acks(data, MAX)
    assert len(ms) == n
    for i, m in enumerate(ms):
        assert (m["sid"], m["fid"]) == (2 * i + 1, i)
        assert tagged(m["actions"]) == tagged(
            [["set-var", 2, "score", 3, i], ["set-var", 2, "blob", 8, String(b"y" * 40)]]
        )
    # the same encoder keeps working afterwards, for small and big batches
    assert enc.acks([(1, 1, [])], MAX) == (bytes.fromhex("0000000767000000010101"), [])
    assert enc.acks(replies, MAX) == (data, [])


def test_frame_larger_than_the_output_buffer() -> None:
    enc = Encoder(out_size=1024)
    value = String(bytes(range(256)) * 400)  # 102400 bytes
    data = enc.notify_frame(1, 1, messages=[("m", [("v", value)])])
    (m,), consumed, error = decode_meanings(data, 1 << 18)
    assert (consumed, error) == (len(data), 0)
    assert m["messages"] == [["m", [["v", 8, value]]]]


def test_acks_after_frame_on_the_same_encoder() -> None:
    # ACK records leave no stale item references behind from an earlier frame()
    enc = Encoder()
    enc.notify_frame(1, 1, messages=[("m", [("a", 1), ("b", "x")])])
    enc.kv_frame(1, 0, 0, kv=[("k", 1)])
    data, cut = enc.acks([(1, 1, [unset_var("txn", "foo")])], MAX)
    assert (data, cut) == (bytes.fromhex("0000000e6700000001010102020203666f6f"), [])


def test_frame_raises_when_items_do_not_fit() -> None:
    with pytest.raises(CodecError) as exc:
        Encoder().kv_frame(1, 0, 0, kv=[("k", b"x" * 300)], max_frame_size=256)
    assert exc.value.status == Status.TOO_BIG
    with pytest.raises(CodecError) as exc:
        Encoder().raw_frame(0, 1, 1, payload=b"x" * 300, flags=0, max_frame_size=256)
    assert exc.value.status == Status.TOO_BIG
    # exactly at the limit is fine
    data = Encoder().raw_frame(0, 1, 1, payload=b"x" * 249, flags=0, max_frame_size=256)
    assert len(data) == 4 + 256


def test_frame_refuses_bad_records() -> None:
    with pytest.raises(CodecError) as exc:
        Encoder().kv_frame(1, 0, 0, kv=[("k", (DataType.IPV4, 0, b"abc"))])
    assert exc.value.status == Status.INVALID
    with pytest.raises(CodecError):
        Encoder().kv_frame(1, 0, 0, kv=[("k", (12, 0, b""))])
    with pytest.raises(CodecError):  # items on a frame type that has none
        Encoder().kv_frame(50, 0, 0, kv=[("k", 1)])


def test_encoded_frame_uses_the_max_frame_size_header_budget() -> None:
    # a frame exactly max_frame_size long, with 10-byte ids
    enc = Encoder()
    raw = b"r" * (256 - 25)
    data = enc.raw_frame(0, U64, U64, payload=raw, flags=0, max_frame_size=256)
    assert int.from_bytes(data[:4], "big") == 256
    (m,), _, error = decode_meanings(data, 256)
    assert (m["sid"], m["fid"], m["raw"], error) == (U64, U64, raw, 0)


def test_status_codes_and_reasons() -> None:
    assert Status.TOO_BIG.reason == "frame is too big"
    assert Status.INVALID.reason == "invalid frame received"
    assert status_reason(9) == "max-frame-size too big or too small"
    assert status_reason(12345) == "an unknown error occurred"
    assert [int(s) for s in Status] == [*range(14), 99]
    assert {int(t) for t in FrameType} == {0, 1, 2, 3, 101, 102, 103}
    assert str(CodecError(4)) == "invalid frame received"


def test_encode_varint_rejects_out_of_range() -> None:
    for bad in (-1, 2**64):
        with pytest.raises(OverflowError):
            encode_varint(bad)


def test_uint32_subclass_value_in_kv() -> None:
    data = Encoder().kv_frame(101, 0, 0, kv=[("max-frame-size", UInt32(300))])
    (m,), _, _ = decode_meanings(data)
    assert tagged(m["kv"]) == tagged([["max-frame-size", 3, 300]])
    frames = Decoder().decode(data, MAX).frames
    assert frames[0][F_SID] == frames[0][F_FID] == 0


def test_frame_size_limits_have_one_definition() -> None:
    """spop.h defines them; the codec, the protocol and the config use those."""
    from spoa_mp._spop import lib

    from spoa_mp import codec, config, protocol

    assert (codec.MIN_FRAME_SIZE, codec.DEFAULT_FRAME_SIZE, codec.MAX_FRAME_SIZE) == (
        lib.SPOP_MIN_FRAME_SIZE, lib.SPOP_DEFAULT_FRAME_SIZE, lib.SPOP_MAX_FRAME_SIZE,
    )  # fmt: skip
    assert (config.MIN_FRAME_SIZE, config.MAX_FRAME_SIZE) == (256, 1 << 24)
    assert config.MAX_FRAME_SIZE == codec.MAX_FRAME_SIZE  # spoa_mp.limits, kept equal (test_limits)
    assert protocol.AgentSettings(max_frame_size=codec.MAX_FRAME_SIZE).max_frame_size == 1 << 24
    with pytest.raises(ValueError, match=f"\\[256, {1 << 24}\\]"):
        protocol.AgentSettings(max_frame_size=codec.MAX_FRAME_SIZE + 1)

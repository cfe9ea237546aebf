"""The SPOP test vectors (spop.md §12, tests/data/spop-vectors.json) against the codec."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import pytest
from conftest import (
    VECTORS,
    decode_meanings,
    encode_meaning,
    json_meaning,
    json_value,
    tagged,
)

from spoa_mp.codec import (
    F_FID,
    F_LENGTH,
    F_OFFSET,
    F_SID,
    F_TYPE,
    Decoder,
    Encoder,
    decode_varint,
    encode_varint,
)
from spoa_mp.model import Int32, Int64, UInt32, UInt64, set_var, unset_var

MAX = 16380
ALL_FRAMES = [bytes.fromhex(f["hex"]) for f in VECTORS["frames"]]
ACK_NAMES = [f["name"] for f in VECTORS["frames"] if f["decoded"]["type"] == 103]


# ------------------------------------------------------------------ varints


def test_varint_decodes(varint_vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(varint_vector["hex"])
    assert decode_varint(raw) == (varint_vector["value"], len(raw))
    # trailing bytes are not part of the varint
    assert decode_varint(raw + b"\x00\xff") == (varint_vector["value"], len(raw))


def test_varint_encodes(varint_vector: dict[str, Any]) -> None:
    assert encode_varint(varint_vector["value"]) == bytes.fromhex(varint_vector["hex"])


def test_truncated_varint_is_incomplete(truncated_varint_hex: str) -> None:
    raw = bytes.fromhex(truncated_varint_hex)
    value, used = decode_varint(raw)
    assert used == 0
    assert value == 0


def test_truncated_varint_vectors_are_strict_prefixes_of_longer_varints() -> None:
    # the file's truncated inputs complete into valid varints once a final byte arrives
    for hex_ in VECTORS["truncated_varints_hex"]:
        raw = bytes.fromhex(hex_)
        _, used = decode_varint(raw + b"\x00")
        assert used == len(raw) + 1


# ------------------------------------------------------------------ frames


def test_frame_decodes_to_its_meaning(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    frames, consumed, error = decode_meanings(data, MAX)
    assert error == 0
    assert consumed == len(data)
    assert len(frames) == 1
    expected = json_meaning(frame_vector["decoded"])
    assert tagged(frames[0]) == tagged(expected)


def test_frame_record_positions(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    frames, _, consumed, error = Decoder().decode(data, MAX)
    (f,) = frames
    assert (error, consumed) == (0, len(data))
    assert f[F_OFFSET] == 0
    assert f[F_LENGTH] == int.from_bytes(data[:4], "big") == len(data) - 4
    assert (f[F_TYPE], f[F_SID], f[F_FID]) == (
        frame_vector["decoded"]["type"],
        frame_vector["decoded"]["sid"],
        frame_vector["decoded"]["fid"],
    )


def test_frame_reencodes_byte_for_byte(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    meaning = json_meaning(frame_vector["decoded"])
    assert encode_meaning(meaning) == data
    assert encode_meaning(meaning, max_frame_size=MAX) == data


def test_frame_reencodes_with_a_shared_encoder() -> None:
    # one Encoder reused for every vector, in both orders: no state leaks between calls
    enc = Encoder()
    meanings = [json_meaning(f["decoded"]) for f in VECTORS["frames"]]
    assert [encode_meaning(m, enc) for m in meanings] == ALL_FRAMES
    assert [encode_meaning(m, enc) for m in reversed(meanings)] == ALL_FRAMES[::-1]


def _wrap(type_code: int, value: Any) -> Any:
    """A Python value that set_var encodes with exactly this type."""
    sized = {2: Int32, 3: UInt32, 4: Int64, 5: UInt64}
    return sized[type_code](value) if type_code in sized else json_value(type_code, value)


@pytest.mark.parametrize("name", ACK_NAMES)
def test_ack_vectors_via_acks(name: str, frame_bytes: dict[str, bytes]) -> None:
    decoded = next(f["decoded"] for f in VECTORS["frames"] if f["name"] == name)
    actions = [
        unset_var(a[1], a[2]) if a[0] == "unset-var" else set_var(a[1], a[2], _wrap(a[3], a[4]))
        for a in decoded["actions"]
    ]
    data, cut = Encoder().acks([(decoded["sid"], decoded["fid"], actions)], MAX)
    assert cut == []
    assert data == frame_bytes[name]


@pytest.mark.parametrize(
    ("name", "sid", "fid", "actions"),
    [
        ("ack set-var sess ip_score uint32 42", 20, 1, [set_var("sess", "ip_score", UInt32(42))]),
        ("ack set-var sess ip_score uint32 42", 20, 1, [set_var("sess", "ip_score", 42)]),
        ("ack set-var sess ip_score int32 42", 20, 1, [set_var(1, "ip_score", Int32(42))]),
        ("ack empty", 1, 1, []),
        ("ack unset-var txn foo", 1, 1, [unset_var("txn", "foo")]),
        ("ack set-var txn n int64 -1", 1, 1, [set_var("txn", "n", Int64(-1))]),
        ("ack set-var txn n int64 -1", 1, 1, [set_var("txn", "n", -1)]),
    ],
)
def test_ack_vectors_explicit_types(
    name: str, sid: int, fid: int, actions: list, frame_bytes: dict[str, bytes]
) -> None:
    enc = Encoder()
    assert enc.acks([(sid, fid, actions)], MAX) == (frame_bytes[name], [])
    # the second time the cached action bytes are used: same result
    assert enc.acks([(sid, fid, actions)], MAX) == (frame_bytes[name], [])


def test_all_ack_vectors_in_one_acks_call(frame_bytes: dict[str, bytes]) -> None:
    replies = [
        (20, 1, [set_var("sess", "ip_score", UInt32(42))]),
        (20, 1, [set_var("sess", "ip_score", Int32(42))]),
        (1, 1, []),
        (1, 1, [unset_var("txn", "foo")]),
        (1, 1, [set_var("txn", "n", Int64(-1))]),
    ]
    data, cut = Encoder().acks(replies, MAX)
    assert cut == []
    assert data == b"".join(frame_bytes[n] for n in ACK_NAMES)


# ------------------------------------------------------------------ incomplete input


def _check_prefixes(buf: bytes, ends: list[int]) -> None:
    """Every strict prefix of buf holds exactly the whole frames ending at `ends`."""
    dec = Decoder()
    for n in range(len(buf)):
        frames, _, consumed, error = dec.decode(buf[:n], MAX)
        whole = [e for e in ends if e <= n]
        assert error == 0, n
        assert len(frames) == len(whole), n
        assert consumed == (whole[-1] if whole else 0), n


def test_every_strict_prefix_is_incomplete(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    _check_prefixes(data, [len(data)])


def test_every_prefix_of_concatenated_frames() -> None:
    buf = b"".join(ALL_FRAMES)
    ends = list(accumulate(len(f) for f in ALL_FRAMES))
    _check_prefixes(buf, ends)
    frames, consumed, error = decode_meanings(buf, MAX)
    assert (consumed, error) == (len(buf), 0)
    assert tagged(frames) == tagged([json_meaning(f["decoded"]) for f in VECTORS["frames"]])

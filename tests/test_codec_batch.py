"""Decoder.index (spop_decode_batch), notify_messages and Encoder.acks_for.

Decoder.decode and the Encoder's *_frame methods are the references: index() must read the
same frames, records and ids as decode(), with columns an independent
walk of the records predicts; acks_for() must write the same bytes as one
Encoder.ack_frame() per ACK (and as acks()), whatever shape the results take.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import pytest
from conftest import VECTORS, action_of, encode_meaning, tagged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import any_frames, flat, meaning, set_var_actions, unset_var_actions, values

from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_LENGTH,
    F_NITEMS,
    F_OFFSET,
    F_PARSED,
    F_SID,
    F_TYPE,
    OTHER,
    CodecError,
    Decoder,
    Encoder,
    FrameType,
    Indexed,
    Status,
    encode_varint,
    item_name,
    messages,
    notify_messages,
    pack_records,
    unlisted_message,
    whole_notify_messages,
)
from spoa_mp.model import Action, DataType, Message, String, set_var, unset_var

U64 = 2**64 - 1
MAX = 16380
BIG = 1 << 18  # generated frames can be large (255 args, 300-byte values)
NAMES = ("check-client-ip", "ip", "a", "")
VECTOR_FRAMES = [bytes.fromhex(f["hex"]) for f in VECTORS["frames"]]
CONCAT = b"".join(VECTOR_FRAMES)
CONCAT_ENDS = list(accumulate(len(f) for f in VECTOR_FRAMES))
REFERENCE = Encoder()  # Encoder.ack_frame(): the ACK bytes acks_for must produce
WIRES = Encoder()  # encodes (and caches) an Action's wire

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ helpers

_decoders: dict[tuple[tuple[str, ...], int], Decoder] = {}


def decoder_for(names: Sequence[str], max_frame_size: int = MAX) -> Decoder:
    """A decoder with these handler names (kept: a large one costs megabytes)."""
    key = (tuple(names), max_frame_size)
    if key not in _decoders:
        _decoders[key] = Decoder(max_frame_size=max_frame_size, names=names)
    return _decoders[key]


def expected_columns(
    data: bytes, frames: list[Any], items: list[Any], names: Sequence[str]
) -> tuple[list[int], list[int], list[int], int]:
    """(names, firsts, nargs, plain) as Indexed documents them, from decode()'s records."""
    listed = [n.encode() for n in names]
    cols: tuple[list[int], list[int], list[int]] = ([], [], [])
    for f in frames:
        first, n = f[F_FIRST], f[F_NITEMS]
        if f[F_TYPE] == FrameType.NOTIFY and f[F_PARSED] and n and items[first][7] + 1 == n:
            raw = item_name(data, items[first])
            index = listed.index(raw) if raw in listed else len(names)
            row = (index, first + 1, items[first][7])
        else:
            row = (OTHER, 0, 0)
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    return (*cols, sum(i != OTHER for i in cols[0]))


def assert_index_matches_decode(
    data: bytes, max_frame_size: int, names: Sequence[str], decoder: Decoder | None = None
) -> Indexed:
    """index() reads what decode() reads, and its columns are the expected ones."""
    dec = decoder or decoder_for(names, max(max_frame_size, MAX))
    d = dec.decode(data, max_frame_size)
    ix = dec.index(data, max_frame_size, all_frames=True)
    assert (ix.n, ix.consumed, ix.error) == (len(d.frames), d.consumed, d.error)
    assert ix.frame_records() == d.frames
    assert ix.item_records() == d.items
    assert ix.records == pack_records(d.items)
    assert ix.ids == b"".join(struct.pack("=QQ", f[F_SID], f[F_FID]) for f in d.frames)
    assert (ix.names, ix.firsts, ix.nargs, ix.plain) == expected_columns(
        data, d.frames, d.items, names
    )
    # without all_frames, the frame records are left out only when every frame is plain
    lean = dec.index(data, max_frame_size)
    assert lean.frames == (b"" if ix.plain == ix.n else ix.frames)
    assert lean._replace(frames=ix.frames) == ix
    return ix


def one_message_notify(sid: int, fid: int, name: str, args: list[Any]) -> dict[str, Any]:
    return meaning(3, sid, fid, 1, messages=[[name, flat(args)]])


# ------------------------------------------------------------------ strategies

NAME_POOL = ["check-client-ip", "ip", "a", "", "zz", "é", "check-client-i", "ipp"]
stream_ids = st.one_of(st.sampled_from([0, 1, 239, 240, 2**32, 2**63, U64]), st.integers(0, U64))
arg_names = st.one_of(st.sampled_from(["", "ip", "x", "é"]), st.text(max_size=4))
plain_notifies = st.builds(
    one_message_notify,
    stream_ids,
    stream_ids,
    st.one_of(st.sampled_from(NAME_POOL), st.text(max_size=6)),
    st.lists(st.tuples(arg_names, values), max_size=6),
)
batches = st.lists(st.one_of(plain_notifies, plain_notifies, any_frames), max_size=8)
name_lists = st.lists(st.sampled_from(NAME_POOL), unique=True, max_size=5)


# ------------------------------------------------------------------ index() against decode()


def test_index_agrees_with_decode_on_every_vector(frame_vector: dict[str, Any]) -> None:
    data = bytes.fromhex(frame_vector["hex"])
    ix = assert_index_matches_decode(data, MAX, NAMES)
    assert (ix.n, ix.consumed, ix.error) == (1, len(data), 0)
    decoded = frame_vector["decoded"]
    assert struct.unpack("=QQ", ix.ids) == (decoded["sid"], decoded["fid"])
    plain = decoded["type"] == 3 and len(decoded.get("messages", ())) == 1
    assert ix.plain == int(plain)
    if plain:
        (name, args) = decoded["messages"][0]
        assert ix.names == [NAMES.index(name)]
        assert ix.nargs == [len(args)]


def test_index_agrees_with_decode_on_all_vectors_back_to_back() -> None:
    ix = assert_index_matches_decode(CONCAT, MAX, NAMES)
    assert (ix.n, ix.consumed, ix.error) == (len(VECTOR_FRAMES), len(CONCAT), 0)
    # the one-message NOTIFYs: check-client-ip, 4 times
    assert ix.plain == 4
    assert sorted(set(ix.names)) == [0, OTHER]


@FAST
@given(batches, name_lists)
def test_index_agrees_with_decode_on_random_batches(
    ms: list[dict[str, Any]], names: list[str]
) -> None:
    data = b"".join(encode_meaning(m) for m in ms)
    ix = assert_index_matches_decode(data, BIG, names, decoder_for(names, BIG))
    assert (ix.n, ix.consumed, ix.error) == (len(ms), len(data), 0)


@FAST
@given(st.lists(plain_notifies, min_size=1, max_size=8), name_lists)
def test_plain_batch_columns_name_the_messages(ms: list[dict[str, Any]], names: list[str]) -> None:
    data = b"".join(encode_meaning(m) for m in ms)
    ix = decoder_for(names, BIG).index(data, BIG)
    assert (ix.n, ix.plain, ix.frames) == (len(ms), len(ms), b"")
    message_names = [m["messages"][0][0] for m in ms]
    assert ix.names == [names.index(n) if n in names else len(names) for n in message_names]
    assert ix.nargs == [len(m["messages"][0][1]) for m in ms]
    assert list(array("Q", ix.ids)) == [i for m in ms for i in (m["sid"], m["fid"])]


def test_index_of_nothing_and_of_a_malformed_first_frame() -> None:
    dec = decoder_for(NAMES)
    assert tuple(dec.index(b"", MAX)) == (0, 0, b"", [], [], [], b"", b"", 0, 0)
    for data, status in (
        (b"\x00\x00\x00\x03\x03\x00\x00", Status.INVALID),
        ((MAX + 1).to_bytes(4, "big"), Status.TOO_BIG),
    ):
        ix = dec.index(data, MAX, all_frames=True)
        assert tuple(ix) == (0, 0, b"", [], [], [], b"", b"", 0, status)


def test_index_keeps_the_frames_before_a_malformed_one() -> None:
    good = VECTOR_FRAMES[6] + VECTOR_FRAMES[9]  # a plain NOTIFY, a two-message one
    ix = assert_index_matches_decode(good + b"\x00\x00\x00\x03" + VECTOR_FRAMES[6], MAX, NAMES)
    assert (ix.n, ix.plain, ix.consumed, ix.error) == (2, 1, len(good), Status.INVALID)


def test_index_stops_at_max_frames_like_decode() -> None:
    dec = Decoder(max_frames=3, names=NAMES)
    ix = assert_index_matches_decode(CONCAT, MAX, NAMES, dec)
    assert (ix.n, ix.consumed, ix.error) == (3, CONCAT_ENDS[2], 0)


def test_index_refuses_the_sizes_decode_refuses() -> None:
    dec = Decoder(max_frame_size=256, names=NAMES)  # 256 records: frames up to 511 bytes
    dec.decode(b"", 511)
    dec.index(b"", 511)
    with pytest.raises(ValueError, match="sized"):
        dec.decode(b"", 512)
    with pytest.raises(ValueError, match="sized"):
        dec.index(b"", 512)


# ------------------------------------------------------------------ prefixes


def test_every_prefix_of_the_vectors_gives_its_whole_frames() -> None:
    dec = decoder_for(NAMES)
    full = dec.index(CONCAT, MAX)
    for p in range(len(CONCAT)):
        whole = sum(end <= p for end in CONCAT_ENDS)
        ix = dec.index(CONCAT[:p], MAX)
        assert ix.error == 0, p
        assert (ix.n, ix.consumed) == (whole, CONCAT_ENDS[whole - 1] if whole else 0), p
        assert ix.names == full.names[:whole]
        assert ix.plain == sum(i != OTHER for i in full.names[:whole])
        assert ix.ids == full.ids[: 16 * whole]


@FAST
@given(st.lists(st.one_of(plain_notifies, any_frames), min_size=1, max_size=5), st.data())
def test_random_prefixes_of_a_batch_give_their_whole_frames(
    ms: list[dict[str, Any]], data: Any
) -> None:
    parts = [encode_meaning(m) for m in ms]
    buf = b"".join(parts)
    ends = list(accumulate(len(p) for p in parts))
    dec = decoder_for(NAMES, BIG)
    full = dec.index(buf, BIG)
    cuts = data.draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=20))
    for p in [*cuts, *(e - 1 for e in ends)]:
        whole = sum(end <= p for end in ends)
        ix = dec.index(buf[:p], BIG)
        assert ix.error == 0
        assert (ix.n, ix.consumed) == (whole, ends[whole - 1] if whole else 0)
        assert ix.names == full.names[:whole]
        assert ix.ids == full.ids[: 16 * whole]


# ------------------------------------------------------------------ messages read from the index


def reading(msg: Message, keys: Sequence[str]) -> dict[str, Any]:
    """Everything a handler can read from a message, exceptions included."""

    def attempt(read: Callable[[], Any]) -> Any:
        try:
            return ("value", tagged(read()))
        except (IndexError, KeyError) as e:
            return (type(e).__name__,)

    out: dict[str, Any] = {
        "name": msg.name,
        "len": len(msg),
        "nargs": msg.nargs,
        "names": msg.names(),
        "items": tagged(list(msg.items())),
    }
    for key in [*range(-msg.nargs - 1, msg.nargs + 1), *keys]:
        out[f"[{key!r}]"] = attempt(lambda key=key: msg[key])
        out[f"type_of({key!r})"] = attempt(lambda key=key: int(msg.type_of(key)))
        out[f"get({key!r})"] = tagged(msg.get(key, "default"))
    return out


def expected_reading(name: str, args: list[list[Any]], keys: Sequence[str]) -> dict[str, Any]:
    """reading() of a message built from (name, [[arg, type, value]]), worked out by hand."""
    n = len(args)
    out: dict[str, Any] = {
        "name": name,
        "len": n,
        "nargs": n,
        "names": [a for a, _, _ in args],
        "items": tagged([(a, v) for a, _, v in args]),
    }
    for key in [*range(-n - 1, n + 1), *keys]:
        if isinstance(key, int):
            found = args[key] if -n <= key < n else None
            missing = ("IndexError",)
        else:
            found = next((a for a in args if a[0] == key), None)
            missing = ("KeyError",)
        out[f"[{key!r}]"] = ("value", tagged(found[2])) if found else missing
        out[f"type_of({key!r})"] = ("value", tagged(found[1])) if found else missing
        out[f"get({key!r})"] = tagged(found[2] if found else "default")
    return out


@FAST
@given(
    st.lists(plain_notifies, min_size=1, max_size=4),
    name_lists,
    st.lists(arg_names, max_size=3),
)
def test_arguments_read_the_same_through_notify_messages_and_messages(
    ms: list[dict[str, Any]], names: list[str], extra_keys: list[str]
) -> None:
    data = b"".join(encode_meaning(m) for m in ms)
    dec = decoder_for(names, BIG)
    ix = dec.index(data, BIG, all_frames=True)
    d = dec.decode(data, BIG)
    via_index = notify_messages(data, ix, dec.names)
    assert len(via_index) == len(ms)
    for k, (m, msg) in enumerate(zip(ms, via_index, strict=True)):
        ((name, args),) = m["messages"]
        keys = sorted({*extra_keys, *(a for a, _, _ in args), "no-such-arg"})
        want = expected_reading(name, args, keys)
        assert reading(msg, keys) == want
        (from_list,) = messages(data, d.frames[k], d.items)
        (from_records,) = messages(data, d.frames[k], ix.records)
        assert reading(from_list, keys) == want
        assert reading(from_records, keys) == want
        assert msg.data is data


def test_unlisted_names_are_read_from_the_records() -> None:
    frames = [
        ("zz", [("", 1)]),
        ("check-client-i", []),  # a prefix of a listed name is not that name
        ("a", [("x", String(b"s")), ("y", None)]),
        ("ipp", [("ip", 2)]),  # nor is a longer one
    ]
    data = b"".join(REFERENCE.notify_frame(i, 1, messages=[f]) for i, f in enumerate(frames))
    for names in ((), ("a",), ("check-client-ip", "ip")):
        dec = decoder_for(names)
        ix = dec.index(data, MAX)
        listed = [names.index(n) if n in names else len(names) for n, _ in frames]
        assert ix.names == listed
        msgs = notify_messages(data, ix, dec.names)
        assert [m.name for m in msgs] == [n for n, _ in frames]
        assert [list(m.items()) for m in msgs] == [list(a) for _, a in frames]
        for k, idx in enumerate(ix.names):
            if idx == len(names):
                direct = unlisted_message(data, ix.records, ix.firsts[k], ix.nargs[k])
                assert (direct.name, list(direct.items())) == (msgs[k].name, list(msgs[k].items()))


def test_a_name_that_is_not_utf8_reads_as_messages_reads_it() -> None:
    # name b"\xffm": one message, one UINT32 argument
    payload = b"\x02\xffm\x01\x00\x03\x05"
    body = bytes([3, 0, 0, 0, 1, 9, 1]) + payload
    data = len(body).to_bytes(4, "big") + body
    dec = decoder_for(NAMES)
    ix = dec.index(data, MAX, all_frames=True)
    assert ix.names == [len(NAMES)]
    (msg,) = notify_messages(data, ix, dec.names)
    (ref,) = messages(data, ix.frame_records()[0], ix.records)
    assert msg.name == ref.name == "\ufffdm"
    assert msg[0] == ref[0] == 5


def test_messages_takes_item_tuples_or_records() -> None:
    data = VECTOR_FRAMES[9]  # two messages, every data type
    d = decoder_for(NAMES).decode(data, MAX)
    by_list = messages(data, d.frames[0], d.items)
    by_bytes = messages(data, d.frames[0], pack_records(d.items))
    assert [reading(m, ["s", "v4"]) for m in by_list] == [reading(m, ["s", "v4"]) for m in by_bytes]
    assert [m.name for m in by_list] == ["all-types", "check-client-ip"]
    assert by_list[0].type_of("u64") == DataType.UINT64


# -------------------------------------------------------- acks_for against ack_frame() and acks()


def as_actions(result: Action | Sequence[Action] | None) -> tuple[Action, ...]:
    if result is None:
        return ()
    if isinstance(result, Action):
        return (result,)
    return tuple(result)


def reference_acks(pairs: Sequence[tuple[int, int]], results: Sequence[Any]) -> bytes:
    """One Encoder.ack_frame() per ACK: encodes from the actions' fields, not their cached wire."""
    return b"".join(
        REFERENCE.ack_frame(sid, fid, actions=list(as_actions(r)))
        for (sid, fid), r in zip(pairs, results, strict=True)
    )


def ids_of(pairs: Sequence[tuple[int, int]], kind: str) -> bytes | array[int]:
    ids = array("Q", [i for pair in pairs for i in pair])
    return ids.tobytes() if kind == "bytes" else ids


action_meanings = st.one_of(set_var_actions, unset_var_actions)


@st.composite
def results(draw: st.DrawFn) -> Action | tuple[Action, ...] | list[Action] | None:
    """One handler result: an Action, a tuple or a list of them, or None; each
    Action encoded before (wire cached) or not."""
    shape = draw(st.sampled_from(["action", "action", "tuple", "list", "none"]))
    if shape == "none":
        return None
    actions = [action_of(a) for a in draw(st.lists(action_meanings, max_size=4))]
    for a in actions:
        if draw(st.booleans()):
            WIRES.action_wire(a)
    if shape == "action":
        return action_of(draw(action_meanings)) if not actions else actions[0]
    return tuple(actions) if shape == "tuple" else actions


@FAST
@given(
    st.lists(st.tuples(st.tuples(stream_ids, stream_ids), results()), max_size=8),
    st.sampled_from(["bytes", "array"]),
)
def test_acks_for_writes_what_frame_and_acks_write(
    replies: list[tuple[tuple[int, int], Any]], kind: str
) -> None:
    pairs = [p for p, _ in replies]
    res = [r for _, r in replies]
    want = reference_acks(pairs, res)
    assert Encoder().acks_for(ids_of(pairs, kind), res, MAX) == (want, [])
    # again, every wire cached now; and acks() with the same actions as sequences
    assert Encoder().acks_for(ids_of(pairs, kind), res, MAX) == (want, [])
    triples = [(sid, fid, list(as_actions(r))) for (sid, fid), r in replies]
    assert Encoder().acks(triples, MAX) == (want, [])


@FAST
@given(st.lists(st.tuples(stream_ids, stream_ids), min_size=1, max_size=10), st.data())
def test_acks_for_prebuilt_actions_take_the_fast_path(
    pairs: list[tuple[int, int]], data: Any
) -> None:
    enc = Encoder()
    res = [action_of(data.draw(action_meanings)) for _ in pairs]
    for a in res:
        enc.action_wire(a)
    want = reference_acks(pairs, res)

    def no_general_path(*args: Any) -> Any:
        raise AssertionError("the general path ran for encoded Actions")

    enc._acks_general = no_general_path  # type: ignore[method-assign]
    kind = data.draw(st.sampled_from(["bytes", "array"]))
    assert enc.acks_for(ids_of(pairs, kind), res, MAX) == (want, [])


def test_acks_for_one_shared_action_many_times() -> None:
    score = set_var("sess", "ip_score", 42)
    pairs = [(20, 1), (U64, U64), (0, 1), (240, 2**32)]
    want = reference_acks(pairs, [score] * 4)
    enc = Encoder()
    assert enc.acks_for(ids_of(pairs, "array"), [score] * 4, MAX) == (want, [])  # not encoded yet
    assert score.wire is not None
    assert enc.acks_for(ids_of(pairs, "bytes"), [score] * 4, MAX) == (want, [])  # encoded
    assert enc.acks_for(b"", [], MAX) == (b"", [])


def test_acks_for_vector_bytes() -> None:
    frames = {f["name"]: bytes.fromhex(f["hex"]) for f in VECTORS["frames"]}
    data, cut = Encoder().acks_for(
        array("Q", [20, 1, 1, 1, 1, 1]),
        [set_var("sess", "ip_score", 42), None, (unset_var("txn", "foo"),)],
        MAX,
    )
    assert cut == []
    assert data == (
        frames["ack set-var sess ip_score uint32 42"]
        + frames["ack empty"]
        + frames["ack unset-var txn foo"]
    )


# ------------------------------------------------------------------ ids that do not match


@pytest.mark.parametrize(
    "res",
    [
        pytest.param([set_var("txn", "a", 1), set_var("txn", "b", 2)], id="actions"),
        pytest.param([[set_var("txn", "a", 1)], None], id="lists-and-none"),
    ],
)
@pytest.mark.parametrize("n_ids", [0, 2, 6, 8])
@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_acks_for_with_a_wrong_id_count_raises_value_error(
    res: list[Any], n_ids: int, kind: str
) -> None:
    enc = Encoder()
    for r in res:
        for a in as_actions(r):
            enc.action_wire(a)
    ids = array("Q", range(n_ids))
    with pytest.raises(ValueError, match="ids for 2 ACKs"):
        enc.acks_for(ids.tobytes() if kind == "bytes" else ids, res, MAX)


@pytest.mark.parametrize("kind", ["bytes", "array"])
def test_too_few_ids_with_an_ack_to_cut_raise_value_error(kind: str) -> None:
    many = [set_var("txn", f"v{i}", i) for i in range(60)]  # far over 256 bytes
    with pytest.raises(ValueError, match="ids for 2 ACKs"):
        Encoder().acks_for(ids_of([(1, 1)], kind), [None, many], 256)


# ------------------------------------------------------------------ cut to max_frame_size


def decoded_acks(data: bytes, max_frame_size: int) -> list[tuple[int, int, bytes]]:
    """(sid, fid, action bytes) of every ACK in data, each within max_frame_size."""
    out = []
    dec = decoder_for((), MAX)
    while data:
        d = dec.decode(data, max_frame_size)
        assert d.error == 0
        assert d.frames
        for f in d.frames:
            assert f[F_TYPE] == FrameType.ACK
            assert f[F_LENGTH] <= max_frame_size
            header = 5 + len(encode_varint(f[F_SID])) + len(encode_varint(f[F_FID]))
            start = f[F_OFFSET] + 4 + header
            out.append((f[F_SID], f[F_FID], data[start : f[F_OFFSET] + 4 + f[F_LENGTH]]))
        data = data[d.consumed :]
    return out


many_actions = st.lists(action_meanings, min_size=10, max_size=40).map(
    lambda ms: [action_of(m) for m in ms]
)


@FAST
@given(
    st.lists(
        st.tuples(st.tuples(stream_ids, stream_ids), st.one_of(results(), many_actions)),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["bytes", "array"]),
)
def test_acks_for_cuts_like_acks_at_256(
    replies: list[tuple[tuple[int, int], Any]], kind: str
) -> None:
    pairs = [p for p, _ in replies]
    res = [r for _, r in replies]
    data, cut = Encoder().acks_for(ids_of(pairs, kind), res, 256)
    triples = [(sid, fid, list(as_actions(r))) for (sid, fid), r in replies]
    assert Encoder().acks(triples, 256) == (data, cut)
    acks = decoded_acks(data, 256)
    assert [(sid, fid) for sid, fid, _ in acks] == pairs
    enc = Encoder()
    for k, ((sid, fid, body), r) in enumerate(zip(acks, res, strict=True)):
        wires = [enc.action_wire(a) for a in as_actions(r)]
        ends = [0, *accumulate(len(w) for w in wires)]
        assert len(body) in ends  # whole actions only
        kept = ends.index(len(body))
        assert body == b"".join(wires[:kept])  # the leading ones
        header = 5 + len(encode_varint(sid)) + len(encode_varint(fid))
        if k in cut:
            assert kept < len(wires)
            assert header + len(body) + len(wires[kept]) > 256  # the next one did not fit
        else:
            assert kept == len(wires)


def test_a_single_action_bigger_than_a_frame_leaves_an_empty_ack() -> None:
    enc = Encoder()
    huge = set_var("txn", "blob", b"\x00" * 400)
    small = set_var("txn", "s", 1)
    enc.action_wire(huge)
    enc.action_wire(small)
    pairs = [(1, 1), (U64, U64), (3, 1)]
    res = [small, huge, small]
    data, cut = enc.acks_for(ids_of(pairs, "array"), res, 256)  # fast path first: too big
    assert cut == [1]
    triples = [(sid, fid, [a]) for (sid, fid), a in zip(pairs, res, strict=True)]
    assert Encoder().acks(triples, 256) == (data, cut)
    assert [body for _, _, body in decoded_acks(data, 256)] == [small.wire, b"", small.wire]


@pytest.mark.parametrize("path", ["acks_for", "acks"])
def test_many_acks_with_the_largest_ids_fit(path: str) -> None:
    n = 2000
    action = unset_var("txn", "x")  # 5 bytes
    enc = Encoder()
    if path == "acks_for":
        data, cut = enc.acks_for(array("Q", [U64] * (2 * n)), [action] * n, MAX)
    else:
        data, cut = enc.acks([(U64, U64, [action])] * n, MAX)
    assert cut == []
    assert len(data) == n * (4 + 25 + 5)


# ------------------------------------------------------------ start offsets, id widths


@pytest.mark.parametrize("junk", [0, 1, 7, 300])
def test_index_from_an_offset_gives_what_a_slice_gives(junk: int) -> None:
    """index(start=k) decodes data[k:] with offsets that count from data[0]."""
    dec = decoder_for(NAMES)
    data = b"\xee" * junk + CONCAT
    at = dec.index(data, MAX, all_frames=True, start=junk)
    sliced = decoder_for(NAMES).index(CONCAT, MAX, all_frames=True)
    assert (at.n, at.plain, at.ids, at.names, at.nargs) == (
        sliced.n, sliced.plain, sliced.ids, sliced.names, sliced.nargs,
    )  # fmt: skip
    assert at.consumed == junk + sliced.consumed
    for f, g in zip(at.frame_records(), sliced.frame_records(), strict=True):
        assert f[F_OFFSET] == junk + g[F_OFFSET]
    for a, b in zip(at.item_records(), sliced.item_records(), strict=True):
        assert item_name(data, a) == item_name(CONCAT, b)


def test_index_from_the_end_gives_nothing_and_past_it_raises() -> None:
    dec = decoder_for(NAMES)
    ix = dec.index(CONCAT, MAX, start=len(CONCAT))
    assert (ix.n, ix.consumed, ix.error) == (0, len(CONCAT), 0)
    with pytest.raises(ValueError, match="cannot decode from"):
        dec.index(CONCAT, MAX, start=len(CONCAT) + 1)


@pytest.mark.parametrize("typecode", ["I", "L", "q", "d", "B"])
def test_acks_for_refuses_ids_that_are_not_uint64(typecode: str) -> None:
    """C reads 16 bytes per (sid, fid): an array('I') of the right length
    would be read past its end."""
    score = set_var("sess", "s", 1)
    WIRES.action_wire(score)
    for n in (1, 2):
        ids = array(typecode, [1] * (2 * n))
        with pytest.raises(TypeError, match="array\\('Q'\\)"):
            Encoder().acks_for(ids, [score] * n, MAX)


# ------------------------------------------------------------ whole NOTIFYs of any size


@pytest.mark.parametrize("n_messages", [1, 127, 128, 300, 2000])
def test_whole_notify_messages_grows_its_records_until_they_fit(n_messages: int) -> None:
    """Records start at 256 and grow: a payload of many items decodes whole."""
    msgs = [("m", [("", i), ("s", String(b"x" * (i % 7)))]) for i in range(n_messages)]
    frame = REFERENCE.notify_frame(9, 1, messages=msgs)
    got = whole_notify_messages(frame)
    assert [(m.name, m[0], m["s"]) for m in got] == [(n, a[0][1], a[1][1]) for n, a in msgs]


def test_whole_notify_messages_refuses_a_malformed_payload() -> None:
    frame = bytearray(REFERENCE.notify_frame(9, 1, messages=[("m", [("", 1)] * 3)] * 100))
    frame[-2] = 0x0F  # a reserved type code in the last argument
    with pytest.raises(CodecError) as e:
        whole_notify_messages(bytes(frame))
    assert e.value.status == Status.INVALID


def test_index_checks_what_c_returns() -> None:
    """A names list C refuses raises: it never leaves the previous call's
    counts and records to be read as this call's."""
    dec = decoder_for(NAMES)
    assert dec.index(CONCAT, MAX).n > 0
    dec.batch.n_names += 1  # the list no longer holds n_names names
    with pytest.raises(CodecError) as e:
        dec.index(CONCAT, MAX)
    assert e.value.status == Status.INVALID

"""Codec benchmark: decode check-client-ip NOTIFYs and encode their ACKs.

    .venv/bin/python bench/bench_codec.py [--frames 16] [--repeat 7] [--seconds 0.2]

One batch = the frames a worker gets from one read (--frames NOTIFY frames,
HAProxy 2.6-style stream ids from 1000 up, so two-byte varints) -> decode,
read each message's IPv4 argument, pick a score from it, encode all ACKs.
Three paths do the same work on the same bytes:

  (a) spoa_mp.codec directly: Decoder.index, notify_messages(), Encoder.acks_for
  (b) spoa_mp.protocol.AgentConnection: feed -> ack_for -> data_to_send
  (c) bench/pure_codec.py, a plain pure-Python codec (the baseline)

and must produce byte-identical ACKs. Each figure is the median of --repeat
runs; a run repeats the batch enough times to last >= --seconds. Runs of the
different paths are interleaved so that drift affects them alike. The garbage
collector stays enabled, as in a worker.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pure_codec as pure

from spoa_mp.codec import Decoder, Encoder, notify_messages
from spoa_mp.model import set_var
from spoa_mp.protocol import AgentConnection, HandshakeDone

ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILES = (
    Path("/work/shared/vectors/spop-vectors.json"),
    ROOT / "tests" / "data" / "spop-vectors.json",
)
MAX_FRAME_SIZE = 16380
N_SCORES = 101


# ------------------------------------------------------------ vector checks


ONE_NOTIFY_NS = 2500  # (b) at --frames 1
ONE_NOTIFY_VS_PURE = 0.5


def _vector_value(type_code: int, value: Any) -> Any:
    """A vector's JSON value as the pure codec decodes it."""
    if type_code == pure.T_IPV4:
        return IPv4Address(value)
    if type_code == pure.T_IPV6:
        return IPv6Address(value)
    if type_code == pure.T_STRING:
        return value.encode()
    if type_code == pure.T_BINARY:
        return bytes.fromhex(value["bytes_hex"])
    return value


def _typed(type_code: int, value: Any) -> pure.Typed:
    return pure.Typed(type_code, _vector_value(type_code, value))


def check_pure_codec_against_vectors() -> tuple[Path, int]:
    """Round-trip every vector through the pure codec (decode and encode)."""
    path = next(p for p in VECTOR_FILES if p.exists())
    vectors = json.loads(path.read_text())
    checked = 0
    for v in vectors["varints"]:
        raw = bytes.fromhex(v["hex"])
        assert pure.encode_varint(v["value"]) == raw, v
        assert pure.decode_varint(raw, 0) == (v["value"], len(raw)), v
        checked += 1
    for h in vectors["truncated_varints_hex"]:
        try:
            pure.decode_varint(bytes.fromhex(h), 0)
        except pure.SpopError:
            checked += 1
        else:
            raise AssertionError(f"truncated varint {h!r} accepted")
    for v in vectors["frames"]:
        raw = bytes.fromhex(v["hex"])
        want = v["decoded"]
        frames, consumed = pure.decode_frames(raw)
        assert consumed == len(raw), v["name"]
        assert len(frames) == 1, v["name"]
        (frame,) = frames
        type_, sid, fid = want["type"], want["sid"], want["fid"]
        if type_ == pure.NOTIFY:
            expected = [
                (name, [(a, _vector_value(t, x)) for a, t, x in args])
                for name, args in want["messages"]
            ]
            assert frame == (sid, fid, expected), v["name"]
            typed = [
                (name, [(a, _typed(t, x)) for a, t, x in args]) for name, args in want["messages"]
            ]
            assert pure.encode_notify(sid, fid, typed) == raw, v["name"]
        elif type_ == pure.ACK:
            expected_actions: list[tuple[Any, ...]] = []
            encode_actions: list[tuple[Any, ...]] = []
            for act in want["actions"]:
                if act[0] == "set-var":
                    _, scope, name, t, x = act
                    expected_actions.append((1, scope, name.encode(), _vector_value(t, x)))
                    encode_actions.append((scope, name, _typed(t, x)))
                else:
                    _, scope, name = act
                    expected_actions.append((2, scope, name.encode()))
                    encode_actions.append((scope, name))
            assert frame == (type_, want["flags"], sid, fid, expected_actions), v["name"]
            assert pure.encode_ack(sid, fid, encode_actions) == raw, v["name"]
        elif "kv" in want:
            kv = [(k, _vector_value(t, x)) for k, t, x in want["kv"]]
            assert frame == (type_, want["flags"], sid, fid, kv), v["name"]
            typed_kv = [(k, _typed(t, x)) for k, t, x in want["kv"]]
            assert pure.encode_kv_frame(type_, typed_kv) == raw, v["name"]
        else:
            assert frame == (
                type_,
                want["flags"],
                sid,
                fid,
                bytes.fromhex(want["raw"]["bytes_hex"]),
            )
        checked += 1
    # the plain-int default (UINT32) must match the reference encoder too
    assert pure.encode_ack(20, 1, [("sess", "ip_score", 42)]).hex() == next(
        f["hex"] for f in vectors["frames"] if f["name"] == "ack set-var sess ip_score uint32 42"
    )
    return path, checked


# ------------------------------------------------------------ workload


def build_batch(n_frames: int) -> tuple[bytes, list[IPv4Address], bytes]:
    """n NOTIFY check-client-ip frames (one unnamed IPv4 arg), and a HELLO."""
    encoder = Encoder()
    frames = []
    ips = []
    for k in range(n_frames):
        sid = 1000 + 7 * k  # HAProxy 2.6 stream uniq_ids: two-byte varints
        fid = 1 + k % 3
        ip = IPv4Address((0x0A000001 + k * 2654435761) & 0xFFFFFFFF)
        msgs = [("check-client-ip", [("", ip)])]
        frame = encoder.notify_frame(sid, fid, messages=msgs)
        assert frame == pure.encode_notify(sid, fid, msgs), "encoders disagree"
        frames.append(frame)
        ips.append(ip)
    vectors = json.loads(next(p for p in VECTOR_FILES if p.exists()).read_text())
    hello = bytes.fromhex(
        next(f["hex"] for f in vectors["frames"] if f["name"] == "haproxy-hello 2.6")
    )
    return b"".join(frames), ips, hello


def score(ip: IPv4Address) -> int:
    return int(ip) % N_SCORES


def make_paths(buf: bytes, hello: bytes) -> dict[str, Callable[[], bytes]]:
    actions = [set_var("sess", "ip_score", s) for s in range(N_SCORES)]
    pure_actions = [("sess", "ip_score", s) for s in range(N_SCORES)]

    names = ("check-client-ip",)  # the handlers' names, matched in C
    decoder = Decoder(names=names)
    index = decoder.index
    acks_for = Encoder().acks_for

    def c_codec() -> bytes:
        ix = index(buf, MAX_FRAME_SIZE)
        msgs = notify_messages(buf, ix, names)
        replies = [actions[int(msg[0]) % N_SCORES] for msg in msgs]
        return acks_for(ix.ids, replies, MAX_FRAME_SIZE)[0]

    conn = AgentConnection(decoder=Decoder(names=names))
    assert not conn.receive(hello)
    assert isinstance(conn.take_events()[0], HandshakeDone)
    conn.data_to_send()  # the AGENT-HELLO

    def protocol() -> bytes:
        notes = conn.feed(buf)
        conn.ack_for(notes.ids, [actions[int(msg[0]) % N_SCORES] for msg in notes.messages])
        return conn.data_to_send()

    def pure_python() -> bytes:
        frames, _consumed = pure.decode_frames(buf)
        out = []
        for sid, fid, msgs in frames:
            ip = msgs[0][1][0][1]
            out.append(pure.encode_ack(sid, fid, [pure_actions[int(ip) % N_SCORES]]))
        return b"".join(out)

    # parts of (a), each on its own
    ix = index(buf, MAX_FRAME_SIZE)
    msgs = notify_messages(buf, ix, names)
    replies = [actions[score(msg[0])] for msg in msgs]
    ids = ix.ids

    def part_decode() -> bytes:
        index(buf, MAX_FRAME_SIZE)
        return b""

    def part_messages() -> bytes:
        for msg in notify_messages(buf, ix, names):
            msg[0]  # reading the value is the work
        return b""

    def part_acks() -> bytes:
        return acks_for(ids, replies, MAX_FRAME_SIZE)[0]

    return {
        "c": c_codec,
        "protocol": protocol,
        "pure": pure_python,
        "decode": part_decode,
        "messages": part_messages,
        "acks": part_acks,
    }


def check_same_output(buf: bytes, ips: list[IPv4Address], paths: dict[str, Callable[[], bytes]]):
    """All three paths give the same ACK bytes, and they are the right ACKs."""
    out_c, out_protocol, out_pure = paths["c"](), paths["protocol"](), paths["pure"]()
    assert out_c == out_protocol == out_pure, "ACK bytes differ between paths"
    assert paths["acks"]() == out_c
    frames, consumed = pure.decode_frames(buf)
    assert consumed == len(buf)
    assert [m[0][1][0][1] for _, _, m in frames] == ips
    expected = b"".join(
        pure.encode_ack(sid, fid, [("sess", "ip_score", score(ip))])
        for (sid, fid, _), ip in zip(frames, ips, strict=True)
    )
    assert out_c == expected
    acks, consumed = pure.decode_frames(out_c)
    assert consumed == len(out_c)
    assert len(acks) == len(ips)
    return len(out_c)


# ------------------------------------------------------------ timing


def run(fn: Callable[[], bytes], number: int) -> float:
    loop = itertools.repeat(None, number)
    t0 = time.perf_counter()
    for _ in loop:
        fn()
    return time.perf_counter() - t0


def calibrate(fn: Callable[[], bytes], min_seconds: float) -> int:
    """A loop count that makes one run last at least min_seconds (timeit-like)."""
    number = 1
    while True:
        elapsed = run(fn, number)
        if elapsed >= min_seconds:
            return number
        if elapsed < min_seconds / 100:
            number *= 10
        else:
            number = int(number * min_seconds * 1.2 / elapsed) + 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="NOTIFY frames per read (16)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per path; median (7)")
    parser.add_argument(
        "--seconds", type=float, default=0.2, help="minimum duration of one run (0.2)"
    )
    args = parser.parse_args()
    if args.frames < 1 or args.repeat < 1 or args.seconds <= 0:
        parser.error("--frames, --repeat and --seconds must be positive")

    print("command:", shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))
    print(
        f"python:  {sys.version.split()[0]} ({platform.python_implementation()}, {sys.executable})"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cpu:     {cpu_model()} ({os.cpu_count()} logical CPUs; load average {load})")

    vector_file, checked = check_pure_codec_against_vectors()
    print(f"pure codec: {checked} vectors of {vector_file} round-trip (decode and encode)")

    buf, ips, hello = build_batch(args.frames)
    paths = make_paths(buf, hello)
    ack_bytes = check_same_output(buf, ips, paths)
    print(
        f"batch:   {args.frames} NOTIFY check-client-ip (IPv4) = {len(buf)} bytes in, "
        f"{ack_bytes} bytes of ACK out; ACKs byte-identical on all paths"
    )

    numbers = {name: calibrate(fn, args.seconds) for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeat):
        for name, fn in paths.items():
            times[name].append(run(fn, numbers[name]) / (numbers[name] * args.frames) * 1e9)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"timing:  median of {args.repeat} runs of >= {args.seconds} s each, "
        "paths interleaved, gc enabled"
    )
    print()

    rows = [
        ("(a) spoa_mp.codec (C via cffi)", "c"),
        ("(b) spoa_mp.protocol.AgentConnection", "protocol"),
        ("(c) pure-Python codec", "pure"),
    ]
    base = median["pure"]
    print(f"{'path':<38} {'ns/message':>10} {'messages/s':>12} {'vs pure':>8}   min..max ns")
    for label, name in rows:
        ns = median[name]
        spread = f"{min(times[name]):.0f}..{max(times[name]):.0f}"
        print(f"{label:<38} {ns:>10.0f} {1e9 / ns:>12,.0f} {base / ns:>7.1f}x   {spread}")
    print()
    print("(a) split, ns/message:")
    for label, name in (
        ("decode + index (Decoder.index)", "decode"),
        ("notify_messages() + msg[0] value", "messages"),
        ("ACK encode only (Encoder.acks_for)", "acks"),
    ):
        print(f"  {label:<36} {median[name]:>8.0f}")
    parts = median["decode"] + median["messages"] + median["acks"]
    print(f"  {'sum of parts':<36} {parts:>8.0f}   (rest of (a): handler glue)")
    print()
    if args.frames == 1:  # issue 10's target for the one-NOTIFY read of HAProxy 3.x
        ns = median["protocol"]
        ok_ns = "met" if ns <= ONE_NOTIFY_NS else "NOT met"
        ok_x = "met" if ns <= ONE_NOTIFY_VS_PURE * base else "NOT met"
        print(
            f"target (b), one NOTIFY per read: <= {ONE_NOTIFY_NS} ns {ok_ns}; "
            f"<= {ONE_NOTIFY_VS_PURE}x the pure-Python codec {ok_x} ({ns / base:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

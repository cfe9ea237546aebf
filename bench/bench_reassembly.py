"""Reassembly benchmark: a fragmented 1 MiB NOTIFY against the same messages
in whole frames, through AgentConnection.feed.

    .venv/bin/python bench/bench_reassembly.py [--repeat 5] [--mib 1]

The payload is --mib MiB of check-client-ip messages (an IPv4, a 100-byte
string and an integer each). "fragmented" sends them as one NOTIFY split at
max-frame-size 16380 (NOTIFY without FIN, then UNSET frames, as HAProxy
<= 3.0 does); "whole" sends the same messages as whole NOTIFY frames of at
most 16380 bytes. Both are fed in 64 KiB reads and every message's first
argument is read. Time: median of --repeat runs, the modes interleaved.
Peak memory: a fresh process per mode, the peak of tracemalloc (which sees
cffi's ffi.new too) while feeding, the input bytes not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from ipaddress import IPv4Address
from pathlib import Path

from spoa_mp.codec import Encoder, FrameType
from spoa_mp.model import String
from spoa_mp.protocol import AgentConnection, AgentSettings

FRAME = 16380
READ = 64 * 1024
HELLO = bytes.fromhex(
    next(
        f["hex"]
        for f in json.loads(
            (Path(__file__).resolve().parent.parent / "tests/data/spop-vectors.json").read_text()
        )["frames"]
        if f["name"] == "haproxy-hello 2.6"
    )
)


def message(i: int) -> tuple[str, list[tuple[str, object]]]:
    ip = IPv4Address((0x0A000001 + i * 2654435761) & 0xFFFFFFFF)
    return ("check-client-ip", [("ip", ip), ("ua", String(b"u" * 100)), ("n", i)])


def build(mib: float) -> tuple[bytes, bytes, int, int]:
    """(fragmented stream, whole-frame stream, payload bytes, messages)."""
    enc = Encoder()
    limit = int(mib * (1 << 20))
    payload = bytearray()
    whole = bytearray()
    group: list[tuple[str, list[tuple[str, object]]]] = []
    i = 0
    while True:
        one = enc.notify_frame(1, 1, messages=[message(i)])[11:]  # its payload
        if len(payload) + len(one) > limit:
            break
        payload += one
        if len(enc.notify_frame(1, 1, messages=[*group, message(i)])) - 4 > FRAME:
            whole += enc.notify_frame(1 + i, 1, messages=group)
            group = []
        group.append(message(i))
        i += 1
    whole += enc.notify_frame(1 + i, 1, messages=group)
    room = FRAME - 5 - 2  # type, flags and two one-byte ids
    parts = [payload[a : a + room] for a in range(0, len(payload), room)]
    frag = bytearray(enc.raw_frame(FrameType.NOTIFY, 1, 1, payload=bytes(parts[0]), flags=0))
    for k, part in enumerate(parts[1:], start=2):
        flags = 1 if k == len(parts) else 0
        frag += enc.raw_frame(FrameType.UNSET, 1, 1, payload=bytes(part), flags=flags)
    return bytes(frag), bytes(whole), len(payload), i


def feed(stream: bytes) -> int:
    conn = AgentConnection(AgentSettings(max_reassembled_size=1 << 20))
    conn.feed(HELLO)
    conn.take_events()  # HandshakeDone
    read = 0
    for at in range(0, len(stream), READ):
        for msgs in conn.feed(stream[at : at + READ]).messages:
            msgs[0]
            read += 1
    assert not conn.take_events(), "a protocol error"
    return read


def child(mode: str, mib: float) -> None:
    frag, whole, _, n = build(mib)
    stream = frag if mode == "fragmented" else whole
    del frag, whole
    tracemalloc.start()  # after building: the input is not counted
    before = tracemalloc.get_traced_memory()[0]
    assert feed(stream) == n
    print(tracemalloc.get_traced_memory()[1] - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--child", choices=["fragmented", "whole"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mib)
        return 0
    frag, whole, size, n = build(args.mib)
    print(f"payload: {size} bytes, {n} messages; fragmented {len(frag)} bytes, whole {len(whole)}")
    assert feed(frag) == feed(whole) == n
    times: dict[str, list[float]] = {"fragmented": [], "whole": []}
    for _ in range(args.repeat):
        for mode, stream in (("fragmented", frag), ("whole", whole)):
            t0 = time.perf_counter()
            feed(stream)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    for mode in times:
        peak = int(
            subprocess.run(
                [sys.executable, __file__, "--child", mode, "--mib", str(args.mib)],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        print(
            f"{mode:<11} {med[mode] * 1e3:8.1f} ms (median of {args.repeat})   "
            f"peak {peak / (1 << 20):.2f} MiB = {peak / size:.2f}x the payload"
        )
    ratio = med["fragmented"] / med["whole"]
    print(f"fragmented / whole: {ratio:.2f}x time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

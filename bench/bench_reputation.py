#!/usr/bin/env python3
"""Benchmark spoa_mp.reputation: load time and lookup cost versus table size.

    python bench/bench_reputation.py                 # 1k, 10k, 100k, 1M entries, IPv4 and IPv6
    python bench/bench_reputation.py --entries 200000 --sizes 1000 --rounds 5

Prints the time to load a generated 1M-line file, then the median nanoseconds per lookup
(integer fast paths, Python loop and call included) for tables of each size and family, with
two query patterns: "random" addresses spread over the whole table (every lookup misses the CPU
caches once the table outgrows them) and "hot", a set of 1000 addresses repeated (cache-resident,
like real traffic where clients come back), and the large/small ratios. The lookup does the same
bounded work whatever the file size, so the hot ratio stays near 1; the random one shows memory
latency, which plateaus once the table is out of cache instead of growing with its size.
Timings are interleaved over rounds so that background load hits all configurations alike.
Unless --no-cow, it also forks a child that runs the lookups and reports how much private memory
that dirtied, to show the table is copy-on-write friendly.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoa_mp.reputation import ReputationTable

# (prefix length, weight): a rough shape of real lists, mostly hosts and /24s or /64s, a few
# wider blocks so that some prefixes nest.
V4_LENGTHS = [(32, 60), (24, 28), (20, 6), (16, 4), (12, 1.5), (8, 0.5)]
V6_LENGTHS = [(128, 40), (64, 30), (56, 10), (48, 12), (32, 6), (24, 2)]


def generate(
    rng: random.Random, count: int, family: int
) -> tuple[list[str], list[tuple[int, int]]]:
    """Random prefixes as file lines, plus (network, prefixlen) to draw hitting queries from."""
    width = 32 if family == socket.AF_INET else 128
    lengths, weights = zip(*(V4_LENGTHS if width == 32 else V6_LENGTHS), strict=True)
    plens = rng.choices(lengths, weights, k=count)
    size = width // 8
    lines = []
    nets = []
    for plen in plens:
        # IPv6 drawn from global unicast, 2000::/3, like real lists.
        addr = rng.getrandbits(32) if width == 32 else 1 << 125 | rng.getrandbits(125)
        net = addr >> (width - plen) << (width - plen)
        text = socket.inet_ntop(family, net.to_bytes(size, "big"))
        lines.append(f"{text}/{plen} {rng.randrange(101)}\n")
        nets.append((net, plen))
    return lines, nets


def queries(rng: random.Random, nets: list[tuple[int, int]], count: int, width: int) -> list[int]:
    """Half addresses inside listed prefixes (hits), half random ones (mostly misses)."""
    out = []
    for _ in range(count // 2):
        net, plen = rng.choice(nets)
        out.append(net | rng.getrandbits(width - plen) if plen < width else net)
        out.append(rng.getrandbits(32) if width == 32 else 1 << 125 | rng.getrandbits(125))
    rng.shuffle(out)
    return out


def time_lookups(fn: Callable[[int], int | None], addrs: list[int]) -> float:
    start = time.perf_counter_ns()
    for addr in addrs:
        fn(addr)
    return (time.perf_counter_ns() - start) / len(addrs)


def private_dirty_kib() -> int | None:
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(
        int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_Dirty:")
    )


def cow_check(jobs: list[tuple[ReputationTable, str, list[int]]]) -> None:
    """Fork like the supervisor does and measure what worker lookups dirty privately."""
    if private_dirty_kib() is None or not hasattr(os, "fork"):
        print("copy-on-write check skipped (needs Linux /proc/self/smaps_rollup)")
        return
    gc.collect()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        os.close(read_fd)
        try:
            os.write(write_fd, _child_dirty(jobs).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        baseline, delta = pipe.read().split()
    os.waitpid(pid, 0)
    total = sum(len(addrs) for _, _, addrs in jobs)
    size = sum(t.nbytes() for t in {id(t): t for t, _, _ in jobs}.values()) / 1048576
    print(
        f"copy-on-write: {total} lookups in a forked child dirtied {delta} KiB of private "
        f"memory (tables: {size:.1f} MiB; iterating the query lists alone: {baseline} KiB)"
    )


def _child_dirty(jobs: list[tuple[ReputationTable, str, list[int]]]) -> str:
    # First pass with a no-op: iterating the query lists (built in the parent) dirties their
    # own pages through refcounts; that is the benchmark's doing, not the table's.
    start = private_dirty_kib() or 0
    for _, _, addrs in jobs:
        for addr in addrs:
            _noop(addr)
    mid = private_dirty_kib() or 0
    for table, method, addrs in jobs:
        fn = getattr(table, method)
        for addr in addrs:
            fn(addr)
    end = private_dirty_kib() or 0
    return f"{mid - start} {end - mid}"


def _noop(addr: int) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="large table size")
    parser.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="smaller table sizes to time too, comma-separated; the first is the ratio baseline",
    )
    parser.add_argument("--queries", type=int, default=100_000, help="lookups per timing")
    parser.add_argument("--rounds", type=int, default=9, help="timings per configuration")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-cow", action="store_true", help="skip the fork/COW check")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    rng = random.Random(args.seed)

    tables: dict[str, ReputationTable] = {}  # "v4 1000" -> table
    work: dict[str, tuple[str, str, list[int]]] = {}  # "v4 1000 hot" -> (table, method, addrs)
    with tempfile.TemporaryDirectory(prefix="bench-reputation-") as tmp:
        for family, tag, width in ((socket.AF_INET, "v4", 32), (socket.AF_INET6, "v6", 128)):
            pools = {}
            for size in sizes:
                lines, pools[size] = generate(rng, size, family)
                tables[f"{tag} {size}"] = ReputationTable.from_lines(lines, f"<{size} lines>")
            lines, pools[args.entries] = generate(rng, args.entries, family)
            path = Path(tmp, f"{tag}.txt")
            path.write_text("".join(lines))
            del lines
            start = time.perf_counter()
            tables[f"{tag} {args.entries}"] = large = ReputationTable.load(path)
            elapsed = time.perf_counter() - start
            print(f"load {args.entries} {tag} lines: {elapsed:.2f} s  ({large.summary()})")
            for size, pool in pools.items():
                addrs = queries(rng, pool, args.queries, width)
                work[f"{tag} {size} random"] = (f"{tag} {size}", f"lookup_{tag}", addrs)
                # Real traffic repeats clients: a hot set of 1000 addresses stays in cache.
                hot = addrs[:1000] * (args.queries // 1000)
                work[f"{tag} {size} hot"] = (f"{tag} {size}", f"lookup_{tag}", hot)
            del pools, pool

    samples: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(args.rounds):
        for name, (table, method, addrs) in work.items():
            samples[name].append(time_lookups(getattr(tables[table], method), addrs))
    addrs = work[f"v4 {sizes[0]} random"][2]
    baseline = statistics.median(time_lookups(_noop, addrs) for _ in range(3))

    print(
        f"\nns per lookup, median (min) of {args.rounds} interleaved rounds of {args.queries}"
        f" lookups; a no-op call in the same loop costs {baseline:.0f} ns:"
    )
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        table = tables[work[name][0]]
        print(
            f"  {name:18} {len(table):>9} prefixes {table.nbytes() / 1024:>8.0f} KiB "
            f"{value:6.0f} ns  ({min(samples[name]):.0f})"
        )
    for tag in ("v4", "v6"):
        for pattern in ("random", "hot"):
            large = medians[f"{tag} {args.entries} {pattern}"]
            ratio = large / medians[f"{tag} {sizes[0]} {pattern}"]
            print(f"  {tag} {pattern:6} ratio {args.entries} / {sizes[0]} entries: {ratio:.2f}")
    if not args.no_cow:
        cow_check(
            [
                (tables[table], method, addrs)
                for name, (table, method, addrs) in work.items()
                if name.endswith("random")
            ]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Handlers that wait: msg/s, latency and worker CPU per message, by kind of handler.

    .venv/bin/python bench/bench_handlers.py                  # 3 rounds of 5 s, 4x1 and 8x16
    .venv/bin/python bench/bench_handlers.py --rounds 1 --duration 1 --kinds sync redis-batched
    .venv/bin/python bench/bench_handlers.py --loops asyncio uvloop   # both loops, side by side
    .venv/bin/python bench/bench_handlers.py --json > handlers.json

Kinds (bench/handler_kinds.py; the Redis ones are examples/redis_scores.py):

    sync            a plain function returning a prebuilt Action
    eager           an `async def` that never suspends
    sleep-1ms       an `async def` awaiting asyncio.sleep(0.001)
    redis-message   redis_scores:per_message, one GET per message (redis.asyncio)
    redis-coalesced redis_scores:coalesced, per message, one MGET per loop turn
    redis-batched   redis_scores:batched, one MGET per read (on_batch)

Each kind is served by `python -m spoa_mp -n W --app ...` (W = --workers, 2)
and loaded by `spoa-mp bench -p PORT -c C -P P -d D --json` for every shape
CxP (4x1 and 8x16: C connections, P NOTIFYs in flight on each). The
addresses are random, so Redis lookups miss (a round trip all the same). A
real redis-server (--port free, --save '') is started by the script; the
Redis kinds' deadline is raised to 1 s (SPOA_REDIS_TIMEOUT) so that under
full load the fallback does not answer for Redis.

Kinds are interleaved over --rounds (the order rotates each round), so drift
hits them alike; figures are medians over rounds: msg/s, p50/p99 of the
generator's latency, the workers' CPU (psutil cpu_times of the worker
processes, before/after each run, warmup included) per message ACKed, and
Redis's. "others" is the CPU the rest of the machine used during the run,
in cores: the machine is shared, a busy neighbour shows there.

Everything listens on 127.0.0.1; every process started is stopped by its pid
(process group) at the end, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs as P  # noqa: N812  (bench/ is not a package)
from _procs import START_TIMEOUT, Proc, cpu_seconds, free_port, machine_busy, wait_for
from support.redis_server import RedisServer  # tests/ is on sys.path: _procs puts it there

KINDS = {
    "sync": "handler_kinds:sync",
    "eager": "handler_kinds:eager",
    "sleep-1ms": "handler_kinds:sleep",
    "redis-message": "redis_scores:per_message",
    "redis-coalesced": "redis_scores:coalesced",
    "redis-batched": "redis_scores:batched",
}
SHAPES = ("4x1", "8x16")
READY = re.compile(r"worker \d+ ready \(pid (\d+)\)")


def start_agent(
    kind: str, loop: str, workers: int, tmp: Path, redis_url: str
) -> tuple[Proc, int, list]:
    port = free_port()
    env = dict(os.environ)
    # this checkout's spoa_mp first, whatever is installed: old and new can be paired
    env["PYTHONPATH"] = os.pathsep.join(str(P.REPO / d) for d in ("", "bench", "examples"))
    env["SPOA_REDIS_URL"] = redis_url
    env["SPOA_REDIS_TIMEOUT"] = "1"
    argv = [sys.executable, "-m", "spoa_mp", "-p", str(port), "-n", str(workers), "--loop", loop]
    (tmp / f"agent-{kind}.log").unlink(missing_ok=True)
    proc = Proc(f"agent-{kind}", [*argv, "--app", KINDS[kind]], tmp, cwd=tmp, env=env)
    log = proc.log

    def ready() -> list[int] | None:
        proc.check_alive()
        pids = [int(m) for m in READY.findall(log.read_text(errors="replace"))]
        return pids if len(pids) >= workers else None

    pids = wait_for(ready, START_TIMEOUT, f"{workers} workers of {kind}")
    return proc, port, [psutil.Process(p) for p in pids]


def run_load(port: int, shape: str, duration: float, warmup: float) -> dict[str, Any]:
    c, p = shape.split("x")
    argv = [sys.executable, "-m", "spoa_mp", "bench", "-p", str(port), "-c", c, "-P", p]
    argv += ["-d", str(duration), "--warmup", str(warmup), "--json", "-q"]
    out = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=duration + warmup + 60
    )
    if out.returncode != 0:
        raise RuntimeError(f"spoa-mp bench failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure(
    kind: str, shape: str, port: int, workers: list, redis: RedisServer, args: argparse.Namespace
) -> dict[str, Any]:
    me = [psutil.Process()]
    cpu0, redis0, busy0, own0 = (
        cpu_seconds(workers),
        cpu_seconds([redis.ps]),
        machine_busy(),
        cpu_seconds(me),
    )
    result = run_load(port, shape, args.duration, args.warmup)
    worker_cpu = cpu_seconds(workers) - cpu0
    redis_cpu = cpu_seconds([redis.ps]) - redis0
    ours = worker_cpu + redis_cpu + (cpu_seconds(me) - own0)
    loadgen = result["cpu_user"] + result["cpu_sys"]
    others = (machine_busy() - busy0) - ours - loadgen
    acked = max(1, result["acked"])
    return {
        "kind": kind,
        "shape": shape,
        "msg_per_s": result["msg_per_s"],
        "p50_us": result["latency_us"].get("p50", 0.0),
        "p99_us": result["latency_us"].get("p99", 0.0),
        "worker_cpu_us_per_msg": 1e6 * worker_cpu / acked,
        "redis_cpu_us_per_msg": 1e6 * redis_cpu / acked,
        "others_cores": max(0.0, others / result["wall"]),
        "errors": result["errors"],
        "acked": result["acked"],
    }


def summarize(
    runs: list[dict[str, Any]], kinds: list[str], shapes: list[str], loops: list[str]
) -> list[dict]:
    rows = []
    keys = ("msg_per_s", "p50_us", "p99_us", "worker_cpu_us_per_msg", "redis_cpu_us_per_msg")
    for shape, kind, loop in itertools.product(shapes, kinds, loops):
        mine = [r for r in runs if (r["kind"], r["shape"], r["loop"]) == (kind, shape, loop)]
        if mine:
            row = {"kind": kind, "shape": shape, "loop": loop, "runs": len(mine)}
            row.update({k: statistics.median(r[k] for r in mine) for k in keys})
            row["others_cores"] = max(r["others_cores"] for r in mine)
            row["errors"] = sum(r["errors"] for r in mine)
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'shape':<6}{'kind':<15}{'loop':<9}{'msg/s':>10}{'p50 µs':>9}{'p99 µs':>9}"
        f"{'worker µs/msg':>15}{'redis µs/msg':>14}{'others':>8}{'errors':>8}"
    )
    lines = [head]
    lines += [
        (
            f"{r['shape']:<6}{r['kind']:<15}{r['loop']:<9}{r['msg_per_s']:>10,.0f}{r['p50_us']:>9,.0f}"
            f"{r['p99_us']:>9,.0f}{r['worker_cpu_us_per_msg']:>15.1f}"
            f"{r['redis_cpu_us_per_msg']:>14.1f}{r['others_cores']:>8.2f}{r['errors']:>8}"
        )
        for r in rows
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="CxP (default 4x1 8x16)")
    p.add_argument("--workers", "-n", type=int, default=2, help="spoa-mp workers (default 2)")
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds per run (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every kind (3)")
    p.add_argument(
        "--loops",
        nargs="+",
        choices=("auto", "asyncio", "uvloop"),
        default=["auto"],
        help="the workers' --loop, each kind run on each in turn (default auto)",
    )
    p.add_argument("--json", action="store_true", help="print runs and medians as JSON")
    args = p.parse_args(argv)
    for shape in args.shapes:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", shape):
            p.error(f"a shape is CxP, e.g. 8x16, not {shape!r}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-handlers-") as d:
        tmp = Path(d)
        redis = RedisServer(tmp).start()
        url = redis.url
        try:
            for rnd in range(args.rounds):
                k = rnd % len(args.kinds)
                kinds = args.kinds[k:] + args.kinds[:k]  # rotate: drift hits all alike
                for kind, loop in itertools.product(kinds, args.loops):
                    agent, port, workers = start_agent(kind, loop, args.workers, tmp, url)
                    try:
                        for shape in args.shapes:
                            run = measure(kind, shape, port, workers, redis, args)
                            run["round"], run["loop"] = rnd, loop
                            runs.append(run)
                            print(
                                f"round {rnd + 1} {shape:<5} {kind:<14} {loop:<8} "
                                f"{run['msg_per_s']:>10,.0f} msg/s",
                                file=sys.stderr,
                            )
                    finally:
                        agent.shutdown()
        finally:
            redis.stop()
    rows = summarize(runs, args.kinds, args.shapes, args.loops)
    if args.json:
        cmd = " ".join(["bench/bench_handlers.py", *argv])
        print(json.dumps({"command": cmd, "medians": rows, "runs": runs}, indent=2))
    else:
        print(format_table(rows))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

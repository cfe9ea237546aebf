"""What the event loop and redis-py cost on their own, without spoa-mp: the
floors under bench_handlers.py's sleep-1ms and redis-message kinds.

    .venv/bin/python bench/bench_floors.py [--loops asyncio uvloop] [--tasks 64] [-d 3]

For each loop, in one process (as one worker):
  sleep      --tasks tasks each looping on `await asyncio.sleep(0.001)`: how
             long the sleep really lasts, so the ceiling of --tasks streams
             that each wait 1 ms;
  redis-get  --tasks tasks each looping on one redis.asyncio GET against a
             real redis-server (started here on a free 127.0.0.1 port): GET/s
             and the client's CPU per GET.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import _procs  # noqa: F401  (puts tests/ on sys.path)
from support.redis_server import RedisServer

SLEEP = 0.001


async def _loop_tasks(tasks: int, seconds: float, step: Callable[[], Awaitable[object]]) -> tuple:
    """Run `tasks` tasks calling step() until `seconds` pass: (steps, wall, cpu)."""
    done = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await step()
            done += 1

    wall, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(one() for _ in range(tasks)))
    return done, time.monotonic() - wall, time.process_time() - cpu


async def sleep_floor(tasks: int, seconds: float) -> str:
    n, wall, cpu = await _loop_tasks(tasks, seconds, lambda: asyncio.sleep(SLEEP))
    mean = tasks * wall / n
    return (
        f"{n / wall:>10,.0f} sleeps/s   asyncio.sleep({SLEEP}) lasts {mean * 1e3:.2f} ms"
        f" on average (the most {tasks} streams waiting 1 ms each can do);"
        f" {cpu / n * 1e6:.1f} µs CPU each"
    )


async def redis_floor(tasks: int, seconds: float, url: str) -> str:
    from redis.asyncio import Redis  # noqa: PLC0415 - the test extra

    client = Redis.from_url(url, max_connections=2 * tasks)
    try:
        await client.set("iprep:192.0.2.7", 5)
        n, wall, cpu = await _loop_tasks(tasks, seconds, lambda: client.get("iprep:192.0.2.7"))
    finally:
        await client.aclose()
    return f"{n / wall:>10,.0f} GET/s      {cpu / n * 1e6:.1f} µs of client CPU per GET"


def run_on(loop: str, coro: Awaitable[str]) -> str:
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"])
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks (64)")
    parser.add_argument("--duration", "-d", type=float, default=3.0, help="seconds per run (3)")
    parser.add_argument("--no-redis", action="store_true", help="the sleep floor only")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="bench-floors-") as tmp:
        redis = None if args.no_redis else RedisServer(Path(tmp)).start()
        try:
            for loop in args.loops:
                line = run_on(loop, sleep_floor(args.tasks, args.duration))
                print(f"{loop:<8} sleep      {line}")
                if redis is not None:
                    line = run_on(loop, redis_floor(args.tasks, args.duration, redis.url))
                    print(f"{loop:<8} redis-get  {line}")
        finally:
            if redis is not None:
                redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

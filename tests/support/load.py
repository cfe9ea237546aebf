"""Load generators as real processes (`Process`): `spoa-mp bench --json` and
wrk, and what they print."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.processes import Process, child_env


def spoa_bench(port: int, log_dir: Path, *args: str, name: str = "bench") -> Process:
    """`spoa-mp bench -p PORT ARGS... --json` in the background."""
    argv = [sys.executable, "-m", "spoa_mp", "bench", "-p", str(port), *args, "--json"]
    return Process(name, argv, log_dir, env=child_env())


def bench(
    port: int, log_dir: Path, connections: int = 8, in_flight: int = 16, duration: float = 6.0
) -> Process:
    """`spoa-mp bench -p PORT -c C -P P -d D --json` in the background."""
    shape = ["-c", str(connections), "-P", str(in_flight), "-d", str(duration)]
    return spoa_bench(port, log_dir, *shape)


def bench_result(b: Process, timeout: float) -> dict[str, Any]:
    """The JSON a bench printed, once it exited (TimeoutError if it still runs)."""
    code = b.wait(timeout)
    out = b.stdout()
    assert out.strip(), f"the bench printed nothing (exit {code}):\n{b.stderr()}"
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        raise AssertionError(f"bench exited {code} without JSON:\n{out}\n{b.stderr()}") from None
    return result


def start_wrk(url: str, log_dir: Path, *args: str) -> Process:
    """`wrk ARGS... --latency URL` in the background."""
    return Process("wrk", ["wrk", *args, "--latency", url], log_dir, env=child_env())


WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(\w+),")
WRK_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class WrkResult:
    requests: int
    rate: float
    socket_errors: dict[str, int]
    non_2xx: int
    text: str


def parse_wrk(text: str) -> WrkResult:
    m = WRK_REQUESTS.search(text)
    rate = WRK_RATE.search(text)
    if m is None or rate is None:
        raise AssertionError(f"unexpected wrk output:\n{text}")
    sock = WRK_SOCKET.search(text)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock:
        errors = dict(zip(errors, map(int, sock.groups()), strict=True))
    non2xx = WRK_NON2XX.search(text)
    return WrkResult(int(m[1]), float(rate[1]), errors, int(non2xx[1]) if non2xx else 0, text)

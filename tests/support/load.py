"""Load generators: as real processes (`Process`), `spoa-mp bench --json`
and wrk, and what they print; in threads, `LoadDriver`, SPOP connections
that keep NOTIFYs in flight and time every ACK."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from support.processes import Process, child_env
from support.spop_peer import SpopClient


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


def assert_every_request_served(result: WrkResult) -> None:
    """wrk sent requests and each got a 2xx: no socket error, no non-2xx
    (a SPOE error is a 503 in the tests' HAProxy configurations)."""
    assert result.requests > 0
    assert result.socket_errors == dict.fromkeys(result.socket_errors, 0), result.text
    assert result.non_2xx == 0, result.text


# ------------------------------------------------------------------ SPOP load in threads


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float  # time.monotonic() when the NOTIFY was sent
    received: float  # ... when its ACK was decoded
    ip: int  # index into the driver's addresses
    score: object  # the ip_score set (None: no such action)


class LoadDriver:
    """`connections` SPOP connections, each in a thread, keeping `in_flight`
    NOTIFY `check-client-ip` (arg ip=, cycling through `addresses`) in flight,
    sent in one write each round so that the agent reads them together.
    Every ACK becomes an Answer; `stop()` waits for the outstanding ones."""

    def __init__(
        self,
        port: int,
        addresses: Sequence[IPv4Address],
        connections: int = 2,
        in_flight: int = 16,
        io_timeout: float = 5.0,
    ) -> None:
        self.port = port
        self.addresses = list(addresses)
        self.in_flight = in_flight
        self.io_timeout = io_timeout
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self.outstanding = [0] * connections
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._drive, args=(k,), daemon=True) for k in range(connections)
        ]

    def __enter__(self) -> LoadDriver:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def count(self, since: float, predicate: Callable[[Answer], bool]) -> int:
        return sum(1 for a in list(self.answers) if a.sent >= since and predicate(a))

    def _drive(self, k: int) -> None:
        try:
            with SpopClient(self.port, timeout=self.io_timeout) as c:
                c.hello()
                sent: dict[int, tuple[float, int]] = {}
                sid, n = 1 + k, len(self.addresses)
                while not self._stop.is_set() or sent:
                    batch = []
                    now = time.monotonic()
                    while not self._stop.is_set() and len(sent) < self.in_flight:
                        i = sid % n
                        msg = ("check-client-ip", [("ip", self.addresses[i])])
                        batch.append(c.notify_bytes(sid, 1, [msg]))
                        sent[sid] = (now, i)
                        sid += len(self.outstanding)
                    if batch:
                        c.send(b"".join(batch))
                    self.outstanding[k] = len(sent)
                    frame = c.read_frame()
                    t0, i = sent.pop(frame.sid)
                    score = next((v for _, _, name, v in frame.actions if name == "ip_score"), None)
                    self.answers.append(Answer(t0, frame.received, i, score))
                self.outstanding[k] = len(sent)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

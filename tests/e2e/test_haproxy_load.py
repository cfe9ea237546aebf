"""spoa-mp under wrk load through each HAProxy found (2.6, 3.2...).

* A worker killed with SIGKILL under load: HAProxy keeps answering (no socket
  error at wrk), only the streams in flight on the dead worker's connections
  fail (503 from the `score` frontend when txn.iprep.error is set), the
  supervisor replaces the worker and the other one carries on.
* Streams per connection and connection reuse, from the agent's debug log:
  an --app agent whose handler takes HANDLER_MS, wrk with 64 connections.
  HAProxy 3.1+ (spop.md §5.3, §8.2) keeps at most 20 streams on a
  connection, numbers them 1, 3, 5... afresh on each connection with
  frame-id 1, and reuses its connections; 2.6 keeps at most
  max-waiting-frames (20) NOTIFYs waiting on one connection too.

Run with `-rP` (or `-s`) to see the measurements.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from reload_helpers import ReloadHAProxyConfig
from support.haproxy import HAProxy, HAProxyBinary, SpoeForm, http_get
from support.load import assert_every_request_served, parse_wrk, start_wrk
from support.processes import Process
from support.server import SpoaProcess
from support.waits import HOST, wait_for

from .conftest import HAProxyFactory, SpoaFactory

pytestmark = pytest.mark.e2e

WRK_CONNECTIONS = 20
MAX_STREAMS = 20  # 3.x: streams per connection; 2.6: max-waiting-frames default
HANDLER_MS = 50
LOAD_CONNECTIONS = 64


@pytest.fixture
def wrk(tmp_path: Path, processes: list[Process]) -> Callable[..., Process]:
    """start(url, *args): wrk in its own session, killed at teardown."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (make deps installs it)")

    def start(url: str, *args: str) -> Process:
        processes.append(start_wrk(url, tmp_path, *args))
        return processes[-1]

    return start


def agent_connections(pid: int, port: int) -> int:
    """ESTABLISHED connections a worker holds on the agent's port."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)


def frontend(haproxy: HAProxy) -> dict[str, str]:
    return next(
        r for r in haproxy.show_stat() if r["pxname"] == "score" and r["svname"] == "FRONTEND"
    )


# ------------------------------------------------------------------ kill -9 of a worker


def test_killed_worker_fails_only_its_in_flight_streams(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, wrk, haproxy_bin: HAProxyBinary
) -> None:
    haproxy = haproxy_factory(
        spoa.port, SpoeForm.HTTP_NAMED, config_class=ReloadHAProxyConfig, processing_timeout_ms=2000
    )
    haproxy.wait_server("UP", "L7OK")
    workers = {p.pid: p for p in spoa.wait_workers()}
    url = f"http://{HOST}:{haproxy.config.score_port}/"
    load = wrk(url, "-t1", f"-c{WRK_CONNECTIONS}", "-d4s")

    def spread() -> dict[int, int] | None:
        counts = {pid: agent_connections(pid, spoa.port) for pid in workers}
        return counts if any(counts.values()) else None

    # HAProxy 2.6 may open only one applet per thread: both on one worker, then
    counts = wait_for(spread, 10, "HAProxy's SPOE connections")
    time.sleep(1.0)  # let the load run
    counts = {pid: agent_connections(pid, spoa.port) for pid in workers}
    victim = max(counts, key=lambda pid: counts[pid])
    survivor = next(pid for pid in workers if pid != victim)
    before = frontend(haproxy)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        spoa.check_alive()
        pids = set()
        for p in spoa.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):  # the victim, reaped meanwhile
                if p.status() != psutil.STATUS_ZOMBIE:
                    pids.add(p.pid)
        return pids if len(pids) == 2 and victim not in pids else None

    assert survivor in wait_for(replaced, 10, "the killed worker's replacement")
    assert load.wait(20.0) == 0, load.stderr()
    result = parse_wrk(load.stdout())
    after = frontend(haproxy)
    served_after_kill = int(after["hrsp_2xx"]) - int(before["hrsp_2xx"])
    # each SPOE connection carries at most MAX_STREAMS streams: the dead
    # worker's share bounds the failures. (Not one per wrk connection: a
    # request that failed at once is followed by the next, which HAProxy may
    # still send on another of the dead worker's connections.)
    bound = MAX_STREAMS * counts[victim]
    print(
        f"{haproxy_bin.id}: kill -9 of a worker holding {counts[victim]} of "
        f"{sum(counts.values())} SPOE connections: wrk {result.requests} requests, "
        f"non-2xx {result.non_2xx} (bound {bound}), socket errors {result.socket_errors}; "
        f"2xx after the kill {served_after_kill}, frontend 5xx {after['hrsp_5xx']}"
    )
    # HAProxy 2.6 does not always see at once that an agent connection died:
    # a stream it had sent there then waits its `timeout processing` (2 s,
    # wrk's own timeout), so wrk counts a timeout besides the 5xx
    errors = {k: v for k, v in result.socket_errors.items() if k != "timeout"}
    assert errors == dict.fromkeys(errors, 0), result.text
    assert result.non_2xx + result.socket_errors.get("timeout", 0) <= bound, result.text
    assert int(after["hrsp_5xx"]) == result.non_2xx, after
    assert served_after_kill > 100, (before, after)  # the others carried on
    assert re.search(rf"\(pid {victim}\) was killed by SIGKILL", spoa.logs()), spoa.logs()
    last = http_get(haproxy.config.score_port, "127.0.0.10")
    assert (last.status, last.score()) == (200, ("5", "")), last
    spoa.check_alive()


# ------------------------------------------------------------------ streams per connection

SLOW_APP = f"""
import asyncio

from spoa_mp.agent import Agent
from spoa_mp.model import set_var

agent = Agent("slowapp")


@agent.on_message("check-client-ip")
async def check(msg):
    await asyncio.sleep({HANDLER_MS} / 1000)
    return set_var("sess", "ip_score", 42)
"""

LOG_LINE = re.compile(
    r"^\S+ (\d\d):(\d\d):(\d\d),(\d{3}) (\d+) worker \d+ DEBUG "
    r"spoa_mp\.(?:worker|dispatch): conn (\d+): "
    r"(?:(accepted)|(handshake)|NOTIFY sid=(\d+) fid=(\d+))",
    re.M,
)


@dataclass
class SeenConnection:
    """One SPOE connection (not a health check) in an agent's debug log."""

    notifies: list[tuple[float, int, int]] = field(default_factory=list)  # (time, sid, fid)

    def most_within(self, window: float) -> int:
        """The most NOTIFYs that arrived within `window` seconds of each other."""
        times = sorted(t for t, _, _ in self.notifies)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


def seen_connections(log: str) -> list[SeenConnection]:
    """The SPOE connections of the log, in the order they were accepted
    (keyed by worker pid and fd: an fd is reused once closed)."""
    current: dict[tuple[str, str], SeenConnection] = {}
    handshaken: list[SeenConnection] = []
    for m in LOG_LINE.finditer(log):
        hh, mm, ss, ms, pid, fd, accepted, handshake, sid, fid = m.groups()
        key = (pid, fd)
        if accepted:
            current[key] = SeenConnection()
        elif handshake:
            handshaken.append(current[key])
        else:
            t = int(hh) * 3600 + int(mm) * 60 + int(ss) + int(ms) / 1000
            current[key].notifies.append((t, int(sid), int(fid)))
    return handshaken


def test_streams_per_connection_and_reuse(
    spoa_factory: SpoaFactory,
    haproxy_factory: HAProxyFactory,
    wrk,
    haproxy_bin: HAProxyBinary,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    spoa = spoa_factory(workers=2, debug=True, extra=("--app", "slowapp:agent"))
    haproxy = haproxy_factory(spoa.port, SpoeForm.HTTP_NAMED, processing_timeout_ms=2000)
    haproxy.wait_server("UP", "L7OK")
    url = f"http://{HOST}:{haproxy.config.score_port}/"
    load = wrk(url, "-t2", f"-c{LOAD_CONNECTIONS}", "-d3s")
    assert load.wait(20.0) == 0, load.stderr()
    result = parse_wrk(load.stdout())
    assert_every_request_served(result)
    assert http_get(haproxy.config.score_port, HOST).score() == ("42", "")

    conns = seen_connections(spoa.stderr_path.read_text(errors="replace"))
    notifies = sum(len(c.notifies) for c in conns)
    # within less than one handler's time, every NOTIFY that arrived on a
    # connection is still in flight: at most MAX_STREAMS of them
    window = (HANDLER_MS - 10) / 1000
    peaks = [c.most_within(window) for c in conns]
    per_conn = defaultdict(int)
    for p in peaks:
        per_conn[p] += 1
    print(
        f"{haproxy_bin.id}: wrk -c{LOAD_CONNECTIONS}, handler {HANDLER_MS} ms: "
        f"{result.requests} requests, {notifies} NOTIFYs over {len(conns)} SPOE connections "
        f"({[len(c.notifies) for c in conns]}); most NOTIFYs within {window * 1000:.0f} ms "
        f"on one connection: {sorted(peaks, reverse=True)}"
    )
    assert notifies >= result.requests
    assert max(peaks) <= MAX_STREAMS, peaks
    # with 64 requests waiting on the agent at once, HAProxy had to open
    # at least 64 / 20 connections, and reused them: far fewer than requests
    # (3.2 opens one for each of the first requests, none usable before its
    # HELLO is answered), then reuses them: many NOTIFYs per connection
    assert len(conns) >= math.ceil(LOAD_CONNECTIONS / MAX_STREAMS), len(conns)
    assert len(conns) <= LOAD_CONNECTIONS + 16, len(conns)
    assert notifies >= 10 * len(conns), (notifies, len(conns))
    if haproxy_bin.spop:
        assert max(peaks) == MAX_STREAMS, peaks  # and filled one up
        for c in conns:
            sids = [sid for _, sid, _ in c.notifies]
            # 1, 3, 5...: allocated per connection, restarting at 1
            assert sorted(sids) == list(range(1, 2 * len(sids), 2)), sids[:40]
            assert {fid for _, _, fid in c.notifies} <= {1}, c.notifies[:5]

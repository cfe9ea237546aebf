"""End-to-end tests of the pre-fork server: `python -m spoa_mp` as a real
process tree, driven over TCP on 127.0.0.1 by a small SPOP client.

Every wait is bounded and polls a condition (tests/support/server.py); every
server runs in its own session and is killed with its whole process group at
teardown, and its stderr is printed then (pytest shows it when a test fails).
Test apps (tests/support/apps.py and two here) are written to tmp_path, which
is the server's working directory.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import psutil
import pytest
from support.apps import TEST_APP, slow_msg
from support.processes import gone, owner_of, title
from support.server import SUPERVISOR_TITLE, Server, started
from support.spop_peer import Frame, SpopClient, handshaken, vector
from support.waits import HOST, connect_refused, wait_for

from spoa_mp.codec import FrameType, Status

pytestmark = pytest.mark.e2e

SET_VAR = 1
SESS, TXN = 1, 2

BOOT_FAIL_APP = """
from spoa_mp.agent import Agent

agent = Agent("bootfail")


@agent.on_worker_start
def connect_db():
    raise RuntimeError("database unreachable")
"""

IMPORT_FAIL_APP = """
raise ImportError("the frobnicator library is missing")
"""

StartServer = Callable[..., Server]
MakeClient = Callable[[int], SpopClient]


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """tmp_path with the test apps in it (the servers' working directory)."""
    (tmp_path / "testapp.py").write_text(TEST_APP)
    (tmp_path / "bootfail.py").write_text(BOOT_FAIL_APP)
    (tmp_path / "importfail.py").write_text(IMPORT_FAIL_APP)
    return tmp_path


@pytest.fixture
def start(app_dir: Path, servers: list[Server]) -> StartServer:
    """start(*args, workers=N, wait=True): a running Server; all are killed
    (process group) at teardown and their output printed."""

    def _start(*args: str, workers: int = 2, wait: bool = True) -> Server:
        return started(servers, Server(app_dir, *args, workers=workers, wait=wait))

    return _start


def ready_client(make: MakeClient, port: int) -> SpopClient:
    """A client whose HAProxy 2.6 handshake is done."""
    return handshaken(make(port))


def ip_msg(i: int) -> list[tuple[str, list[tuple[str, object]]]]:
    return [("check-client-ip", [("", IPv4Address(0x0A000000 + i % 2**24))])]


def assert_ip_score_ack(ack: Frame) -> None:
    assert ack.type == FrameType.ACK, ack
    assert len(ack.actions) == 1, ack
    action, scope, name, value = ack.actions[0]
    assert (action, scope, name) == (SET_VAR, SESS, "ip_score")
    assert isinstance(value, int)
    assert 0 <= value <= 100


def assert_all_gone(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Every process has exited and been reaped (no zombie, no leftover)."""
    wait_for(
        lambda: all(gone(p) for p in procs),
        timeout,
        f"processes to be gone: {[p for p in procs if not gone(p)]}",
    )


# ------------------------------------------------------------------ 1. tree, handshake, ACKs


def test_process_tree_titles_and_pipelined_acks(start: StartServer, client: MakeClient) -> None:
    srv = start(workers=3)
    workers = srv.wait_workers(lambda w: sorted(w) == [1, 2, 3], what="3 titled workers")
    kids = srv.children()
    assert len(kids) == 3
    assert sorted(title(k) for k in kids) == [f"spoa-mp: worker {i}" for i in (1, 2, 3)]
    assert sorted(k.pid for k in kids) == sorted(workers.values())
    assert title(srv.ps) == SUPERVISOR_TITLE

    c = client(srv.port)
    hello = c.hello("haproxy-hello 2.6")
    assert hello.type == FrameType.AGENT_HELLO
    assert (hello.sid, hello.fid) == (0, 0)
    assert hello.kv["version"] == b"2.0"
    assert hello.kv["max-frame-size"] == 16380
    caps = bytes(hello.kv["capabilities"]).split(b",")  # type: ignore[arg-type]
    assert b"pipelining" in caps
    assert b"async" not in caps

    # HAProxy 2.6's first stream (sid 0, captured), then more streams, all in one write
    ids = [(0, 1)] + [(sid, sid % 5 + 1) for sid in range(1, 40)] + [(2**40, 2**33)]
    frames = [vector("notify check-client-ip ipv4 sid 0 (2.6 first stream)")]
    frames += [c.notify_bytes(sid, fid, ip_msg(sid)) for sid, fid in ids[1:]]
    c.send(b"".join(frames))
    acks = c.read_frames(len(ids))
    assert sorted((a.sid, a.fid) for a in acks) == sorted(ids)
    for ack in acks:
        assert_ip_score_ack(ack)


# ------------------------------------------------------------------ 2. kill -9 a worker


def test_killed_worker_is_replaced_others_untouched(start: StartServer, client: MakeClient) -> None:
    srv = start(workers=3)
    before = srv.wait_workers(lambda w: len(w) == 3)
    a = ready_client(client, srv.port)
    owner = wait_for(lambda: owner_of(a.sock, before.values()), what="the owner of connection A")
    victim_index = min(i for i, pid in before.items() if pid != owner)
    victim = before[victim_index]

    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    after = srv.wait_workers(
        lambda w: len(w) == 3 and w[victim_index] != victim, what="a replacement worker"
    )
    assert time.monotonic() - t0 < 10
    new = after[victim_index]
    assert new not in before.values()
    assert {i: p for i, p in after.items() if i != victim_index} == {
        i: p for i, p in before.items() if i != victim_index
    }
    srv.wait_log(rf"worker {victim_index} \(pid {victim}\) was killed by SIGKILL")
    srv.wait_log(rf"worker {victim_index} ready \(pid {new}\)")

    # connection A (on another worker) is unaffected
    a.notify(11, 1, ip_msg(11))
    ack = a.read_frame()
    assert (ack.sid, ack.fid) == (11, 1)
    assert_ip_score_ack(ack)

    # the replacement serves: with the other workers stopped, it is the one that accepts
    others = [p for i, p in after.items() if i != victim_index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        b = ready_client(client, srv.port)
        b.notify(1, 1, ip_msg(1))
        assert_ip_score_ack(b.read_frame())
        assert owner_of(b.sock, after.values()) == new
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)
    assert srv.workers_by_index() == after


# ------------------------------------------------------------------ 3. hung worker


def test_hung_worker_is_killed_and_replaced(start: StartServer, client: MakeClient) -> None:
    srv = start("--app", "testapp:agent", "--worker-timeout", "2", workers=1)
    old = srv.wait_workers(lambda w: 1 in w)[1]
    old_proc = psutil.Process(old)
    c = ready_client(client, srv.port)
    c.notify(1, 1, [("hang", [])])
    t0 = time.monotonic()

    new = srv.wait_workers(lambda w: w.get(1, old) != old, what="worker 1 replaced")[1]
    elapsed = time.monotonic() - t0
    assert elapsed < 6, f"the hung worker was replaced after {elapsed:.1f} s"
    assert new != old
    assert_all_gone([old_proc])
    srv.wait_log(rf"ERROR .*worker 1 \(pid {old}\) sent no heartbeat for [\d.]+ s: killing it")
    srv.wait_log(rf"worker 1 \(pid {old}\) was killed after --worker-timeout")
    assert c.wait_closed(5) == []  # its connection died with it, never ACKed

    srv.wait_log(rf"worker 1 ready \(pid {new}\)")
    d = ready_client(client, srv.port)
    d.notify(2, 1, [("fast", [])])
    ack = d.read_frame()
    assert (ack.sid, ack.fid, ack.actions) == (2, 1, [(SET_VAR, TXN, "fast", 1)])


# ------------------------------------------------------------------ 4. boot and load failures


def test_boot_failure_stops_the_server_without_crash_loop(start: StartServer) -> None:
    t0 = time.monotonic()
    srv = start("--app", "bootfail:agent", "-d", workers=3, wait=False)
    code = srv.wait_exit(10)
    assert code != 0
    assert time.monotonic() - t0 < 10
    log = srv.log()
    assert "database unreachable" in log
    assert "connect_db" in log
    spawned = re.findall(r"worker \d+ started \(pid (\d+)[,)]", log)
    assert 1 <= len(spawned) <= 3, f"{len(spawned)} workers spawned for 3 slots: a crash loop"
    wait_for(lambda: not srv.leftovers(), 5, "no process left in the server's group")


def test_boot_failure_is_one_clear_line(start: StartServer) -> None:
    srv = start("--app", "bootfail:agent", workers=3, wait=False)
    code = srv.wait_exit(10)
    assert code != 0
    # everything but INFO/DEBUG log lines: what an operator reads as "the error"
    routine = re.compile(r"^\S+ \S+ \d+ (supervisor|worker \d+) (INFO|DEBUG) ")
    problems = [line for line in srv.log().splitlines() if not routine.match(line)]
    assert len(problems) == 1, "\n".join(problems)
    assert "connect_db" in problems[0]
    assert "RuntimeError: database unreachable" in problems[0]


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("importfail:agent", "ImportError: the frobnicator library is missing"),
        ("nosuchmodule:agent", "'nosuchmodule' not found"),
    ],
    ids=["import-error", "no-such-module"],
)
def test_app_load_failure_exits_2_with_one_line(
    start: StartServer, app: str, expected: str
) -> None:
    srv = start("--app", app, workers=2, wait=False)
    assert srv.wait_exit(10) == 2
    lines = srv.log().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("spoa-mp: error: ")
    assert expected in lines[0]
    assert connect_refused(srv.port)


# ------------------------------------------------------------------ 5. failing handler


def test_failing_handler_still_acks_and_worker_keeps_serving(
    start: StartServer, client: MakeClient
) -> None:
    srv = start("--app", "testapp:agent", workers=1)
    worker = srv.wait_workers(lambda w: 1 in w)[1]
    c = ready_client(client, srv.port)

    c.notify(5, 9, [("boom", [])])
    ack = c.read_frame()
    assert (ack.type, ack.sid, ack.fid, ack.actions) == (FrameType.ACK, 5, 9, [])

    c.notify(6, 1, [("fast", [])])
    ack = c.read_frame()
    assert (ack.sid, ack.fid, ack.actions) == (6, 1, [(SET_VAR, TXN, "fast", 1)])

    # a NOTIFY whose first message fails still carries the second one's action
    c.notify(7, 2, [("boom", []), ("fast", [])])
    ack = c.read_frame()
    assert (ack.sid, ack.fid, ack.actions) == (7, 2, [(SET_VAR, TXN, "fast", 1)])

    log = srv.wait_log(r"ValueError: kaboom from the boom handler")
    assert "handler for 'boom' failed" in log
    assert "Traceback (most recent call last)" in log
    assert srv.workers_by_index() == {1: worker}


# ------------------------------------------------------------------ 6. coroutine handlers


def test_async_handler_does_not_delay_other_connections(
    start: StartServer, client: MakeClient
) -> None:
    srv = start("--app", "testapp:agent", workers=1)  # one worker: one event loop for both
    a = ready_client(client, srv.port)
    b = ready_client(client, srv.port)
    t0 = time.monotonic()
    a.notify(1, 1, slow_msg(1, 500))
    b.notify(1, 1, [("fast", [])])
    ack_b = b.read_frame()
    ack_a = a.read_frame()
    assert ack_b.actions == [(SET_VAR, TXN, "fast", 1)]
    assert ack_a.actions == [(SET_VAR, TXN, "slow", 1)]
    assert ack_b.received - t0 < 0.3, f"sync ACK took {ack_b.received - t0:.2f} s"
    assert ack_a.received - t0 >= 0.45
    assert ack_a.received - ack_b.received > 0.3


def test_pipelined_async_notifies_run_concurrently(start: StartServer, client: MakeClient) -> None:
    srv = start("--app", "testapp:agent", workers=1)
    c = ready_client(client, srv.port)
    t0 = time.monotonic()
    c.send(b"".join(c.notify_bytes(sid, 3, slow_msg(sid, 500)) for sid in range(1, 11)))
    acks = c.read_frames(10, timeout=8)
    elapsed = max(a.received for a in acks) - t0
    assert elapsed < 3, f"10 x 0.5 s handlers took {elapsed:.2f} s"
    assert sorted((a.sid, a.fid) for a in acks) == [(sid, 3) for sid in range(1, 11)]
    for a in acks:
        assert a.actions == [(SET_VAR, TXN, "slow", a.sid)]


# ------------------------------------------------------------------ 7. malformed input


def disconnect_status(frames: list[Frame]) -> int:
    assert len(frames) == 1, frames
    assert frames[0].type == FrameType.AGENT_DISCONNECT, frames[0]
    status = frames[0].kv["status-code"]
    assert isinstance(status, int)
    return status


@pytest.mark.parametrize("length", [16381, 1 << 20, 0xFFFFFFFF])
def test_frame_too_big_closes_only_that_connection(
    start: StartServer, client: MakeClient, length: int
) -> None:
    srv = start(workers=1)  # one worker: both connections share it
    other = ready_client(client, srv.port)
    bad = ready_client(client, srv.port)
    bad.send(length.to_bytes(4, "big"))  # the LENGTH alone is enough to refuse it
    assert disconnect_status(bad.wait_closed(5)) == Status.TOO_BIG

    other.notify(2, 1, ip_msg(2))
    ack = other.read_frame()
    assert (ack.sid, ack.fid) == (2, 1)
    assert_ip_score_ack(ack)


def test_notify_before_hello_is_invalid(start: StartServer, client: MakeClient) -> None:
    srv = start(workers=1)
    c = client(srv.port)
    c.send(vector("notify check-client-ip ipv4 sid 20"))
    assert disconnect_status(c.wait_closed(5)) == Status.INVALID


def garbage(rng: random.Random) -> bytes:
    """Bytes from nowhere, from near-valid frames, or after a valid HELLO."""
    hello = vector("haproxy-hello 2.6")
    notify = vector("notify two messages, every data type")
    kind = rng.randrange(5)
    noise = rng.randbytes(rng.randrange(1, 300))
    if kind == 0:
        return noise
    if kind == 1:  # a plausible length, then noise
        return rng.randrange(7, 400).to_bytes(4, "big") + noise
    if kind == 2:  # a valid handshake, then noise
        return hello + noise
    # a valid stream with a few bytes changed (kind 3: in the HELLO, 4: in the NOTIFY)
    data = bytearray(hello + notify)
    lo = 0 if kind == 3 else len(hello)
    for _ in range(rng.randrange(1, 5)):
        data[rng.randrange(lo, len(data))] = rng.randrange(256)
    return bytes(data[: rng.randrange(lo + 1, len(data) + 1)])


def test_garbage_never_kills_a_worker(start: StartServer, client: MakeClient) -> None:
    srv = start(workers=2)
    before = srv.wait_workers(lambda w: len(w) == 2)
    rng = random.Random(20260509)
    deadline = time.monotonic() + 30
    for _ in range(200):
        with socket.create_connection((HOST, srv.port), timeout=5) as s:
            try:
                s.sendall(garbage(rng))
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # until the agent closes (bounded by the timeout)
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert time.monotonic() < deadline
    assert srv.workers_by_index() == before
    assert all(psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in before.values())
    log = srv.log()
    assert "Traceback" not in log
    assert "crashed" not in log
    c = ready_client(client, srv.port)
    c.notify(1, 1, ip_msg(1))
    assert_ip_score_ack(c.read_frame())


# ------------------------------------------------------------------ 8. stopping


def slow_in_flight(
    start: StartServer, make: MakeClient, sid: int, fid: int, n: int, ms: int
) -> tuple[Server, SpopClient, list[psutil.Process]]:
    """(a server of 2 workers with --graceful-timeout 5, a client whose
    NOTIFY sid/fid of slow_msg(n, ms) is running, the server's processes)."""
    srv = start("--app", "testapp:agent", "--graceful-timeout", "5", workers=2)
    srv.wait_workers(lambda w: len(w) == 2)
    procs = [srv.ps, *srv.children()]
    c = ready_client(make, srv.port)
    c.notify(sid, fid, slow_msg(n, ms))
    srv.wait_log(rf"slow start {n}")
    return srv, c, procs


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_graceful_stop_finishes_in_flight_work(
    start: StartServer, client: MakeClient, signum: int
) -> None:
    srv, c, procs = slow_in_flight(start, client, 3, 4, 7, 1000)

    t0 = time.monotonic()
    srv.signal(signum)
    ack = c.read_frame(5)
    assert (ack.type, ack.sid, ack.fid) == (FrameType.ACK, 3, 4)
    assert ack.actions == [(SET_VAR, TXN, "slow", 7)]
    rest = c.wait_closed(5)  # then a normal AGENT-DISCONNECT and close
    assert [(f.type, f.kv.get("status-code")) for f in rest] in (
        [],
        [(FrameType.AGENT_DISCONNECT, Status.NORMAL)],
    )
    assert srv.wait_exit(8) == 0
    assert time.monotonic() - t0 < 5, "the stop took longer than --graceful-timeout"
    assert_all_gone(procs)
    assert not srv.leftovers()
    assert connect_refused(srv.port)


def test_graceful_stop_refuses_new_connections_at_once(
    start: StartServer, client: MakeClient
) -> None:
    srv, c, _ = slow_in_flight(start, client, 3, 4, 8, 1500)
    srv.signal(signal.SIGTERM)
    t0 = time.monotonic()

    def ack_arrived() -> bool:
        return bool(select.select([c.sock], [], [], 0)[0])

    accepted = 0

    def refused_or_acked() -> str | None:
        nonlocal accepted
        if ack_arrived():
            return "acked"
        if connect_refused(srv.port):
            return "refused"
        accepted += 1
        return None

    first = wait_for(refused_or_acked, 5, "connections to be refused or the ACK")
    ack = c.read_frame(5)
    assert ack.actions == [(SET_VAR, TXN, "slow", 8)]
    assert first == "refused", (
        f"{accepted} new connection(s) accepted after SIGTERM, for "
        f"{time.monotonic() - t0:.2f} s: until the in-flight ACK was sent"
    )


def test_sigquit_stops_at_once(start: StartServer, client: MakeClient) -> None:
    srv, c, procs = slow_in_flight(start, client, 1, 1, 9, 30_000)
    t0 = time.monotonic()
    srv.signal(signal.SIGQUIT)
    code = srv.wait_exit(5)
    elapsed = time.monotonic() - t0
    assert elapsed < 2, f"SIGQUIT took {elapsed:.2f} s"
    assert code >= 0, f"the supervisor died of signal {-code}"
    assert_all_gone(procs)
    assert not srv.leftovers()
    assert c.wait_closed(2) == []  # the in-flight NOTIFY is dropped, not ACKed


# ------------------------------------------------------------------ 9. health check


def test_health_check_hello_is_answered_then_closed(start: StartServer, client: MakeClient) -> None:
    srv = start(workers=1)
    c = client(srv.port)
    hello = c.hello("haproxy-hello healthcheck")
    assert hello.type == FrameType.AGENT_HELLO
    assert hello.kv["version"] == b"2.0"
    assert c.wait_closed(5) == []  # closed by the agent, nothing more sent


# ------------------------------------------------------------------ 10. --max-in-flight


def test_max_in_flight_stops_reading_the_connection(start: StartServer, client: MakeClient) -> None:
    srv = start("--app", "testapp:agent", "--max-in-flight", "2", workers=1)
    c = ready_client(client, srv.port)
    c.notify(1, 1, slow_msg(1, 600))
    c.notify(2, 1, slow_msg(2, 600))
    srv.wait_log(r"slow start 1")
    srv.wait_log(r"slow start 2")  # two in flight: the worker stops reading
    c.notify(3, 1, slow_msg(3, 600))
    c.notify(4, 1, slow_msg(4, 600))
    acks = c.read_frames(4, timeout=8)
    assert sorted(a.sid for a in acks) == [1, 2, 3, 4]
    for a in acks:
        assert a.actions == [(SET_VAR, TXN, "slow", a.sid)]
    at = {a.sid: a.received for a in acks}
    # 3 and 4 were read only once 1 or 2 had finished: they end one handler later
    assert min(at[3], at[4]) - max(at[1], at[2]) > 0.4, at


def test_max_in_flight_bounds_pipelined_notifies(start: StartServer, client: MakeClient) -> None:
    srv = start("--app", "testapp:agent", "--max-in-flight", "2", workers=1)
    c = ready_client(client, srv.port)
    c.send(b"".join(c.notify_bytes(sid, 1, slow_msg(sid, 600)) for sid in (1, 2, 3)))
    acks = c.read_frames(3, timeout=8)
    assert sorted(a.sid for a in acks) == [1, 2, 3]
    at = {a.sid: a.received for a in acks}
    assert at[3] - max(at[1], at[2]) > 0.4, f"the third ran concurrently: {at}"

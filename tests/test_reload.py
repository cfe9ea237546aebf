"""SIGHUP reload, end to end: `python -m spoa_mp` as a real process tree,
loaded by `spoa-mp bench`, by a small SPOP client, and through each HAProxy
found (2.6, 3.2...) under wrk.

What the reload promises (spoa_mp/supervisor.py): the configuration, the
--app module and the reputation data are read again and a new generation of
workers starts; once it is ready, the old workers hand their connections over
between two frames and exit; if the new generation cannot start, the old one
keeps serving and the log says why. `--reload-mode rolling` does it one
worker at a time, `drain` lets the old workers finish and close instead.

Every wait is bounded and polls a condition (support.waits.wait_for); the
only sleeps let load run before a signal. Servers, bench and wrk run in their
own sessions and are killed with their process groups at teardown.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from reload_helpers import (
    HANDED,
    HANDING,
    READY,
    RELOAD_FAILED,
    SERVING,
    ExitWatcher,
    ReloadHAProxyConfig,
    established,
    find_line,
    handed_over,
    line_time,
    rx_queue,
    write_app,
)
from support.apps import Messages, slow_msg
from support.haproxy import HAProxy, HAProxyBinary, SpoeForm, haproxy_params, http_get
from support.load import assert_every_request_served, bench, bench_result, parse_wrk, start_wrk
from support.processes import Process, owner_of
from support.server import Server, started
from support.spop_peer import Frame, SpopClient, handshaken
from support.waits import HOST, wait_for

from spoa_mp.codec import F_PLEN, F_POFF, Decoder, FrameType, Status

pytestmark = pytest.mark.e2e

SET_VAR = 1
SESS, TXN = 1, 2
EXIT_BUDGET = 1.0  # old workers are gone within this long of "generation N serving"
APP = ("--app", "reloadapp:agent")

StartServer = Callable[..., Server]
MakeClient = Callable[[int], SpopClient]


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: list[Server]) -> StartServer:
    """start(*args, workers=N): a running Server in tmp_path (next to the test
    app); all are killed (process group) at teardown and their logs printed."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # a rewritten app is read again
    write_app(tmp_path)

    def _start(*args: str, workers: int = 2) -> Server:
        return started(servers, Server(tmp_path, *args, workers=workers))

    return _start


@pytest.fixture
def client(client: MakeClient) -> MakeClient:
    """client(port): conftest's client, its HAProxy 2.6 handshake done."""
    return lambda port: handshaken(client(port))


# ------------------------------------------------------------------ helpers


def ver_msg(n: int = 0) -> Messages:
    return [("ver", [("n", n)])]


def ip_msg(ip: str) -> Messages:
    return [("check-client-ip", [("", IPv4Address(ip))])]


def assert_ack(frame: Frame, sid: int, fid: int, *actions: tuple[int, int, str, object]) -> None:
    assert frame.type == FrameType.ACK, frame
    assert (frame.sid, frame.fid) == (sid, fid), frame
    if actions:
        assert frame.actions == list(actions), frame


def score_of(c: SpopClient, sid: int, ip: str) -> object:
    c.notify(sid, 1, ip_msg(ip))
    ack = c.read_frame()
    assert_ack(ack, sid, 1)
    assert len(ack.actions) == 1, ack
    action, scope, name, value = ack.actions[0]
    assert (action, scope, name) == (SET_VAR, SESS, "ip_score"), ack
    return value


def reload_and_wait(srv: Server, gen: int, timeout: float = 10.0) -> tuple[str, float]:
    """SIGHUP, then until "reload: generation GEN serving"; (log, that line's time)."""
    srv.signal(signal.SIGHUP)
    log = srv.wait_log(SERVING.format(gen=gen), timeout)
    return log, line_time(find_line(log, SERVING.format(gen=gen))[1])


def wait_reload_outcome(srv: Server, gen: int, timeout: float = 10.0) -> str:
    """Until the reload either failed or serves; returns the log."""
    return srv.wait_log(rf"{RELOAD_FAILED.pattern}|{SERVING.format(gen=gen)}", timeout)


def failed_reload_reason(srv: Server) -> re.Match[str]:
    """SIGHUP, then the reload must fail: its "reload failed" log line
    (group 1: the reason), printed."""
    srv.signal(signal.SIGHUP)
    log = wait_reload_outcome(srv, 2)
    m = RELOAD_FAILED.search(log)
    assert m, f"the reload did not fail:\n{log}"
    print(m[0])
    return m


def assert_exits_within(exits: dict[int, float], budget: float, what: str) -> None:
    print(
        f"{what}: old workers gone " + ", ".join(f"pid {p} {dt:+.3f} s" for p, dt in exits.items())
    )
    late = {pid: dt for pid, dt in exits.items() if dt > budget}
    assert not late, f"{what}: old workers still there {budget} s after the reload: {late}"


def current_workers(
    srv: Server, n: int, not_in: Iterable[int] = (), timeout: float = 10.0
) -> dict[int, int]:
    """Until exactly workers 1..n run (titles `spoa-mp: worker N`, no other
    child), none of them in `not_in`; returns {index: pid}."""
    excluded = set(not_in)

    def ok(w: dict[int, int]) -> bool:
        if sorted(w) != list(range(1, n + 1)) or set(w.values()) & excluded:
            return False
        return len(srv.children()) == n

    return srv.wait_workers(ok, timeout, f"workers 1..{n} (not {sorted(excluded)})")


def wait_moved(srv: Server, old: dict[int, int]) -> dict[int, int]:
    """{pid: connections} once every old worker logged how many it handed over."""

    def lines() -> dict[int, int] | None:
        moved = handed_over(srv.log(), old.values())
        return moved if len(moved) == len(old) else None

    return wait_for(lines, 5.0, "every old worker's 'handed N connection(s) over' line")


# ------------------------------------------------------------------ 1. handover under load


def test_handover_under_bench_load_loses_nothing(
    start: StartServer, processes: list[Process], tmp_path: Path
) -> None:
    """bench 8 connections x 16 in flight; two SIGHUPs: 0 errors, sent == acked,
    every old worker gone within 1 s of "generation N serving", all 8
    connections moved each time."""
    srv = start(workers=2)
    b = bench(srv.port, tmp_path, connections=8, in_flight=16, duration=6)
    processes.append(b)
    wait_for(lambda: established(srv.port) >= 8, 10.0, "bench's 8 connections")
    time.sleep(1.5)  # let the load run
    timings: list[dict[int, float]] = []
    for gen in (2, 3):
        old = current_workers(srv, 2)
        with ExitWatcher(old.values()) as watcher:
            _, serving_at = reload_and_wait(srv, gen)
            wait_for(watcher.all_gone, 5.0, f"generation {gen - 1} workers to exit")
            exits = watcher.after(serving_at)
        timings.append(exits)
        assert_exits_within(exits, EXIT_BUDGET, f"reload {gen - 1}")
        new = current_workers(srv, 2, not_in=set(old.values()))
        moved = wait_moved(srv, old)
        print(f"reload {gen - 1}: moved {moved}, new workers {new}")
        assert sum(moved.values()) == 8, moved
        if gen == 2:
            time.sleep(1.0)  # load on generation 2 before the next reload
    result = bench_result(b, timeout=20.0)
    print(
        "bench: messages={messages} sent={sent} acked={acked} errors={errors} "
        "msg/s={msg_per_s:.0f}".format(**result)
    )
    assert result["errors"] == 0, result["errors_by_kind"]
    assert result["sent"] == result["acked"], result
    assert result["messages"] > 0, result
    assert result["connections_ready"] == 8, result
    assert all(dt <= EXIT_BUDGET for t in timings for dt in t.values())


# ------------------------------------------------------------------ 2. a NOTIFY split at the reload


def test_notify_split_across_writes_at_the_reload(start: StartServer, client: MakeClient) -> None:
    """Half a NOTIFY read by the old worker when the reload starts: it reads
    exactly up to the end of that frame, answers it, then the connection moves
    and the new worker answers what follows (sent in the same write)."""
    srv = start(*APP, workers=2)
    old = current_workers(srv, 2)
    c = client(srv.port)
    owner = wait_for(lambda: owner_of(c.sock, old.values()), what="the connection's worker")
    n1 = c.notify_bytes(1, 1, ver_msg(1))
    n2 = c.notify_bytes(2, 1, ver_msg(2))
    n3 = c.notify_bytes(3, 1, ver_msg(3))
    half = len(n1) // 2
    c.send(n1[:half])
    client_port = c.sock.getsockname()[1]
    wait_for(lambda: rx_queue(srv.port, client_port) == 0, what="the worker to read half a frame")

    with ExitWatcher(old.values()) as watcher:
        reload_and_wait(srv, 2)
        srv.wait_log(HANDING, count=2)  # both old workers got the order
        # the owner cannot move the connection in the middle of a frame
        assert owner_of(c.sock, [owner]) == owner
        assert owner not in watcher.exits
        # the rest of frame 1, all of frame 2, 5 bytes of frame 3: the old
        # worker must stop reading exactly after frame 1
        c.send(n1[half:] + n2 + n3[:5])
        ver = (SET_VAR, TXN, "ver", 1)
        assert_ack(c.read_frame(), 1, 1, ver)
        assert_ack(c.read_frame(), 2, 1, ver)
        c.send(n3[5:])
        assert_ack(c.read_frame(), 3, 1, ver)
        wait_for(watcher.all_gone, 5.0, "the old workers to exit")
    new = current_workers(srv, 2, not_in=set(old.values()))
    assert owner_of(c.sock, new.values()) in new.values()
    for sid in (4, 5, 6):  # pipelined, on the same connection, to the new worker
        c.notify(sid, 1, ver_msg(sid))
    for sid, ack in zip((4, 5, 6), c.read_frames(3), strict=True):
        assert_ack(ack, sid, 1, ver)


# ------------------------------------------------------------------ 3. async handler in flight


def test_async_handler_in_flight_finishes_then_connection_moves(
    start: StartServer, client: MakeClient
) -> None:
    srv = start(*APP, workers=2)
    old = current_workers(srv, 2)
    c = client(srv.port)
    owner = wait_for(lambda: owner_of(c.sock, old.values()), what="the connection's worker")
    c.notify(1, 1, slow_msg(7, 500))
    srv.wait_log(r"slow start 7")
    with ExitWatcher(old.values()) as watcher:
        _, serving_at = reload_and_wait(srv, 2)
        ack = c.read_frame(5.0)
        acked_at = time.time()
        assert_ack(ack, 1, 1, (SET_VAR, TXN, "slow", 7))
        wait_for(watcher.all_gone, 5.0, "the old workers to exit")
    # it answered after the reload had started, and only then left
    assert watcher.exits[owner] >= serving_at
    print(
        f"ACK {acked_at - serving_at:+.3f} s after 'serving', owner gone "
        f"{watcher.exits[owner] - serving_at:+.3f} s after"
    )
    new = current_workers(srv, 2, not_in=set(old.values()))
    assert owner_of(c.sock, new.values()) in new.values()
    c.notify(2, 1, slow_msg(8, 50))
    c.notify(3, 1, ver_msg())
    acks = {(f.sid, f.fid): f for f in c.read_frames(2)}
    assert_ack(acks[(2, 1)], 2, 1, (SET_VAR, TXN, "slow", 8))
    assert_ack(acks[(3, 1)], 3, 1, (SET_VAR, TXN, "ver", 1))


# ------------------------------------------------------------------ 4. failed reloads


def assert_still_serving(srv: Server, c: SpopClient, make: MakeClient, workers: dict[int, int]):
    """The same workers as before, answering an old and a new connection."""
    assert current_workers(srv, len(workers)) == workers
    for sid, conn in ((11, c), (12, make(srv.port))):
        conn.notify(sid, 1, ver_msg())
        assert_ack(conn.read_frame(), sid, 1, (SET_VAR, TXN, "ver", 1))
        assert owner_of(conn.sock, workers.values()) in workers.values()


def failed_reload(
    start: StartServer, make: MakeClient, reason: str, **app: bool
) -> tuple[Server, SpopClient, dict[int, int]]:
    """A server whose app is rewritten as `write_app(**app)` then reloaded:
    the reload fails for `reason` and the old workers keep serving.
    Returns the server, a connection made before, and the workers."""
    srv = start(*APP, workers=2)
    before = current_workers(srv, 2)
    c = make(srv.port)
    write_app(srv.cwd, **app)
    m = failed_reload_reason(srv)
    assert reason in m[1], m[0]
    assert_still_serving(srv, c, make, before)
    return srv, c, before


def test_failed_reload_app_import_error(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    srv, c, before = failed_reload(start, client, "frobnicator", import_error=True)
    write_app(tmp_path, version=2)  # fixed: the next reload succeeds, with the new code
    reload_and_wait(srv, 2)
    current_workers(srv, 2, not_in=set(before.values()))
    c.notify(20, 1, ver_msg())
    assert_ack(c.read_frame(), 20, 1, (SET_VAR, TXN, "ver", 2))


def test_failed_reload_hook_error_after_module_rewrite(
    start: StartServer, client: MakeClient
) -> None:
    failed_reload(start, client, "database unreachable", hook_error=True)


def test_failed_reload_worker_start_hook_keeps_old_generation(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    """The new generation's start hook fails (steered by a flag file, the
    module is unchanged): the reload is aborted, the log names the failure,
    the old workers keep serving; a later SIGHUP, once fixed, succeeds."""
    srv = start(*APP, workers=2)
    before = current_workers(srv, 2)
    c = client(srv.port)
    flag = tmp_path / "fail-hook"
    flag.touch()
    m = failed_reload_reason(srv)
    assert "start_hook" in m[1], m[0]
    assert "hook refused to start worker" in m[1], m[0]
    assert "generation 2 serving" not in srv.log()
    assert_still_serving(srv, c, client, before)

    flag.unlink()
    reload_and_wait(srv, 2)
    new = current_workers(srv, 2, not_in=set(before.values()))
    c.notify(30, 1, ver_msg())
    assert_ack(c.read_frame(), 30, 1, (SET_VAR, TXN, "ver", 1))
    assert owner_of(c.sock, new.values()) in new.values()


def reputation_server(
    start: StartServer, make: MakeClient, tmp_path: Path
) -> tuple[Path, Server, dict[int, int], SpopClient]:
    """(rep.txt, a server of 2 workers scoring from it, its workers, a
    connection opened before any reload): 127.0.0.0/8 scores 10."""
    rep = tmp_path / "rep.txt"
    rep.write_text("127.0.0.0/8 10\n")
    srv = start("--reputation-file", str(rep), workers=2)
    workers = current_workers(srv, 2)
    c = make(srv.port)
    assert score_of(c, 1, "127.0.0.1") == 10
    return rep, srv, workers, c


def test_failed_reload_bad_reputation_file_keeps_old_generation(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    rep, srv, before, c = reputation_server(start, client, tmp_path)
    rep.write_text("127.0.0.0/8 10\n10.0.0.1/8 20\n")  # host bits set: rejected
    m = failed_reload_reason(srv)
    assert f"{rep}:2" in m[1], m[0]
    assert current_workers(srv, 2) == before
    assert score_of(c, 2, "127.0.0.1") == 10
    assert score_of(client(srv.port), 3, "127.0.0.1") == 10
    rep.write_text("127.0.0.0/8 20\n")
    reload_and_wait(srv, 2)
    current_workers(srv, 2, not_in=set(before.values()))
    assert score_of(c, 4, "127.0.0.1") == 20


# ------------------------------------------------------------------ 5. new data


def test_reload_picks_up_new_reputation_data(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    rep, srv, old, c = reputation_server(start, client, tmp_path)  # c: it moves
    assert score_of(c, 2, "127.200.1.2") == 10
    rep.write_text("127.0.0.0/8 90\n")
    reload_and_wait(srv, 2)
    new = current_workers(srv, 2, not_in=set(old.values()))
    assert score_of(c, 3, "127.0.0.1") == 90
    assert score_of(c, 4, "127.200.1.2") == 90
    assert owner_of(c.sock, new.values()) in new.values()
    assert score_of(client(srv.port), 5, "127.9.9.9") == 90


# ------------------------------------------------------------------ 6. rolling


def test_rolling_reload_under_load(
    start: StartServer, processes: list[Process], tmp_path: Path
) -> None:
    """-n 3, --reload-mode rolling, bench 8x16: 0 errors; worker k of the new
    generation is ready before old worker k hands over, and old worker 1 is
    handing over before new worker 3 even exists."""
    srv = start("--reload-mode", "rolling", workers=3)
    old = current_workers(srv, 3)
    b = bench(srv.port, tmp_path, connections=8, in_flight=16, duration=4)
    processes.append(b)
    wait_for(lambda: established(srv.port) >= 8, 10.0, "bench's 8 connections")
    time.sleep(1.0)  # let the load run
    with ExitWatcher(old.values()) as watcher:
        _, serving_at = reload_and_wait(srv, 2, timeout=15.0)
        wait_for(watcher.all_gone, 5.0, "every old worker to exit")
        exits = watcher.after(serving_at)
    assert_exits_within(exits, EXIT_BUDGET, "rolling reload")
    new = current_workers(srv, 3, not_in=set(old.values()))
    log = srv.wait_log(r"handed \d+ connection\(s\) over", count=3)

    lines = log.splitlines()
    start_at = find_line(log, r"SIGHUP: reloading")[0]
    ready_at: dict[int, int] = {}  # new worker index -> line number
    handing_at: dict[int, int] = {}  # old worker index -> line number
    for i, line in enumerate(lines[start_at:], start_at):
        if (m := READY.search(line)) and int(m[2]) in new.values():
            ready_at[int(m[1])] = i
        if (m := re.search(HANDING, line)) and int(m[1]) in old.values():
            handing_at[int(m[2])] = i
    print("rolling timeline:\n" + "\n".join(lines[start_at:]))
    assert sorted(ready_at) == sorted(handing_at) == [1, 2, 3], (ready_at, handing_at)
    assert ready_at[1] < ready_at[2] < ready_at[3], ready_at
    for k in (1, 2, 3):
        assert ready_at[k] < handing_at[k], f"old worker {k} handed over before its successor"
    assert handing_at[1] < ready_at[3], "the new workers were not started one at a time"
    result = bench_result(b, timeout=20.0)
    print("bench: messages={messages} sent={sent} acked={acked} errors={errors}".format(**result))
    assert result["errors"] == 0, result["errors_by_kind"]
    assert result["sent"] == result["acked"], result
    assert result["messages"] > 0


# ------------------------------------------------------------------ 7. drain


def disconnect_status(frames: list[Frame]) -> int:
    for f in frames:
        if f.type == FrameType.AGENT_DISCONNECT:
            return int(f.kv["status-code"])  # type: ignore[call-overload]
    raise AssertionError(f"no AGENT-DISCONNECT in {frames}")


def test_drain_reload_disconnects_idle_and_finishes_in_flight(
    start: StartServer, client: MakeClient
) -> None:
    graceful = 3.0
    srv = start(*APP, "--reload-mode", "drain", "--graceful-timeout", str(graceful), workers=2)
    old = current_workers(srv, 2)
    idle = client(srv.port)
    busy = client(srv.port)
    busy.notify(1, 1, slow_msg(5, 500))
    srv.wait_log(r"slow start 5")
    with ExitWatcher(old.values()) as watcher:
        _, serving_at = reload_and_wait(srv, 2)
        frames = idle.wait_closed(5.0)
        assert disconnect_status(frames) == Status.NORMAL == 0
        frames = busy.wait_closed(5.0)
        assert_ack(frames[0], 1, 1, (SET_VAR, TXN, "slow", 5))
        assert disconnect_status(frames[1:]) == 0
        new = current_workers(srv, 2, not_in=set(old.values()))
        fresh = client(srv.port)
        fresh.notify(2, 1, ver_msg())
        assert_ack(fresh.read_frame(), 2, 1, (SET_VAR, TXN, "ver", 1))
        assert owner_of(fresh.sock, new.values()) in new.values()
        wait_for(watcher.all_gone, graceful + 2.0, "the old workers to exit")
        exits = watcher.after(serving_at)
    assert_exits_within(exits, graceful, "drain reload")


# ------------------------------------------------------------------ 8. through HAProxy


@pytest.mark.parametrize("mode", ["handover", "rolling"], ids=lambda m: f"reload-{m}")
@pytest.mark.parametrize("haproxy_bin", haproxy_params())
def test_reload_through_haproxy_under_wrk(
    start: StartServer,
    processes: list[Process],
    tmp_path: Path,
    haproxy_bin: HAProxyBinary,
    mode: str,
) -> None:
    """HAProxy (option pipelining, one SPOE message per request) in front of
    spoa-mp -n 2 --reload-mode MODE, wrk -t1 -c20 -d6s, two SIGHUPs: no socket
    error, no non-2xx (a SPOE error would be a 503), no SPOE error in
    HAProxy's log."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (make deps installs it)")
    rep = tmp_path / "rep.txt"
    rep.write_text("127.0.0.0/8 50\n")
    srv = start("--reputation-file", str(rep), "--reload-mode", mode, workers=2)
    socket_dir = Path(tempfile.mkdtemp(prefix="spoa-rl-", dir="/tmp"))
    try:
        workdir = tmp_path / "haproxy"
        workdir.mkdir()
        config = ReloadHAProxyConfig(
            srv.port, SpoeForm.HTTP_NAMED, workdir, socket_dir, haproxy=haproxy_bin
        )
        config.write()
        haproxy = HAProxy(config, tmp_path)
        processes.append(haproxy)
        haproxy.wait_ready()
        haproxy.wait_server("UP", "L7OK")
        first = http_get(config.score_port, HOST)
        assert (first.status, first.score()) == (200, ("50", "")), first

        url = f"http://{HOST}:{config.score_port}/"
        wrk = start_wrk(url, tmp_path, "-t1", "-c20", "-d6s")
        processes.append(wrk)
        time.sleep(1.5)  # let the load run
        for gen in (2, 3):
            old = current_workers(srv, 2)
            with ExitWatcher(old.values()) as watcher:
                _, serving_at = reload_and_wait(srv, gen)
                wait_for(watcher.all_gone, 5.0, f"generation {gen - 1} workers to exit")
            assert_exits_within(watcher.after(serving_at), EXIT_BUDGET, f"reload {gen - 1}")
            time.sleep(1.5)  # load on the new generation
        assert wrk.wait(20.0) == 0, wrk.stderr()
        result = parse_wrk(wrk.stdout())
        print(wrk.stdout())
        moved = [int(m[3]) for m in HANDED.finditer(srv.log())]
        stat = haproxy.server_stat()
        front = next(
            r for r in haproxy.show_stat() if r["pxname"] == "score" and r["svname"] == "FRONTEND"
        )
        hlog = haproxy.stderr_path.read_text(errors="replace")
        spoe_status = re.findall(r"SPOE: \[iprep-agent\] .* sid=\d+ st=(\d+)", hlog)
        print(
            f"wrk: {result.requests} requests, {result.rate:.0f} req/s, socket errors "
            f"{result.socket_errors}, non-2xx {result.non_2xx}; connections moved per old "
            f"worker {moved}; HAProxy frontend 2xx={front['hrsp_2xx']} 5xx={front['hrsp_5xx']}, "
            f"agent server eresp={stat['eresp']} econ={stat['econ']} "
            f"srv_abrt={stat['srv_abrt']}; SPOE log lines {len(spoe_status)}, "
            f"non-zero status {sum(s != '0' for s in spoe_status)}"
        )
        assert_every_request_served(result)
        assert front["hrsp_5xx"] == "0", front
        assert (stat["eresp"], stat["econ"], stat["srv_abrt"]) == ("0", "0", "0"), stat
        assert all(s == "0" for s in spoe_status), [s for s in spoe_status if s != "0"][:10]
        last = http_get(config.score_port, HOST)
        assert (last.status, last.score()) == (200, ("50", "")), last
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


# ------------------------------------------------------------------ bugs found on the way


def test_fragmented_notify_under_way_at_the_reload(start: StartServer, client: MakeClient) -> None:
    srv = start(*APP, "--graceful-timeout", "6", workers=2)
    old = current_workers(srv, 2)
    c = client(srv.port)  # fragmentation is offered by the agent, on by default
    full = c.notify_bytes(1, 1, ver_msg(1))
    frames, _, _, _ = Decoder().decode(full, 16380)
    payload = full[frames[0][F_POFF] : frames[0][F_POFF] + frames[0][F_PLEN]]
    enc = c._encoder
    c.send(enc.raw_frame(FrameType.NOTIFY, 1, 1, payload=payload[:4], flags=0))  # FIN clear
    client_port = c.sock.getsockname()[1]
    wait_for(lambda: rx_queue(srv.port, client_port) == 0, what="the first fragment read")
    with ExitWatcher(old.values()) as watcher:
        reload_and_wait(srv, 2)
        srv.wait_log(HANDING, count=2)
        c.send(enc.raw_frame(FrameType.UNSET, 1, 1, payload=payload[4:], flags=1))  # the rest, FIN
        assert_ack(c.read_frame(3.0), 1, 1, (SET_VAR, TXN, "ver", 1))
        wait_for(watcher.all_gone, 5.0, "the old workers to exit")
    c.notify(2, 1, ver_msg())
    assert_ack(c.read_frame(), 2, 1, (SET_VAR, TXN, "ver", 1))


def test_rolling_reload_failing_midway_keeps_every_connection(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    """Rolling, -n 2: new worker 1 starts and takes old worker 1's
    connections, then new worker 2 fails to boot. The old generation should
    keep serving, and the connections moved to new worker 1 should live on."""
    srv = start(*APP, "--reload-mode", "rolling", workers=2)
    old = current_workers(srv, 2)
    owners: dict[SpopClient, int] = {}
    for _ in range(40):  # until both old workers have connections (accept is a race)
        c = client(srv.port)
        owners[c] = wait_for(lambda c=c: owner_of(c.sock, old.values()), what="an owner")
        if len(owners) >= 4 and set(owners.values()) == set(old.values()):
            break
    assert set(owners.values()) == set(old.values()), owners
    conns = list(owners)
    (tmp_path / "fail-hook-worker-2").touch()
    failed_reload_reason(srv)
    lost = []
    for sid, c in enumerate(conns, 1):
        try:
            c.notify(sid, 1, ver_msg())
            assert_ack(c.read_frame(3.0), sid, 1, (SET_VAR, TXN, "ver", 1))
        except (ConnectionError, TimeoutError, OSError) as e:
            lost.append((owners[c], repr(e)))
    try:
        current_workers(srv, 2, timeout=3.0)  # both slots serving again
        missing = ""
    except TimeoutError:
        missing = f"only workers {srv.workers_by_index()} left 3 s after the failed reload"
    assert (lost, missing) == ([], ""), "the failed rolling reload lost connections or a worker"


def test_handover_late_during_the_next_reload_keeps_the_connection(
    start: StartServer, client: MakeClient, tmp_path: Path
) -> None:
    """A generation-1 worker still finishing an async handler when a second
    SIGHUP starts generation 3 (slow to boot): once its ACK is out, it hands
    the connection over while generation 2 serves and generation 3 is not
    ready yet. The connection should move (to generation 2 or 3), not close."""
    srv = start(*APP, workers=2)
    c = client(srv.port)
    c.notify(1, 1, slow_msg(1, 1500))
    srv.wait_log(r"slow start 1")
    reload_and_wait(srv, 2)
    (tmp_path / "slow-hook").write_text("3")  # generation 3 takes 3 s to boot
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"SIGHUP: reloading \(generation 3")
    assert_ack(c.read_frame(5.0), 1, 1, (SET_VAR, TXN, "slow", 1))
    c.notify(2, 1, ver_msg())
    ack = c.read_frame(5.0)  # ConnectionClosedError: the connection was dropped
    assert_ack(ack, 2, 1, (SET_VAR, TXN, "ver", 1))
    srv.wait_log(SERVING.format(gen=3))

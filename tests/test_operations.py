"""Operating spoa-mp, end to end: systemd socket activation and sd_notify,
restarts on a socket held by the service manager, --pidfile, --user,
worker recycling (--max-requests, --max-rss), SIGTTIN/SIGTTOU and a worker
killed under load.

Every server is a real `python -m spoa_mp` process tree in its own session
(tests/support/server.py), killed with its process group at teardown; the
bench runs in its own session too. Every wait is bounded and polls a
condition or a socket with a deadline; the only sleeps let load run. Only
127.0.0.1 and Unix sockets are used.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path

import psutil
import pytest
from support.load import bench_result, spoa_bench
from support.processes import Process, child_env, dead, owner_of, title
from support.server import READY_LINE, SUPERVISOR_TITLE, WORKER_TITLE, Server, started
from support.spop_peer import ConnectionClosedError, Frame, SpopClient, TLSSpopClient, vector
from support.tls_certs import make_pki
from support.waits import HOST, IO_TIMEOUT, free_port, wait_for

from spoa_mp.codec import Decoder, Encoder, FrameType

pytestmark = pytest.mark.e2e

LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
SET_VAR, SESS = 1, 1
NOBODY = "nobody"
RUN_TIMEOUT = 20.0  # a short-lived spoa-mp command (refused start, bench)

# Started by Popen with the held listening socket at fd HELD_FD: moves it to
# fd 3 and execs spoa-mp in place, as systemd does (LISTEN_PID is this pid).
HELD_SOCKET_EXEC = """\
import os, sys
fd = int(os.environ.pop("HELD_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="spop", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "spoa_mp", *sys.argv[1:]])
"""


# ------------------------------------------------------------------ helpers


def clean_env() -> dict[str, str]:
    """The environment of a server: none of the runner's systemd variables."""
    return child_env(drop=LISTEN_VARS + NOTIFY_VARS)


def ip_msg(i: int) -> list[tuple[str, list[tuple[str, object]]]]:
    return [("check-client-ip", [("", IPv4Address(0x0A000000 + i % 2**24))])]


def assert_ip_score_ack(ack: Frame, sid: int, fid: int) -> None:
    assert ack.type == FrameType.ACK, ack
    assert (ack.sid, ack.fid) == (sid, fid), ack
    assert len(ack.actions) == 1, ack
    action, scope, name, value = ack.actions[0]
    assert (action, scope, name) == (SET_VAR, SESS, "ip_score"), ack
    assert isinstance(value, int)
    assert 0 <= value <= 100


class UnixSpopClient(SpopClient):
    """SpopClient over a Unix socket."""

    def __init__(self, path: str | Path, timeout: float = IO_TIMEOUT) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        self._encoder = Encoder()
        self._decoder = Decoder(max_frame_size=self.MAX_FRAME)
        self.eof = False


class Handshaken:
    """A client with its HELLO done that asks for one IP score at a time."""

    def __init__(self, client: SpopClient) -> None:
        self.c = client
        hello = client.hello("haproxy-hello 2.6")
        assert hello.type == FrameType.AGENT_HELLO, hello
        self.sid = 0

    def ask(self, timeout: float = IO_TIMEOUT) -> None:
        """One NOTIFY, and its ACK."""
        self.sid += 1
        self.c.notify(self.sid, 1, ip_msg(self.sid))
        assert_ip_score_ack(self.c.read_frame(timeout), self.sid, 1)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: it is in Debian's `systemd` package")
    return path


class ActivatedServer(Server):
    """`systemd-socket-activate -l ADDRESS --fdname=spop -E ... -- python -m
    spoa_mp -n N ARGS`: no -p, the listening socket comes from fd 3.
    systemd-socket-activate execs the server (same pid) on the first
    connection, which Server's wait for the port provides."""

    def __init__(
        self,
        cwd: Path,
        *args: str,
        listen: str | None = None,
        env: dict[str, str] | None = None,
        workers: int = 2,
        wait: bool = True,
    ) -> None:
        super().__init__(cwd, *args, workers=workers, wait=wait)
        self.listen = listen  # None: 127.0.0.1:<a free port>
        self.extra_env = env or {}

    def _start(self) -> None:
        address = self.listen or f"{HOST}:{self.port}"
        argv = [tool("systemd-socket-activate"), "-l", address, "--fdname=spop"]
        argv += [f"--setenv={name}" for name in self.extra_env]
        argv += ["--", sys.executable, "-m", "spoa_mp", "-n", str(self.workers), *self.args]
        self._spawn(argv, {**clean_env(), **self.extra_env})


class HeldSocketServer(ActivatedServer):
    """spoa-mp started on a listening socket that the test holds, passed as
    fd 3 with LISTEN_FDS=1 and LISTEN_PID=its pid: what systemd does with a
    .socket unit. The socket outlives the server."""

    def __init__(self, cwd: Path, held: socket.socket, *args: str, workers: int = 2) -> None:
        super().__init__(cwd, *args, workers=workers)
        self.held = held

    def _start(self) -> None:
        self.port = self.held.getsockname()[1]
        fd = self.held.fileno()
        argv = [sys.executable, "-c", HELD_SOCKET_EXEC, "-n", str(self.workers), *self.args]
        self._spawn(argv, {**clean_env(), "HELD_FD": str(fd)}, pass_fds=[fd])


class NotifyReceiver:
    """A SOCK_DGRAM Unix socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[tuple[float, dict[str, str]]] = []  # (monotonic, fields)

    def close(self) -> None:
        self.sock.close()

    def wait(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> tuple[int, dict[str, str]]:
        """The next datagram (index in `seen`, fields) that satisfies `predicate`;
        every datagram read on the way is kept in `seen`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no {what} within {timeout} s; seen {self.seen}")
            data = self.sock.recv(65536).decode()
            fields = dict(line.split("=", 1) for line in data.split("\n") if line)
            self.seen.append((time.monotonic(), fields))
            if predicate(fields):
                return len(self.seen) - 1, fields


def stop(srv: Server, timeout: float = 10.0) -> int:
    srv.signal(signal.SIGTERM)
    return srv.wait_exit(timeout)


@pytest.fixture
def bench(tmp_path: Path, processes: list[Process]) -> Callable[..., Process]:
    """bench(port, *args): start `spoa-mp bench -p PORT ARGS --json`; killed at teardown."""

    def _bench(port: int, *args: str) -> Process:
        processes.append(spoa_bench(port, tmp_path, *args, name=f"bench-{len(processes)}"))
        return processes[-1]

    return _bench


def spoa_mp_run(cwd: Path, *args: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """(exit status, stderr) of a spoa-mp command expected to end by itself
    within `timeout`; AssertionError (its process group killed) otherwise."""
    argv = [sys.executable, "-m", "spoa_mp", *args]
    proc = Process("spoa-mp-run", argv, cwd, cwd=cwd, env=clean_env())
    try:
        code = proc.wait(timeout)
    except TimeoutError:
        proc.kill()
        raise AssertionError(
            f"spoa-mp {' '.join(args)} still ran after {timeout} s:\n{proc.stderr()}"
        ) from None
    finally:
        proc.kill()  # a worker it may have left behind
    return code, proc.stderr()


def server_connections(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections of `pid` on its local `port`."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def listening_ports(pid: int) -> set[tuple[str, int]]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def log_time(stamp: str) -> float:
    """A log line's "YYYY-MM-DD HH:MM:SS,mmm" time stamp, in seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ------------------------------------------------- 1. systemd socket activation


def test_socket_activation_and_sd_notify_sequence(
    tmp_path: Path, sockdir: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    notify = NotifyReceiver(sockdir / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        srv = started(servers, ActivatedServer(tmp_path, env=env))
        pid = srv.pid

        # READY=1 with a STATUS line once both workers are ready
        i_ready, ready = notify.wait(lambda f: "READY" in f, 10, "READY=1")
        assert ready["READY"] == "1"
        assert re.match(r"2 worker\(s\), \d+ connection\(s\), \d+ msg/s, ", ready["STATUS"])

        # it serves on the inherited socket and did not bind one of its own
        c = Handshaken(SpopClient(srv.port))
        clients.append(c.c)
        c.ask()
        assert listening_ports(pid) == {(HOST, srv.port)}
        assert re.search(rf" on {HOST}:{srv.port}\b", srv.log())

        # WATCHDOG=1 (every WATCHDOG_USEC/2) keeps coming after READY
        t0 = time.monotonic()
        i_wd1, _ = notify.wait(lambda f: f.get("WATCHDOG") == "1", 3, "a first WATCHDOG=1")
        i_wd2, _ = notify.wait(lambda f: f.get("WATCHDOG") == "1", 3, "a second WATCHDOG=1")
        assert time.monotonic() - t0 < 3.0
        assert i_ready < i_wd1 < i_wd2

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, us), then READY=1
        before = monotonic_usec()
        srv.signal(signal.SIGHUP)
        i_reloading, reloading = notify.wait(lambda f: "RELOADING" in f, 10, "RELOADING=1")
        after = monotonic_usec()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        i_ready2, ready2 = notify.wait(lambda f: "READY" in f, 10, "READY=1 after the reload")
        assert "generation 2" in ready2["STATUS"]
        c.ask()  # the connection was handed over to generation 2

        # SIGTERM: STOPPING=1, then a clean exit
        c.c.close()
        srv.signal(signal.SIGTERM)
        i_stopping, _ = notify.wait(lambda f: "STOPPING" in f, 10, "STOPPING=1")
        assert srv.wait_exit() == 0, srv.log()
        assert i_ready < i_wd2 < i_reloading < i_ready2 < i_stopping
        # nothing claims readiness once the stop began
        with contextlib.suppress(TimeoutError):
            notify.wait(lambda f: False, 0.2, "")
        assert not any("READY" in f or "RELOADING" in f for _, f in notify.seen[i_stopping:])
    finally:
        notify.close()


def test_watchdog_pings_are_never_later_than_watchdog_usec(
    tmp_path: Path, sockdir: Path, servers: list[Server]
) -> None:
    """systemd kills a service that does not ping within WatchdogSec=; the
    supervisor aims at WatchdogSec/2 (here 0.5 s)."""
    notify = NotifyReceiver(sockdir / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        srv = started(servers, ActivatedServer(tmp_path, env=env, workers=1))
        notify.wait(lambda f: "READY" in f, 10, "READY=1")
        pings = []
        while len(pings) < 6:
            notify.wait(lambda f: f.get("WATCHDOG") == "1", 3, "WATCHDOG=1")
            pings.append(notify.seen[-1][0])
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # every 0.5 s, as the supervisor means to; systemd's limit is 1 s
        assert max(gaps) < 0.8, f"gaps between WATCHDOG=1 pings: {gaps}"
        assert stop(srv) == 0
    finally:
        notify.close()


def test_socket_activated_unix_socket_file_is_never_unlinked(
    tmp_path: Path, sockdir: Path, servers: list[Server]
) -> None:
    path = sockdir / "agent.sock"
    # --unix names the same path, as a config file might: under socket
    # activation the inherited socket wins and the file stays systemd's
    srv = ActivatedServer(tmp_path, "--unix", str(path), listen=str(path), wait=False)
    started(servers, srv)
    wait_for(path.exists, 10, "systemd-socket-activate to bind the Unix socket")
    inode = path.stat().st_ino
    with UnixSpopClient(path) as raw:  # the first connection starts the server
        c = Handshaken(raw)
        c.ask()
    srv.wait_ready(2)
    assert f" on unix:{path}" in srv.log()
    assert stop(srv) == 0, srv.log()
    assert path.exists(), "spoa-mp removed the socket file systemd created"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert path.stat().st_ino == inode


def hello_without_a_certificate(
    port: int, context: ssl.SSLContext, clients: list[SpopClient]
) -> Frame:
    """TLS 1.3 finishes the client's handshake first: the refusal (an alert,
    or the close) comes with the first read."""
    client = TLSSpopClient(port, context)
    clients.append(client)
    return client.hello()


def test_socket_activated_tls_serves_a_real_tls_client(
    tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    """--tls-cert/--tls-key/--tls-client-ca on the socket systemd passes: a
    client with a certificate of the CA gets its scores over TLS; one without
    a certificate, and plain SPOP, are refused; the first goes on untouched."""
    pki = make_pki(tmp_path / "pki")
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    srv = started(servers, ActivatedServer(tmp_path, *tls, "--tls-client-ca", str(pki.ca)))
    assert "TLS on every listener (" in srv.log()
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    c = Handshaken(TLSSpopClient(srv.port, context))
    clients.append(c.c)
    c.ask()
    assert isinstance(c.c.sock, ssl.SSLSocket)
    assert c.c.sock.version() in ("TLSv1.2", "TLSv1.3")
    no_cert = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((ssl.SSLError, ConnectionError, ConnectionClosedError)):
        hello_without_a_certificate(srv.port, no_cert, clients)
    with socket.create_connection((HOST, srv.port), timeout=IO_TIMEOUT) as plain:
        plain.sendall(vector("haproxy-hello 2.6"))
        got = b""
        with contextlib.suppress(ConnectionResetError):  # closed with our HELLO unread
            while chunk := plain.recv(4096):
                got += chunk
    assert len(got) < 5 or got[4] != FrameType.AGENT_HELLO, got  # nothing or a TLS alert
    c.ask()
    assert "TLS handshake failed" in srv.wait_log("TLS handshake failed")
    assert stop(srv) == 0, srv.log()


# --------------------------------------- 2. a restart on the held socket loses nothing


def test_connection_made_during_a_restart_waits_in_the_held_socket(
    tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        held.bind((HOST, 0))
        held.listen(128)
        port = held.getsockname()[1]

        first = started(servers, HeldSocketServer(tmp_path, held))
        with SpopClient(port) as raw:
            Handshaken(raw).ask()
        assert stop(first) == 0, first.log()
        assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)

        # nobody accepts now: the kernel completes the handshake and queues it
        waiting = SpopClient(port)
        clients.append(waiting)
        waiting.send(vector("haproxy-hello 2.6"))
        waiting.notify(1, 1, ip_msg(1))
        assert not select.select([waiting.sock], [], [], 0.3)[0], "answered with no server?"

        second = started(servers, HeldSocketServer(tmp_path, held))
        hello = waiting.read_frame(10)
        assert hello.type == FrameType.AGENT_HELLO, hello
        assert_ip_score_ack(waiting.read_frame(), 1, 1)
        assert owner_of(waiting.sock, [p.pid for p in second.children()]) is not None
        waiting.close()
        assert stop(second) == 0, second.log()
    finally:
        held.close()


# ------------------------------------------------------------------ 3. --pidfile


def test_pidfile_written_removed_on_stop_and_stale_one_replaced(
    tmp_path: Path, servers: list[Server]
) -> None:
    pidfile = tmp_path / "spoa-mp.pid"
    srv = started(servers, Server(tmp_path, "--pidfile", str(pidfile), workers=1))
    assert pidfile.read_text() == f"{srv.pid}\n"
    assert stop(srv) == 0, srv.log()
    assert not pidfile.exists()

    # a stale pidfile: the pid of a process that is gone
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=5)
    assert not psutil.pid_exists(gone.pid)
    pidfile.write_text(f"{gone.pid}\n")
    srv2 = started(servers, Server(tmp_path, "--pidfile", str(pidfile), workers=1))
    assert pidfile.read_text() == f"{srv2.pid}\n"
    assert stop(srv2) == 0, srv2.log()
    assert not pidfile.exists()


def test_second_server_with_the_same_pidfile_refuses(tmp_path: Path, servers: list[Server]) -> None:
    pidfile = tmp_path / "spoa-mp.pid"
    srv = started(servers, Server(tmp_path, "--pidfile", str(pidfile), workers=1))
    assert pidfile.read_text() == f"{srv.pid}\n"

    port = str(free_port())
    code, err = spoa_mp_run(tmp_path, "-p", port, "-n", "1", "--pidfile", str(pidfile), timeout=5)
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"spoa-mp: error: .*already runs as pid {srv.pid}\n", err), err
    assert pidfile.read_text() == f"{srv.pid}\n"  # the first one's file, untouched
    assert srv.alive()
    assert stop(srv) == 0, srv.log()
    assert not pidfile.exists()


# ------------------------------------------------------------------ 4. --user


def test_user_switch_supervisor_and_workers(
    tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    pw = pwd.getpwnam(NOBODY)
    srv = started(servers, Server(tmp_path, "--user", NOBODY))
    workers = srv.wait_workers(lambda w: sorted(w) == [1, 2], what="2 workers")
    for p in [srv.ps, *(psutil.Process(pid) for pid in workers.values())]:
        assert p is not None
        assert tuple(p.uids()) == (pw.pw_uid,) * 3, p
        assert tuple(p.gids()) == (pw.pw_gid,) * 3, p
    assert f"running as uid {pw.pw_uid} gid {pw.pw_gid}" in srv.log()
    c = Handshaken(SpopClient(srv.port))
    clients.append(c.c)
    c.ask()
    c.c.close()
    assert stop(srv) == 0, srv.log()

    code, err = spoa_mp_run(tmp_path, "-p", str(free_port()), "-n", "1", "--user", "nosuchuser")
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("spoa-mp: error: ")
    assert "nosuchuser" in err


def test_pidfile_names_nobody_after_a_clean_stop_with_user_switch(
    tmp_path: Path, servers: list[Server]
) -> None:
    """In a root-owned directory (like /run) the unprivileged supervisor
    cannot unlink its pidfile; it must at least leave it naming nobody, so a
    later start (or a reused pid) is never refused because of it."""
    # root-owned and world-readable, like /run (pytest's own dirs are 0700)
    run_dir = Path(tempfile.mkdtemp(prefix="spoa-run-", dir="/tmp"))
    try:
        run_dir.chmod(0o755)
        pidfile = run_dir / "spoa-mp.pid"
        srv = started(
            servers, Server(tmp_path, "--user", NOBODY, "--pidfile", str(pidfile), workers=1)
        )
        assert pidfile.read_text() == f"{srv.pid}\n"
        assert stop(srv) == 0, srv.log()
        assert not pidfile.exists() or pidfile.read_text().strip() == ""
        again = started(servers, Server(tmp_path, "--pidfile", str(pidfile), workers=1))
        assert pidfile.read_text() == f"{again.pid}\n"
        assert stop(again) == 0, again.log()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------ 5. --max-requests recycling


def test_max_requests_recycles_workers_under_load_without_losing_a_message(
    tmp_path: Path, servers: list[Server], bench: Callable[..., Process]
) -> None:
    srv = started(
        servers, Server(tmp_path, "--max-requests", "2000", "--max-requests-jitter", "500")
    )
    run = bench(srv.port, "-c", "4", "-P", "8", "-d", "4")

    titles: set[str] = set()
    while run.alive():  # sample the workers' titles while it runs
        titles.update(title(k) for k in srv.children())
        time.sleep(0.05)
    result = bench_result(run, RUN_TIMEOUT)

    assert result["errors"] == 0, result
    assert result["sent"] == result["acked"] > 0, result
    log = srv.log()
    replaced = [int(n) for n in re.findall(r"handled (\d+) messages: replacing it", log)]
    assert len(replaced) >= 2, log
    print(f"--max-requests: {len(replaced)} replacements, {result['acked']} ACKs, no error")
    assert min(replaced) >= 2000
    assert re.search(r"handed [1-9]\d* connection\(s\) over", log), log
    # a just-forked child still has its parent's title for an instant
    indexes = {m[1] for t in titles if (m := WORKER_TITLE.match(t))}
    assert indexes == {"1", "2"}, titles
    assert titles <= {"spoa-mp: worker 1", "spoa-mp: worker 2", SUPERVISOR_TITLE, ""}, titles

    def two_workers() -> bool:
        kids = [k for k in srv.children() if not dead(k)]
        return len(kids) == 2 and sorted(srv.workers_by_index()) == [1, 2]

    wait_for(two_workers, 10, "exactly 2 workers at the end")
    assert stop(srv) == 0, srv.log()


# ------------------------------------------------------------ 6. --max-rss recycling


def test_max_rss_replaces_workers_and_hands_connections_over(
    tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    srv = started(servers, Server(tmp_path, "--max-rss", "1"))
    t0 = time.monotonic()
    c = Handshaken(SpopClient(srv.port))
    clients.append(c.c)
    c.ask()
    first_owner = owner_of(c.c.sock, srv.workers_by_index().values())
    assert first_owner is not None

    rx = re.compile(r"worker (\d+) \(pid (\d+)\) uses (\d+) MiB \(--max-rss 1\): replacing it")
    moved_to = None
    while time.monotonic() - t0 < 15:
        c.ask()  # keeps being answered throughout
        replaced = {int(m[2]) for m in rx.finditer(srv.log())}
        if first_owner in replaced:
            owner = owner_of(c.c.sock, srv.workers_by_index().values())
            if owner is not None and owner != first_owner:
                moved_to = owner
                break
        time.sleep(0.05)
    log = srv.log()
    assert rx.search(log), log
    assert moved_to is not None, f"the connection stayed with pid {first_owner}:\n{log}"
    assert time.monotonic() - t0 < 13, "the first check runs 5 s after the start"
    for _ in range(5):
        c.ask()
    srv.wait_log(rf"\(pid {first_owner}\) handed [1-9]\d* connection\(s\) over", 5)
    print(f"--max-rss 1: the connection moved to pid {moved_to} {time.monotonic() - t0:.1f} s in")
    c.c.close()
    assert stop(srv) == 0, srv.log()


# ------------------------------------------------------------ 7. SIGTTIN / SIGTTOU


def test_sigttin_adds_a_worker_and_sigttou_hands_the_highest_over(
    tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    srv = started(servers, Server(tmp_path))
    base = srv.wait_workers(lambda w: sorted(w) == [1, 2], what="2 workers")

    srv.signal(signal.SIGTTIN)
    w = srv.wait_workers(lambda w: sorted(w) == [1, 2, 3], what="worker 3")
    srv.wait_log(r"worker 3 ready \(pid \d+\)")
    assert title(psutil.Process(w[3])) == "spoa-mp: worker 3"
    assert {w[1], w[2]} == set(base.values())

    # connections served by worker 3: the others are stopped while they connect
    on_three: list[Handshaken] = []
    for pid in base.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            c = SpopClient(srv.port)
            clients.append(c)
            on_three.append(Handshaken(c))
    finally:
        for pid in base.values():
            os.kill(pid, signal.SIGCONT)
    others = [Handshaken(SpopClient(srv.port)) for _ in range(4)]
    clients.extend(h.c for h in others)
    for h in on_three:
        h.ask()
        assert owner_of(h.c.sock, [w[3]]) == w[3]

    srv.signal(signal.SIGTTOU)
    log = srv.wait_log(rf"worker 3 \(pid {w[3]}\) handed \d+ connection\(s\) over")
    moved = re.search(rf"worker 3 \(pid {w[3]}\) handed (\d+) connection", log)
    assert moved is not None
    assert int(moved[1]) >= len(on_three)
    srv.wait_workers(lambda w: sorted(w) == [1, 2], what="back to 2 workers")
    for h in on_three + others:
        h.ask()
        assert owner_of(h.c.sock, base.values()) in base.values()

    srv.signal(signal.SIGTTOU)  # 2 -> 1: worker 2 hands over
    srv.wait_workers(lambda w: sorted(w) == [1], what="1 worker")
    srv.signal(signal.SIGTTOU)  # the last one stays
    srv.wait_log(r"SIGTTOU: keeping the last worker")
    assert srv.workers_by_index() == {1: base[1]}
    for h in on_three + others:
        h.ask()
    for h in on_three + others:
        h.c.close()
    assert stop(srv) == 0, srv.log()


def test_sigttin_after_sigttou_keeps_the_workers_numbered_from_1(
    tmp_path: Path, servers: list[Server]
) -> None:
    srv = started(servers, Server(tmp_path))
    base = srv.wait_workers(lambda w: sorted(w) == [1, 2], what="2 workers")
    os.kill(base[2], signal.SIGSTOP)  # stands for a worker slow to hand over
    try:
        srv.signal(signal.SIGTTOU)
        srv.wait_log(r"SIGTTOU: 1 worker\(s\); worker 2 hands over")
        srv.signal(signal.SIGTTIN)
        srv.wait_log(r"SIGTTIN: 2 worker\(s\)")
        wait_for(lambda: len(srv.ready_lines()) == 3, 10, "the added worker ready")
    finally:
        os.kill(base[2], signal.SIGCONT)
    wait_for(lambda: not psutil.pid_exists(base[2]) or dead(psutil.Process(base[2])), 10)
    w = srv.wait_workers(lambda w: len(w) == 2, what="2 workers again")
    assert sorted(w) == [1, 2], f"worker titles: {sorted(w)}"


# ------------------------------------------------- 8. kill -9 of a worker under load


def test_killed_worker_is_replaced_quickly_and_only_its_connections_fail(
    tmp_path: Path, servers: list[Server], bench: Callable[..., Process]
) -> None:
    srv = started(servers, Server(tmp_path))
    workers = srv.wait_workers(lambda w: sorted(w) == [1, 2], what="2 workers")

    def spread() -> dict[int, int] | None:
        counts = {i: server_connections(pid, srv.port) for i, pid in workers.items()}
        return counts if sum(counts.values()) == 8 else None

    # the kernel may give all 8 to one worker: then nobody would survive to
    # show that the others carry on, so start the bench again
    for _ in range(5):
        run = bench(srv.port, "-c", "8", "-P", "16", "-d", "4", "--warmup", "0.5")
        counts = wait_for(spread, 10, "the bench's 8 connections")
        if all(counts.values()):
            break
        run.kill()
        wait_for(lambda: not any(server_connections(p, srv.port) for p in workers.values()),
                 10, "the bench's connections closed")  # fmt: skip
    else:
        pytest.fail(f"the bench's connections never spread over both workers: {counts}")
    time.sleep(1.0)  # let it run
    victim = max(counts, key=lambda i: counts[i])
    survivor = 3 - victim
    lost = counts[victim]
    old_pid = workers[victim]
    ready_before = len(srv.ready_lines())

    t_kill = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def replaced() -> int | None:
        for index, pid in srv.ready_lines()[ready_before:]:
            if index == victim and pid != old_pid:
                return pid
        return None

    new_pid = wait_for(replaced, 5, f"a new worker {victim}", interval=0.005)
    elapsed = time.monotonic() - t_kill
    print(f"kill -9 of worker {victim}: replacement (pid {new_pid}) ready in {elapsed:.3f} s")
    assert elapsed < 1.0, srv.log()

    # the other worker's connections carry on: it keeps reading NOTIFYs
    busy = psutil.Process(workers[survivor])
    cpu0 = sum(busy.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(busy.cpu_times()[:2]) - cpu0 > 0.1, "the surviving worker went idle"
    assert server_connections(workers[survivor], srv.port) == counts[survivor]

    result = bench_result(run, RUN_TIMEOUT)
    kinds = {k: v for k, v in result["errors_by_kind"].items() if v}
    assert result["errors"] > 0, result
    assert set(kinds) <= {"closed", "unanswered"}, kinds
    assert kinds.get("closed") == lost, (kinds, counts)
    assert kinds.get("unanswered", 0) <= 16 * lost, (kinds, counts)
    assert result["messages"] > 0
    assert result["acked"] + kinds.get("unanswered", 0) == result["sent"], result
    log = srv.log()
    died = re.search(
        rf"^(\S+ \S+) .*worker {victim} \(pid {old_pid}\) was killed by SIGKILL", log, re.M
    )
    assert died, log
    ready = re.search(rf"^(\S+ \S+) .*worker {victim} ready \(pid {new_pid}\)", log, re.M)
    assert ready, log
    print(
        f"supervisor log: death seen -> replacement ready in "
        f"{(log_time(ready[1]) - log_time(died[1])) * 1000:.0f} ms; bench: "
        f"{result['messages']} messages, errors {kinds}, {lost} of 8 connections on the victim"
    )
    for line in log.splitlines():  # nothing else went wrong
        assert " ERROR " not in line, line
    assert READY_LINE.search(log)
    assert stop(srv) == 0, srv.log()

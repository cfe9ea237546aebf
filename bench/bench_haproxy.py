#!/usr/bin/env python3
"""HAProxy 2.6 requests/s under wrk with the SPOE filter (spoa-mp) over without it.

    .venv/bin/python bench/bench_haproxy.py          # nbthread 1, 1 worker, pipelining on and off
    .venv/bin/python bench/bench_haproxy.py --nbthread 1 2 --workers 1 2 --repeat 3
    .venv/bin/python bench/bench_haproxy.py --duration 5 --repeat 1 --json

Every configuration is one HAProxy frontend on 127.0.0.1 that answers by itself
(`http-request return`, no backend server):

    http-request return status 503 ... if { var(txn.iprep.error) -m found }
    http-request return status 200 content-type text/plain \
        lf-string "score=%[var(sess.iprep.ip_score)] err=%[var(txn.iprep.error)]\\n"

"nofilter" is that frontend as it is; "spoe" adds one line, `filter spoe engine
iprep config spoe.conf`, whose agent (`python -m spoa_mp -n N`, the default
IP-reputation agent) gets one NOTIFY `check-client-ip` (`args src`) per event.
The event defaults to on-frontend-http-request, which fires for every HTTP
request, keep-alive or not. In HAProxy 2.6's HTTP mode on-client-session
(--event) does too: every request on a keep-alive connection is a new stream,
and the event fires per stream (checked: 8 requests on one connection got 8
different random scores, and the agent received one 36-byte NOTIFY per
request either way; the "agent B/req" column shows it: bytes the agent's
sockets received per request, from `ss` tcp_info). A request whose NOTIFY
failed (`option set-on-error error`) is answered 503, which wrk counts as
non-2xx; after each run a few requests over a plain socket (one keep-alive
connection) check that scores are there and change from request to request.

The SPOE side is spop.md 9.5: `timeout hello 2s`, `timeout idle 2m`,
`timeout processing 1s` (long enough that nothing times out under load),
`option var-prefix iprep`, agents backend `mode tcp`, `timeout server 3m`,
`option spop-check`, and `option pipelining` or `no option pipelining` (spoa-mp
offers pipelining when HAProxy does).

For each run: start the agent (spoe only) and HAProxy, wait until the agent
server is UP, warm up with wrk for --warmup s, then `wrk -t T -c C -d D
--latency`, while sampling the spoa-mp workers' RSS and the CPU time HAProxy,
the workers and wrk use; then stop everything. Runs are interleaved over
--repeat rounds (every configuration once per round) so that drift hits them
alike; the figures are medians over the rounds. The ratio of a spoe
configuration is its median req/s over the median of "nofilter" with the same
nbthread (the same HAProxy settings with and without the filter); "paired"
is the median of the per-round ratios.

The machine may be shared: before each run the script waits (--quiet-timeout)
until the rest of the machine uses less than --max-others cores, redoes a run
during which it used more (--noisy-retries) and leaves such runs out of the
medians when a configuration has clean ones. A run whose agent was signalled
by someone else or lost a worker counts as failed (and the exit status is 1).

Everything listens on 127.0.0.1 only, temporary files go to a temporary
directory, and every process started (each in its own process group) is
stopped at the end, with bounded waits, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

HOST = "127.0.0.1"
START_TIMEOUT = 20.0  # process start until ready
STOP_TIMEOUT = 10.0  # SIGTERM until exit, then SIGKILL
IO_TIMEOUT = 5.0
AGENT_BACKEND = "iprep-agents"
AGENT_SERVER = "agent1"
FRONTEND = "bench"
TARGET_NO_PIPELINING = 0.40
TARGET_PIPELINING = 0.53
BODY = re.compile(rb"score=(?P<score>\S*) err=(?P<err>\S*)")
EVENTS = ("on-frontend-http-request", "on-client-session")

T = TypeVar("T")


# ------------------------------------------------------------------ primitives


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Proc:
    """A child in its own session (process group), output in log files.

    `stop()`: `signum` to the leader, a bounded wait, then SIGKILL to the group
    and to every descendant ever seen (in case one left the group)."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log_dir / f"{name}.log"
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)
        self._known: dict[int, psutil.Process] = {self.pid: self.ps}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[psutil.Process]:
        try:
            kids = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return kids

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        self.children()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # session leader: pgid == pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        others = [p for pid, p in self._known.items() if pid != self.pid]
        for p in others:
            if not _gone(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: all(_gone(p) for p in others), timeout, f"{self.name} to die")


class Procs:
    """Every process started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.live: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], log_dir: Path) -> Proc:
        p = Proc(name, argv, log_dir)
        self.live.append(p)
        return p

    def stop(self, p: Proc) -> None:
        try:
            p.stop()
        finally:
            with contextlib.suppress(ValueError):
                self.live.remove(p)

    def stop_all(self) -> None:
        while self.live:
            self.stop(self.live[-1])


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Setup:
    spoe: bool
    nbthread: int
    workers: int = 0  # agent workers (spoe only)
    pipelining: bool = False  # spoe-agent option pipelining (spoe only)

    @property
    def name(self) -> str:
        if not self.spoe:
            return f"nofilter nt{self.nbthread}"
        pipe = "pipe" if self.pipelining else "nopipe"
        return f"spoe nt{self.nbthread} w{self.workers} {pipe}"

    @property
    def baseline(self) -> Setup:
        return Setup(spoe=False, nbthread=self.nbthread)


def render_spoe(pipelining: bool, event: str, processing_ms: int) -> str:
    return f"""\
[iprep]
spoe-agent iprep-agent
    messages check-client-ip
    option var-prefix iprep
    option set-on-error error
    {"" if pipelining else "no "}option pipelining
    timeout hello      2s
    timeout idle       2m
    timeout processing {processing_ms}ms
    use-backend {AGENT_BACKEND}

spoe-message check-client-ip
    args src
    event {event}
"""


def render_haproxy(
    setup: Setup,
    port: int,
    agent_port: int,
    spoe_path: Path,
    stats_socket: Path,
    maxconn: int,
    check: bool,
) -> str:
    body = "score=%[var(sess.iprep.ip_score)] err=%[var(txn.iprep.error)]\\n"
    filter_line = f"    filter spoe engine iprep config {spoe_path}\n" if setup.spoe else ""
    agents = ""
    if setup.spoe:
        agents = f"""
backend {AGENT_BACKEND}
    mode tcp
    timeout connect 5s
    timeout server  3m
{"    option spop-check" if check else ""}
    server {AGENT_SERVER} {HOST}:{agent_port}{" check inter 10s" if check else ""}
"""
    return f"""\
global
    nbthread {setup.nbthread}
    maxconn {maxconn}
    stats socket {stats_socket} mode 600 level admin
    stats timeout 30s

defaults
    mode http
    timeout connect 5s
    timeout client  30s
    timeout server  30s
    timeout http-keep-alive 30s

frontend {FRONTEND}
    bind {HOST}:{port}
    maxconn {maxconn}
{filter_line}\
    http-request return status 503 content-type text/plain lf-string "{body}" \
if {{ var(txn.iprep.error) -m found }}
    http-request return status 200 content-type text/plain lf-string "{body}"
{agents}"""


# ------------------------------------------------------------------ HAProxy stats


def stats_command(sock: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT)
        s.connect(str(sock))
        s.sendall(line.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def show_stat(sock: Path) -> dict[tuple[str, str], dict[str, str]]:
    text = stats_command(sock, "show stat")
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise RuntimeError(f"unexpected 'show stat' answer: {text[:200]!r}")
    rows = csv.DictReader([lines[0][2:], *(ln for ln in lines[1:] if ln)])
    return {(r["pxname"], r["svname"]): r for r in rows}


def _int(row: dict[str, str] | None, key: str) -> int:
    if row is None:
        return 0
    try:
        return int(row.get(key) or 0)
    except ValueError:
        return 0


# ------------------------------------------------------------------ HTTP samples


def sample_keepalive(port: int, n: int) -> list[tuple[int, bytes, bytes]]:
    """n GETs on one HTTP/1.1 keep-alive connection: (status, score, err)."""
    out = []
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as s:
        buf = b""
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-haproxy\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("connection closed before a response")
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            while len(buf) < length:
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("connection closed in a body")
                buf += data
            body, buf = buf[:length], buf[length:]
            mb = BODY.search(body)
            if mb is None:
                raise RuntimeError(f"unexpected body {body!r}")
            out.append((status, mb.group("score"), mb.group("err")))
    return out


def check_samples(setup: Setup, event: str, samples: list[tuple[int, bytes, bytes]]) -> str:
    """'' when the samples are as expected, else what is wrong."""
    problems = []
    for status, score, err in samples:
        if status != 200 or err:
            problems.append(f"status {status} err={err.decode(errors='replace')!r}")
        elif setup.spoe and not (score.isdigit() and 0 <= int(score) <= 100):
            problems.append(f"score {score!r}")
        elif not setup.spoe and score:
            problems.append(f"score {score!r} without the filter")
    if setup.spoe and not problems and len(samples) >= 5 and len({s for _, s, _ in samples}) == 1:
        # random scores 0..100: equal ones all along mean one NOTIFY for all (both
        # events fire per request in HAProxy 2.6's HTTP mode)
        problems.append(f"the same score for every request of the connection ({event})")
    return "; ".join(problems)


# ------------------------------------------------------------------ wrk


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    lat = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)$", out, re.M)}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = dict(
        zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)
        if sock
        else {}
    )
    return {
        "rps": float(rps.group(1)),
        "requests": int(num(r"(\d+) requests in")),
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non2xx": int(num(r"Non-2xx or 3xx responses:\s+(\d+)")),
        "socket_errors": socket_errors,
    }


def run_wrk(
    procs: Procs, args: argparse.Namespace, url: str, seconds: float, log_dir: Path
) -> tuple[Proc, Callable[[], str]]:
    argv = [
        args.wrk,
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{seconds:g}s",
        "--latency",
        url,
    ]
    p = procs.start("wrk", argv, log_dir)
    start = p.log.stat().st_size

    def finish() -> str:
        try:
            p.popen.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError("wrk did not finish in time") from None
        finally:
            procs.stop(p)
        with p.log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if p.popen.returncode != 0:
            raise RuntimeError(f"wrk exited with {p.popen.returncode}:\n{text}")
        return text

    return p, finish


# ------------------------------------------------------------------ sampling


class Sampler(threading.Thread):
    """Max RSS of each spoa-mp worker, every `interval` s, until stopped."""

    def __init__(self, workers: list[psutil.Process], interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.workers = workers
        self.interval = interval
        self.rss: dict[int, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for w in self.workers:
                with contextlib.suppress(psutil.Error):
                    rss = w.memory_info().rss
                    self.rss[w.pid] = max(self.rss.get(w.pid, 0), rss)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def cpu_seconds(ps: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in ps:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait: user,
    system, softirq, steal...), summed over CPUs."""
    t = psutil.cpu_times()._asdict()
    # guest time is already counted in user time on Linux
    skip = ("idle", "iowait", "guest", "guest_nice")
    return sum(v for k, v in t.items() if k not in skip)


def wait_quiet(threshold: float, timeout: float) -> float:
    """Until the machine, this process left out, is busy for less than `threshold`
    cores over one second (at most `timeout` s); returns the last figure."""
    deadline = time.monotonic() + timeout
    me = [psutil.Process()]
    while True:
        t0, busy0, own0 = time.monotonic(), machine_busy(), cpu_seconds(me)
        time.sleep(1.0)
        wall = time.monotonic() - t0
        others = ((machine_busy() - busy0) - (cpu_seconds(me) - own0)) / wall
        if others < threshold or time.monotonic() >= deadline:
            return max(others, 0.0)


def agent_bytes_received(agent_port: int) -> int | None:
    """Bytes received so far by the agent's side of its established TCP connections
    (`ss` tcp_info bytes_received); None without `ss`. HAProxy 2.6 keeps its SPOE
    connections open (`timeout idle 2m`), so a difference over a run is what HAProxy
    sent during it; a connection closed in between would drop out of the sum."""
    if shutil.which("ss") is None:
        return None
    try:
        out = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( sport = :{agent_port} )"],
            capture_output=True,
            text=True,
            timeout=IO_TIMEOUT,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(m) for m in re.findall(r"bytes_received:(\d+)", out))


# ------------------------------------------------------------------ one run


@dataclass
class RunResult:
    setup: str
    round: int
    rps: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    non2xx: int
    socket_errors: dict[str, int]
    worker_rss_mib: list[float] = field(default_factory=list)
    cpu_haproxy: float = 0.0  # CPU seconds per wall second (cores) during the run
    cpu_agent: float = 0.0
    cpu_wrk: float = 0.0
    cpu_others: float = 0.0  # the machine's busy time but ours (noise)
    cpu_busy: float = 0.0  # the whole machine, softirq (loopback TCP) included
    agent_bytes_per_req: float | None = None  # bytes the agent received per request
    agent_conns_max: int | None = None  # smax of the agent server
    agent_conns_total: int | None = None  # stot: connections opened
    samples_problem: str = ""
    attempts: int = 1  # runs made (the earlier ones were noisy)
    noisy: bool = False  # others used >= --max-others cores even in the last attempt

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def one_run(setup: Setup, rnd: int, args: argparse.Namespace, tmp: Path, procs: Procs) -> RunResult:
    run_dir = Path(tempfile.mkdtemp(prefix=f"r{rnd}-", dir=tmp))
    port = free_port()
    agent_port = free_port()
    spoe_path = run_dir / "spoe.conf"
    cfg_path = run_dir / "haproxy.cfg"
    stats_socket = run_dir / "s.sock"
    spoe_path.write_text(render_spoe(setup.pipelining, args.event, args.processing_ms))
    cfg_path.write_text(
        render_haproxy(
            setup, port, agent_port, spoe_path, stats_socket, args.maxconn, not args.no_check
        )
    )
    chk = subprocess.run(
        [args.haproxy, "-c", "-f", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy -c failed:\n{chk.stdout}{chk.stderr}")

    agent = None
    workers: list[psutil.Process] = []
    if setup.spoe:
        argv = [
            args.python,
            "-m",
            "spoa_mp",
            "-p",
            str(agent_port),
            "-n",
            str(setup.workers),
            "--host",
            HOST,
            "--graceful-timeout",
            "3",
            *shlex.split(args.agent_args),
        ]
        agent = procs.start("spoa-mp", argv, run_dir)

        def forked() -> list[psutil.Process] | None:
            agent.check_alive()
            kids = agent.children()
            if len(kids) != setup.workers:
                return None
            try:
                with socket.create_connection((HOST, agent_port), timeout=0.5):
                    return kids
            except OSError:
                return None

        workers = wait_for(forked, START_TIMEOUT, "spoa-mp's workers")

    hap = procs.start("haproxy", [args.haproxy, "-f", str(cfg_path), "-db"], run_dir)

    def ready() -> bool:
        hap.check_alive()
        try:
            stat = show_stat(stats_socket)
        except (OSError, RuntimeError):
            return False
        if stat.get((FRONTEND, "FRONTEND"), {}).get("status") != "OPEN":
            return False
        if setup.spoe and not args.no_check:
            return stat[(AGENT_BACKEND, AGENT_SERVER)]["status"] == "UP"
        return True

    wait_for(ready, START_TIMEOUT, "HAProxy ready (and the agent server UP)")
    url = f"http://{HOST}:{port}/"
    if args.warmup > 0:
        _, finish = run_wrk(procs, args, url, args.warmup, run_dir)
        finish()

    before = show_stat(stats_socket)
    got_before = agent_bytes_received(agent_port) if setup.spoe else None
    sampler = Sampler(workers)
    sampler.start()
    wrk, finish = run_wrk(procs, args, url, args.duration, run_dir)
    everything = [psutil.Process(), hap.ps, wrk.ps, *workers]
    if agent is not None:
        everything.append(agent.ps)

    def snapshot() -> tuple[float, float, float, float, float, float]:
        return (
            cpu_seconds([hap.ps]),
            cpu_seconds(workers),
            cpu_seconds([wrk.ps]),
            cpu_seconds(everything),
            time.monotonic(),
            machine_busy(),
        )

    try:
        # CPU over the run, up to just before wrk ends (it is reaped by finish())
        snap0 = snapshot()
        deadline = snap0[4] + args.duration - 0.3
        while time.monotonic() < deadline and wrk.alive():
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        snap1 = snapshot()
        out = finish()
    finally:
        sampler.stop()
    got_after = agent_bytes_received(agent_port) if setup.spoe else None
    if agent is not None:
        agent.check_alive()
        dead = [w.pid for w in workers if _gone(w)]
        if dead:
            raise RuntimeError(f"spoa-mp worker(s) {dead} died during the run")
    after = show_stat(stats_socket)
    w = parse_wrk(out)
    wall = max(snap1[4] - snap0[4], 1e-9)
    res = RunResult(
        setup=setup.name,
        round=rnd,
        worker_rss_mib=[round(v / 2**20, 1) for v in sampler.rss.values()],
        cpu_haproxy=round((snap1[0] - snap0[0]) / wall, 2),
        cpu_agent=round((snap1[1] - snap0[1]) / wall, 2),
        cpu_wrk=round((snap1[2] - snap0[2]) / wall, 2),
        # the machine's busy time that none of our processes accounts for: other
        # processes (short-lived ones included), plus softirq work not charged to ours
        cpu_others=round(max(0.0, (snap1[5] - snap0[5]) - (snap1[3] - snap0[3])) / wall, 2),
        cpu_busy=round((snap1[5] - snap0[5]) / wall, 2),
        **w,
    )
    fe_key = (FRONTEND, "FRONTEND")
    reqs = _int(after.get(fe_key), "req_tot") - _int(before.get(fe_key), "req_tot")
    if setup.spoe:
        # HAProxy 2.6's bout of the agents' backend stays 0 (long-lived SPOE applet
        # streams): count what the agent's sockets received instead
        sv_key = (AGENT_BACKEND, AGENT_SERVER)
        if reqs and got_before is not None and got_after is not None:
            res.agent_bytes_per_req = round((got_after - got_before) / reqs, 1)
        res.agent_conns_max = _int(after.get(sv_key), "smax")
        res.agent_conns_total = _int(after.get(sv_key), "stot")
    try:
        res.samples_problem = check_samples(setup, args.event, sample_keepalive(port, 6))
    except (OSError, RuntimeError, ValueError) as e:
        res.samples_problem = f"sample failed: {e}"

    if agent is not None:
        # a shared machine: make sure nothing else signalled the agent (another
        # session's tests did: SIGTTIN/SIGTTOU) and no worker was replaced
        text = agent.log.read_text(errors="replace")
        foreign = re.findall(r"SIG[A-Z0-9]+:[^\n]*", text)
        readies = len(re.findall(r"worker \d+ ready", text))
        if foreign or readies > setup.workers:
            raise RuntimeError(
                f"spoa-mp was disturbed during the run: {foreign[:3]}, {readies} worker starts"
            )
    procs.stop(hap)
    if agent is not None:
        procs.stop(agent)
    if not args.keep_logs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# ------------------------------------------------------------------ report


def _med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(
    setups: list[Setup], results: list[RunResult], failures: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    # noisy runs (other processes busy) count only where a setup has no clean one
    every = {s.name: [r for r in results if r.setup == s.name] for s in setups}
    by = {name: [r for r in rs if not r.noisy] or rs for name, rs in every.items()}
    med_rps = {name: _med([r.rps for r in rs]) for name, rs in by.items()}
    rows = []
    for s in setups:
        rs = by[s.name]
        failed = sum(1 for f in failures if f["setup"] == s.name)
        if not rs:
            rows.append({"config": s.name, "runs": 0, "failed": failed})
            continue
        base = med_rps.get(s.baseline.name)
        ratio = med_rps[s.name] / base if s.spoe and base else None
        # the same ratio per round (filter run / baseline run of that round), median:
        # less sensitive to load that other processes put on the machine for a while
        base_by_round = {r.round: r.rps for r in by[s.baseline.name]}
        paired = [r.rps / base_by_round[r.round] for r in rs if base_by_round.get(r.round)]
        paired_ratio = statistics.median(paired) if s.spoe and paired else None
        target = (TARGET_PIPELINING if s.pipelining else TARGET_NO_PIPELINING) if s.spoe else None
        rss = [max(r.worker_rss_mib) for r in rs if r.worker_rss_mib]
        rows.append(
            {
                "config": s.name,
                "spoe": s.spoe,
                "nbthread": s.nbthread,
                "workers": s.workers if s.spoe else None,
                "pipelining": s.pipelining if s.spoe else None,
                "runs": len(rs),
                "noisy_left_out": len(every[s.name]) - len(rs),
                "failed": failed,
                "rps_median": round(med_rps[s.name] or 0, 1),
                "rps_all": [round(r.rps, 1) for r in rs],
                "p50_ms_median": _med([r.p50_ms for r in rs]),
                "p99_ms_median": _med([r.p99_ms for r in rs]),
                "errors": sum(r.errors for r in every[s.name]),
                "non2xx": sum(r.non2xx for r in every[s.name]),
                "socket_errors": sum(sum(r.socket_errors.values()) for r in every[s.name]),
                "worker_rss_mib_max": max(rss) if rss else None,
                "cpu_haproxy": _med([r.cpu_haproxy for r in rs]),
                "cpu_agent": _med([r.cpu_agent for r in rs]) if s.spoe else None,
                "cpu_wrk": _med([r.cpu_wrk for r in rs]),
                "cpu_others": _med([r.cpu_others for r in rs]),
                "cpu_busy": _med([r.cpu_busy for r in rs]),
                # CPU microseconds per request (cores / req/s): what the ratio is made of
                "us_per_req_haproxy": _med([1e6 * r.cpu_haproxy / r.rps for r in rs if r.rps]),
                "us_per_req_agent": (
                    _med([1e6 * r.cpu_agent / r.rps for r in rs if r.rps]) if s.spoe else None
                ),
                "us_per_req_machine": _med([1e6 * r.cpu_busy / r.rps for r in rs if r.rps]),
                "agent_bytes_per_req": _med([r.agent_bytes_per_req for r in rs]),
                "agent_conns_max": max((r.agent_conns_max or 0) for r in rs) if s.spoe else None,
                "samples_problems": [r.samples_problem for r in every[s.name] if r.samples_problem],
                "ratio": round(ratio, 3) if ratio is not None else None,
                "ratio_paired": round(paired_ratio, 3) if paired_ratio is not None else None,
                "target": target,
                "meets_target": (ratio >= target) if ratio is not None and target else None,
            }
        )
    return rows


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'config':<24}{'runs':>8}{'req/s':>8}{'p50 ms':>7}{'p99 ms':>7}{'errors':>7}"
        f"{'ratio':>7}{'paired':>7}{'target':>8}  {'cpu h/a/w/o/busy':<25}"
        f"{'us/req h/a/all':<15}{'B/req':>6}"
        f"{'ag.conn':>8}{'RSS MiB':>8}  samples"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        runs = (
            f"{r['runs']}"
            + (f"+{r['noisy_left_out']}N" if r.get("noisy_left_out") else "")
            + (f"+{r['failed']}F" if r["failed"] else "")
        )
        if not r["runs"]:
            print(f"{r['config']:<24}{runs:>8}  (every run failed)")
            continue
        cpu = (
            f"{r['cpu_haproxy']:.2f}/{_fmt(r['cpu_agent'], '.2f')}/{r['cpu_wrk']:.2f}"
            f"/{r['cpu_others']:.2f}/{r['cpu_busy']:.2f}"
        )
        us = (
            f"{_fmt(r['us_per_req_haproxy'], '.1f')}/{_fmt(r['us_per_req_agent'], '.1f')}"
            f"/{_fmt(r['us_per_req_machine'], '.1f')}"
        )
        target = ""
        if r["target"] is not None:
            target = f">={r['target']:.2f}" + ("" if r["meets_target"] else "!")
        print(
            f"{r['config']:<24}{runs:>8}{r['rps_median']:>8.0f}"
            f"{_fmt(r['p50_ms_median'], '.2f'):>7}{_fmt(r['p99_ms_median'], '.2f'):>7}"
            f"{r['errors']:>7}{_fmt(r['ratio'], '.3f'):>7}{_fmt(r['ratio_paired'], '.3f'):>7}"
            f"{target:>8}  {cpu:<25}{us:<15}{_fmt(r['agent_bytes_per_req'], '.1f'):>6}"
            f"{_fmt(r['agent_conns_max']):>8}{_fmt(r['worker_rss_mib_max'], '.1f'):>8}  "
            f"{'ok' if not r['samples_problems'] else '; '.join(r['samples_problems'])}"
        )


def version_of(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HAProxy 2.6 req/s with the spoa-mp SPOE filter over without it (wrk).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nbthread", type=int, nargs="+", default=[1], help="HAProxy nbthread values")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="spoa-mp -n values")
    p.add_argument(
        "--pipelining",
        choices=("on", "off", "both"),
        default="both",
        help="spoe-agent option pipelining",
    )
    p.add_argument("--event", choices=EVENTS, default=EVENTS[0], help="spoe-message event")
    p.add_argument("--threads", "-t", type=int, default=1, help="wrk -t")
    p.add_argument("--connections", "-c", type=int, default=50, help="wrk -c")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="wrk -d, seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up, seconds")
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--processing-ms", type=int, default=1000, help="SPOE timeout processing")
    p.add_argument("--maxconn", type=int, default=4000, help="HAProxy global/frontend maxconn")
    p.add_argument("--no-check", action="store_true", help="no option spop-check on the agent")
    p.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="wait until other processes use fewer cores than this before a run, and"
        " redo a run during which they used more (0: never)",
    )
    p.add_argument("--quiet-timeout", type=float, default=60.0, help="longest such wait, s")
    p.add_argument("--noisy-retries", type=int, default=2, help="redos of a noisy run")
    p.add_argument("--agent-args", default="", help="extra spoa-mp arguments")
    p.add_argument("--haproxy", default="haproxy")
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--python", default=sys.executable, help="python that runs -m spoa_mp")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="JSON on stdout (progress on stderr)")
    args = p.parse_args(argv)
    for name in ("repeat", "threads", "connections"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.duration <= 1:
        p.error("--duration must be > 1")
    if min(args.nbthread) < 1 or min(args.workers) < 1:
        p.error("--nbthread and --workers must be >= 1")
    for tool in (args.haproxy, args.wrk):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (apt-get install -y haproxy wrk)")
    return args


def build_setups(args: argparse.Namespace) -> list[Setup]:
    pipes = {"on": [True], "off": [False], "both": [True, False]}[args.pipelining]
    setups = []
    for nt in dict.fromkeys(args.nbthread):
        setups.append(Setup(spoe=False, nbthread=nt))
        setups.extend(
            Setup(spoe=True, nbthread=nt, workers=w, pipelining=pipe)
            for w, pipe in itertools.product(dict.fromkeys(args.workers), pipes)
        )
    return setups


def describe(r: RunResult) -> str:
    return (
        f"{r.rps:>9.0f} req/s  p50 {_fmt(r.p50_ms, '.2f')} p99 {_fmt(r.p99_ms, '.2f')} ms"
        f"  errors {r.errors}  cpu h/a/w/o {r.cpu_haproxy:.2f}/{r.cpu_agent:.2f}"
        f"/{r.cpu_wrk:.2f}/{r.cpu_others:.2f} busy {r.cpu_busy:.2f}"
        f"  agent B/req {_fmt(r.agent_bytes_per_req)} conns max {_fmt(r.agent_conns_max)}"
        f" total {_fmt(r.agent_conns_total)}  rss {r.worker_rss_mib}"
        + (f"  SAMPLES: {r.samples_problem}" if r.samples_problem else "")
    )


def measure(
    s: Setup,
    rnd: int,
    args: argparse.Namespace,
    tmp: Path,
    procs: Procs,
    failures: list[dict[str, Any]],
    log: Any,
) -> RunResult | None:
    """One run of `s`, after waiting for the other processes to calm down, again
    (up to --noisy-retries times) when they used more than --max-others cores
    during it; None (and an entry in `failures`) when it failed."""
    label = f"  round {rnd} {s.name:<24}"
    r = None
    for attempt in range(args.noisy_retries + 1):
        if args.max_others > 0:
            quiet = wait_quiet(args.max_others, args.quiet_timeout)
            if quiet >= args.max_others:
                print(f"{label} other processes still use {quiet:.2f} cores: going on", file=log)
        try:
            r = one_run(s, rnd, args, tmp, procs)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            procs.stop_all()  # runs are sequential: what is left is this run's
            failures.append({"setup": s.name, "round": rnd, "error": str(e)})
            print(f"{label} FAILED: {e}", file=log, flush=True)
            return None
        r.attempts = attempt + 1
        noisy = args.max_others > 0 and r.cpu_others >= args.max_others
        r.noisy = noisy
        if noisy and attempt < args.noisy_retries:
            print(f"{label} {describe(r)}  NOISY: again", file=log, flush=True)
            continue
        print(f"{label} {describe(r)}" + ("  NOISY" if noisy else ""), file=log, flush=True)
        break
    return r


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)  # even where it was ignored (nohup, &)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    setups = build_setups(args)
    info = {
        "command": command,
        "haproxy": version_of([args.haproxy, "-v"], r"version (\S+)"),
        "wrk": version_of([args.wrk, "-v"], r"wrk (\S+)"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "event": args.event,
        "wrk_args": f"-t {args.threads} -c {args.connections} -d {args.duration:g}s --latency",
        "warmup_s": args.warmup,
        "repeat": args.repeat,
    }
    log = sys.stderr if args.json else sys.stdout
    print(
        f"HAProxy {info['haproxy']}, wrk {info['wrk']}, {info['usable_cpus']} CPUs, "
        f"event {args.event}, wrk {info['wrk_args']}, warm-up {args.warmup:g}s, "
        f"{len(setups)} configs x {args.repeat} rounds",
        file=log,
        flush=True,
    )
    results: list[RunResult] = []
    failures: list[dict[str, Any]] = []
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="bench-haproxy-"))
    try:
        for rnd in range(1, args.repeat + 1):
            for s in setups:
                r = measure(s, rnd, args, tmp, procs, failures, log)
                if r is not None:
                    results.append(r)
    except KeyboardInterrupt:
        print("interrupted: stopping every process", file=sys.stderr)
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # let the clean-up finish
            signal.signal(signum, signal.SIG_IGN)
        procs.stop_all()
        if args.keep_logs:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = summarize(setups, results, failures)
    if args.json:
        json.dump(
            {
                "info": info,
                "summary": rows,
                "runs": [asdict(r) for r in results],
                "failures": failures,
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print()
        print_table(rows)
        print()
        print(
            "ratio = median req/s with the filter / median req/s of 'nofilter' with the same"
            " nbthread; paired = median over rounds of that ratio within each round;"
            f" targets >= {TARGET_NO_PIPELINING} (no pipelining),"
            f" >= {TARGET_PIPELINING} (pipelining); '!' = below."
        )
        print(
            "errors = non-2xx (503: SPOE error) + socket errors, all runs; cpu h/a/w/o/busy ="
            " cores used by HAProxy / spoa-mp workers / wrk / the rest of the machine (noise) /"
            " the whole machine (incl. softirq); us/req h/a/all = CPU microseconds per request"
            " of HAProxy / the workers / the whole machine; B/req = bytes the agent's sockets"
            " received per request (one NOTIFY = 36); ag.conn = max HAProxy->agent connections;"
            " RSS = max worker RSS; N = noisy runs left out (others >= --max-others);"
            " F = failed runs."
        )
        for f in failures:
            print(f"failed: round {f['round']} {f['setup']}: {f['error'].splitlines()[0]}")
        print(f"command: {command}")
    bad = failures or [r for r in rows if r.get("errors") or r.get("samples_problems")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers of the server tests (tests/test_server.py): a small SPOP client and
a `Server` context manager around `python -m spoa_mp`.

Everything is bounded: every wait polls a condition until a deadline
(`wait_for`), every socket read has a deadline, and the server runs in its own
session so that leaving the context manager kills the supervisor and every
worker (the whole process group, plus any process of the tree seen before)
and reaps them. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_FLAGS,
    F_LENGTH,
    F_NITEMS,
    F_OFFSET,
    F_SID,
    F_TYPE,
    Decoder,
    Encoder,
    FrameType,
    ItemKind,
    item_name,
    item_value,
    kv_items,
)
from spoa_mp.exchange import recv_before
from spoa_mp.model import Value

HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # process start until the port accepts / workers are ready
WAIT_TIMEOUT = 10.0  # the default bound of every other wait
IO_TIMEOUT = 5.0  # one frame from the agent

VECTORS_PATH = Path(__file__).parent / "data" / "spop-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text())

SUPERVISOR_TITLE = "spoa-mp: supervisor"
WORKER_TITLE = re.compile(r"^spoa-mp: worker (\d+)$")
READY_LINE = re.compile(r"worker (\d+) ready \(pid (\d+)\)")

T = TypeVar("T")


def vector(name: str) -> bytes:
    """The wire bytes of a frame of tests/data/spop-vectors.json."""
    for f in VECTORS["frames"]:
        if f["name"] == name:
            return bytes.fromhex(f["hex"])
    raise KeyError(name)


# ------------------------------------------------------------------ primitives


def free_port(host: str = HOST) -> int:
    """A TCP port the OS considers free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float = WAIT_TIMEOUT,
    what: str = "",
    interval: float = 0.02,
) -> T:
    """Poll `predicate` until it returns something truthy (which is returned);
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        time.sleep(interval)


def connect_refused(port: int, host: str = HOST) -> bool:
    """True when a TCP connect to host:port is refused right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def accepting(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def title(proc: psutil.Process) -> str:
    """The process title as setproctitle set it ("" when the process is gone)."""
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return ""


def gone(proc: psutil.Process) -> bool:
    """True when the process no longer exists (reaped; pid reuse is detected)."""
    try:
        return not proc.is_running()
    except psutil.Error:
        return True


def dead(proc: psutil.Process) -> bool:
    """True when the process has exited (a zombie not reaped yet counts)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def owner_of(client: socket.socket, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the server side of the TCP connection `client`."""
    local = client.getsockname()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.raddr and (c.raddr.ip, c.raddr.port) == (local[0], local[1]):
                return pid
    return None


# ------------------------------------------------------------------ frames


@dataclass
class Frame:
    """One decoded frame from the agent."""

    type: int
    flags: int
    sid: int
    fid: int
    kv: dict[str, Value] = field(default_factory=dict)
    # ACK actions: (action, scope, name, value); action 1 set-var, 2 unset-var
    actions: list[tuple[int, int, str, Value]] = field(default_factory=list)
    received: float = 0.0  # time.monotonic() when read_frame() decoded it


class ConnectionClosedError(ConnectionError):
    """The agent closed the connection while a frame was expected."""


class SpopClient:
    """HAProxy's side of one SPOP connection, built on spoa_mp.codec.

    ::

        with SpopClient(port) as c:
            c.hello()
            c.notify(1, 1, [("check-client-ip", [("", IPv4Address("10.0.0.1"))])])
            ack = c.read_frame()
    """

    MAX_FRAME = 1 << 16

    def __init__(self, port: int, host: str = HOST, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buf = b""
        self._encoder = Encoder()
        self._decoder = Decoder(max_frame_size=self.MAX_FRAME)
        self.eof = False

    def __enter__(self) -> SpopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- sending

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, name: str = "haproxy-hello 2.6", timeout: float | None = None) -> Frame:
        """Send a HAPROXY-HELLO vector; return the agent's answer (AGENT-HELLO)."""
        self.send(vector(name))
        return self.read_frame(timeout)

    def notify_bytes(
        self, sid: int, fid: int, messages: Sequence[tuple[str, Sequence[tuple[str, Any]]]]
    ) -> bytes:
        return self._encoder.notify_frame(sid, fid, messages=messages)

    def notify(
        self, sid: int, fid: int, messages: Sequence[tuple[str, Sequence[tuple[str, Any]]]]
    ) -> None:
        """Send one NOTIFY: messages are (name, [(arg_name, value), ...])."""
        self.send(self.notify_bytes(sid, fid, messages))

    # -- receiving

    def _decode_one(self) -> Frame | None:
        frames, items, _, error = self._decoder.decode(self._buf, self.MAX_FRAME)
        if not frames:
            if error:
                raise AssertionError(f"agent sent a malformed frame (status {error})")
            return None
        f = frames[0]
        data = self._buf
        frame = Frame(f[F_TYPE], f[F_FLAGS], f[F_SID], f[F_FID], received=time.monotonic())
        if f[F_TYPE] in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
            frame.kv = {k: item_value(data, it) for k, it in kv_items(data, f, items).items()}
        elif f[F_TYPE] == FrameType.ACK:
            for it in items[f[F_FIRST] : f[F_FIRST] + f[F_NITEMS]]:
                assert it[5] == ItemKind.ACTION
                name = item_name(data, it).decode()
                value = item_value(data, it) if it[8] == 1 else None
                frame.actions.append((it[8], it[9], name, value))
        self._buf = data[f[F_OFFSET] + 4 + f[F_LENGTH] :]
        return frame

    def _recv(self, deadline: float) -> bool:
        """Read once; False at EOF. TimeoutError past the deadline."""
        data = recv_before(self.sock, deadline)
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def read_frame(self, timeout: float | None = None) -> Frame:
        """The next frame; ConnectionClosedError at EOF, TimeoutError after `timeout`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self._decode_one()
            if frame is not None:
                return frame
            if self.eof or not self._recv(deadline):
                raise ConnectionClosedError(
                    f"agent closed the connection ({len(self._buf)} B left)"
                )

    def read_frames(self, n: int, timeout: float | None = None) -> list[Frame]:
        """The next `n` frames, all within `timeout` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.read_frame(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def wait_closed(self, timeout: float = WAIT_TIMEOUT) -> list[Frame]:
        """Read until the agent closes the connection; returns the frames read
        on the way. TimeoutError when it stays open."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            frame = self._decode_one()
            if frame is not None:
                frames.append(frame)
                continue
            if self.eof or not self._recv(deadline):
                return frames


# ------------------------------------------------------------------ the server


class ServerExitedError(RuntimeError):
    pass


class Server:
    """`python -m spoa_mp -p PORT -n N ARGS...` in its own session.

    Entering starts it (cwd: `cwd`, stderr to a file there) and, when `wait`,
    waits (bounded) until the port accepts connections and every worker said
    it is ready. Leaving kills the whole process group and every process of
    the tree seen so far, and reaps them.
    """

    _counter = itertools.count(1)

    def __init__(
        self,
        cwd: Path,
        *args: str,
        workers: int = 2,
        wait: bool = True,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.cwd = Path(cwd)
        self.args = list(args)
        self.workers = workers
        self.wait = wait
        self.start_timeout = start_timeout
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.name = f"spoa-mp-{next(self._counter)}"
        self.stderr_path = self.cwd / f"{self.name}.stderr.log"
        self._known: dict[int, psutil.Process] = {}
        self.ps: psutil.Process | None = None

    # -- life

    def __enter__(self) -> Server:
        for attempt in range(3):
            self.port = free_port()
            self._start()
            if not self.wait:
                return self
            try:
                self.wait_accepting()
            except ServerExitedError:
                if attempt < 2 and "in use" in self.log():
                    self.kill()  # lost the race for the port: try another one
                    continue
                self.kill()
                raise
            except BaseException:
                self.kill()
                raise
            break
        try:
            self.wait_ready(self.workers)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _start(self) -> None:
        argv = [sys.executable, "-m", "spoa_mp", "-p", str(self.port), "-n", str(self.workers)]
        argv += self.args
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        with self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                env=env,
            )
        self.ps = psutil.Process(self.popen.pid)
        self._known = {self.popen.pid: self.ps}

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            assert self.popen is not None
            raise ServerExitedError(f"spoa-mp exited with {self.popen.returncode}:\n{self.log()}")

    def wait_accepting(self, timeout: float | None = None) -> None:
        def ready() -> bool:
            self.check_alive()
            return accepting(self.port)

        wait_for(ready, timeout or self.start_timeout, f"port {self.port} to accept")

    def ready_lines(self) -> list[tuple[int, int]]:
        """(index, pid) of every "worker N ready (pid P)" line so far."""
        return [(int(m[1]), int(m[2])) for m in READY_LINE.finditer(self.log())]

    def wait_ready(self, n: int, timeout: float | None = None) -> list[tuple[int, int]]:
        """Until `n` workers have said they are ready."""

        def ready() -> list[tuple[int, int]] | None:
            self.check_alive()
            lines = self.ready_lines()
            return lines if len(lines) >= n else None

        return wait_for(ready, timeout or self.start_timeout, f"{n} workers ready")

    def wait_log(self, pattern: str, timeout: float = WAIT_TIMEOUT, count: int = 1) -> str:
        """Until the log matches `pattern` (a regex) `count` times; returns the log."""
        rx = re.compile(pattern)

        def found() -> str | None:
            text = self.log()
            return text if len(rx.findall(text)) >= count else None

        return wait_for(found, timeout, f"log line {pattern!r}\n{self.log()}")

    def wait_exit(self, timeout: float = WAIT_TIMEOUT) -> int:
        assert self.popen is not None
        self.children()  # remember the workers before they go
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"spoa-mp still running after {timeout} s:\n{self.log()}") from None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    # -- the process tree

    def children(self) -> list[psutil.Process]:
        """Live children of the supervisor (remembered for the final kill)."""
        if self.ps is None:
            return []
        try:
            kids = self.ps.children()
        except psutil.Error:
            return []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return kids

    def workers_by_index(self) -> dict[int, int]:
        """{worker index: pid} of the live children titled `spoa-mp: worker N`
        (zombies, which have no title any more, are left out)."""
        out: dict[int, int] = {}
        for k in self.children():
            m = WORKER_TITLE.match(title(k))
            if m:
                out[int(m[1])] = k.pid
        return out

    def wait_workers(
        self,
        predicate: Callable[[dict[int, int]], bool],
        timeout: float = WAIT_TIMEOUT,
        what: str = "workers",
    ) -> dict[int, int]:
        """Until `predicate(workers_by_index())` holds; returns that mapping."""

        def check() -> dict[int, int] | None:
            self.check_alive()
            w = self.workers_by_index()
            return w if predicate(w) else None

        return wait_for(check, timeout, what)

    def known_processes(self) -> list[psutil.Process]:
        self.children()
        return list(self._known.values())

    def leftovers(self) -> list[psutil.Process]:
        """Live (non-zombie) processes still in the server's process group."""
        if self.popen is None:
            return []
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(p.pid) == self.popen.pid and not dead(p):
                    out.append(p)
        return out

    def kill(self) -> None:
        """SIGKILL the process group and every process of the tree we saw; reap
        the supervisor and wait (bounded) until the others are dead."""
        if self.popen is None:
            return
        self.children()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # session leader: pgid == pid
        for p in self._known.values():
            with contextlib.suppress(psutil.Error):
                if not dead(p):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=WAIT_TIMEOUT)
        # orphaned workers are reaped by PID 1, which may take its time: a
        # zombie is dead enough
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: all(dead(p) for p in self._known.values()), WAIT_TIMEOUT)

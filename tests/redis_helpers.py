"""A real `redis-server` for tests (and the load driver of the Redis outage
tests): started on a free 127.0.0.1 port or a Unix socket, in a temporary
directory, without persistence; paused, resumed, killed and restarted by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from support.spop_peer import SpopClient
from support.waits import HOST, free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")
MISSING = "redis-server not installed (Debian package redis-server; `make test` installs it)"


def ping(url: str) -> bool:
    """True when a Redis answers PING at url right now."""
    import redis  # the test extra; importorskip'd by the tests

    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False
    finally:
        client.close()


class RedisServer:
    """`redis-server` on `port` (0: a free one, picked at the first start) or
    on the Unix socket `unix`; `start()` may be called again after `kill()`
    (same address, empty data). `stop()` ends it by pid, SIGCONT first."""

    def __init__(self, directory: Path, port: int = 0, unix: Path | None = None) -> None:
        assert REDIS_SERVER is not None, MISSING
        self.dir = directory
        self.port = port
        self.unix = unix
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix://{self.unix}"
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for _ in range(3):
            if self.unix is None and not self.port:
                self.port = free_port()
            self._spawn()
            try:
                wait_for(self._ready, timeout, f"redis-server at {self.url}")
                return self
            except RuntimeError:
                if self.unix is not None or "in use" not in self.log():
                    raise
                self.port = 0  # lost the race for the port: another one
        raise RuntimeError(f"redis-server did not start:\n{self.log()}")

    def _spawn(self) -> None:
        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.unix is not None:
            argv += ["--port", "0", "--unixsocket", str(self.unix), "--unixsocketperm", "700"]
        else:
            argv += ["--port", str(self.port), "--bind", HOST]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def _ready(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.popen.returncode}:\n{self.log()}")
        return ping(self.url)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (connections still accepted by the kernel)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, reaped: a dead Redis (connections refused)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.kill()
        self.popen.wait(timeout=10)
        if self.unix is not None:
            self.unix.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
            self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


# ------------------------------------------------------------------ load


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

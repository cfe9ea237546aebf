"""`RedisServer`: a real `redis-server` (a `Process`) on a free 127.0.0.1
port or a Unix socket, in a given directory, without persistence; paused,
resumed, killed and restarted by pid. The tests and bench/bench_handlers.py
share it."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

import psutil

from support.processes import Process, ProcessExitedError
from support.waits import HOST, START_TIMEOUT, free_port, wait_for

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
    (same address, empty data). Its output goes to `<directory>/redis.log`
    (appended to across restarts). `stop()` ends it by pid, SIGCONT first."""

    def __init__(self, directory: Path, port: int = 0, unix: Path | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError(MISSING)
        self.dir = directory
        self.port = port
        self.unix = unix
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix://{self.unix}"
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        for _ in range(3):
            if self.unix is None and not self.port:
                self.port = free_port()
            self.proc = Process("redis", self._argv(), self.dir, merge_output=True, append=True)
            try:
                wait_for(self._ready, timeout, f"redis-server at {self.url}")
                return self
            except ProcessExitedError:
                if self.unix is not None or "in use" not in self.log():
                    raise
                self.port = 0  # lost the race for the port: another one
        raise RuntimeError(f"redis-server did not start:\n{self.log()}")

    def _argv(self) -> list[str]:
        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.unix is not None:
            return [*argv, "--port", "0", "--unixsocket", str(self.unix), "--unixsocketperm", "700"]
        return [*argv, "--port", str(self.port), "--bind", HOST]

    def _ready(self) -> bool:
        assert self.proc is not None
        self.proc.check_alive()
        return ping(self.url)

    def log(self) -> str:
        return self.proc.stdout() if self.proc is not None else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return self.proc.ps

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (connections still accepted by the kernel)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, reaped: a dead Redis (connections refused)."""
        if self.proc is None or not self.proc.alive():
            return
        self.proc.kill()
        if self.unix is not None:
            self.unix.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGCONT (it may be paused), SIGTERM and a bounded wait, then kill()."""
        if self.proc is None or not self.proc.alive():
            return
        self.resume()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.stop()
        self.kill()

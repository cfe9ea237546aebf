"""The out-of-process half of the test kit (see spoa_mp.testing): a real
``spoa-mp`` started for a test, on a free 127.0.0.1 port, talked to over
SPOP by the `spoa-mp send` client (spoa_mp.send)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

from spoa_mp.exchange import exchange
from spoa_mp.send import health_text, report_text
from spoa_mp.testing_client import Result, notify_args, reply_actions

__all__ = ["RunningAgent", "ServeTimeouts", "SpoaError", "serve"]

HOST = "127.0.0.1"
READY_LINE = re.compile(r"worker \d+ ready \(pid \d+\)")
LOG_TAIL = 4000  # characters of the server's log in error messages
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServeTimeouts:
    """How long serve() waits: for every worker to be ready, and for the
    server to exit after SIGTERM (then SIGKILL), in seconds."""

    start: float = 15.0
    stop: float = 10.0


class SpoaError(RuntimeError):
    """The server did not start, or did not answer a message with an ACK."""


class RunningAgent:
    """A ``spoa-mp`` process started by `serve()`: where it listens, what it
    logged, and `send()` to talk SPOP to it."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.host = HOST
        self.port = 0
        self.log_path = log_path

    def log(self) -> str:
        """Everything the server logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self) -> str:
        text = self.log()
        return text if len(text) <= LOG_TAIL else "...\n" + text[-LOG_TAIL:]

    def send(self, name: str, /, *args: object, **kwargs: object) -> Result:
        """One HELLO and one NOTIFY on a new connection, as HAProxy 3.x sends
        them; the ACK as a Result (arguments typed as AgentClient.send types
        them). SpoaError when no ACK comes."""
        ex = exchange(name, notify_args(args, kwargs), host=self.host, port=self.port)
        if not ex.ok or ex.answer is None:
            raise SpoaError(f"no ACK for {name!r}: {report_text(ex, False)}\n{self._tail()}")
        return Result(reply_actions(ex.answer), ex.answer.sid, ex.answer.fid)

    def healthcheck(self) -> str:
        """What HAProxy's ``option spop-check`` would report."""
        return health_text(exchange(None, host=self.host, port=self.port))

    # ------------------------------------------------------------ life

    def _wait(self, what: str, timeout: float, ready: Callable[[], _T]) -> _T:
        """Poll `ready` until it returns something truthy; SpoaError when the
        server exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise SpoaError(
                    f"spoa-mp exited with status {self.popen.returncode} before {what}:\n"
                    + self._tail()
                )
            found = ready()
            if found:
                return found
            if time.monotonic() >= deadline:
                raise SpoaError(f"spoa-mp: no {what} within {timeout:g} s:\n{self._tail()}")
            time.sleep(0.02)

    def _listening_port(self) -> int:
        try:
            conns = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return 0
        return next((c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN), 0)

    def wait_ready(self, workers: int, timeout: float) -> None:
        self.port = self._wait("listening socket", timeout, self._listening_port)
        self._wait(
            f"{workers} worker(s) ready",
            timeout,
            lambda: len(READY_LINE.findall(self.log())) >= workers,
        )

    def stop(self, timeout: float) -> None:
        """SIGTERM the supervisor and wait (bounded) until it exits; then
        SIGKILL what is left of its process group, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        supervisor = None
        with contextlib.suppress(psutil.Error):
            supervisor = psutil.Process(self.pid)
        deadline = time.monotonic() + timeout
        # not reaped yet: a zombie keeps its pid and group, so killpg below
        # cannot hit anyone else's processes
        while supervisor is not None and time.monotonic() < deadline:
            try:
                if supervisor.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # our own session: pgid == pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)


@contextlib.contextmanager
def serve(
    app: str | None = None,
    *args: str,
    workers: int = 1,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeouts: ServeTimeouts = ServeTimeouts(),
) -> Iterator[RunningAgent]:
    """Run ``python -m spoa_mp --app APP ARGS...`` on a free 127.0.0.1 port
    for the time of a ``with`` block::

        with serve("botcheck:agent", cwd="examples") as agent:
            assert agent.send("check-request", ua="curl/8")["txn.bot"] is True

    `app` None serves the built-in IP-reputation agent; `args` are more
    command-line options; `cwd` is where the app module is imported from
    (default: the current directory). Entering waits until every worker is
    ready (at most `timeouts.start`); leaving stops the server (SIGTERM,
    then SIGKILL after `timeouts.stop`) and reaps it. When the block
    raises, the server's log is added to the exception's notes.
    """
    argv = [sys.executable, "-m", "spoa_mp", "--host", HOST, "--port", "0"]
    argv += ["--workers", str(workers), "--graceful-timeout", "1"]
    if app is not None:
        argv += ["--app", app]
    argv += args
    environ = dict(os.environ if env is None else env)
    environ["PYTHONUNBUFFERED"] = "1"
    fd, name = tempfile.mkstemp(prefix="spoa-mp-", suffix=".log")
    log_path = Path(name)
    try:
        with os.fdopen(fd, "wb") as log_file:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        server = RunningAgent(popen, log_path)
        try:
            server.wait_ready(workers, timeouts.start)  # its errors hold the log
            try:
                yield server
            except Exception as e:
                e.add_note(f"spoa-mp log:\n{server._tail()}")
                raise
        finally:
            server.stop(timeouts.stop)
    finally:
        with contextlib.suppress(OSError):
            log_path.unlink()

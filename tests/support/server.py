"""spoa-mp as a real process tree: `Server`, `python -m spoa_mp -p PORT -n N
ARGS...` as a context manager, and `SpoaProcess`/`spoa_command`, what the e2e
fixtures start (SPOA_MP_E2E_COMMAND may name another command with that CLI).

Entering starts it in its own session (a `Process`) and waits, bounded,
until the port accepts and every worker said it is ready; leaving kills the
whole process group and every process of the tree seen, and reaps them.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from support.processes import Process, ProcessExitedError, child_env, dead, title
from support.waits import HOST, START_TIMEOUT, WAIT_TIMEOUT, accepting, free_port, wait_for

SUPERVISOR_TITLE = "spoa-mp: supervisor"
WORKER_TITLE = re.compile(r"^spoa-mp: worker (\d+)$")
READY_LINE = re.compile(r"worker (\d+) ready \(pid (\d+)\)")

ServerExitedError = ProcessExitedError

# Run something else than `python -m spoa_mp` (same CLI), e.g. an installed
# `spoa-mp` script: SPOA_MP_E2E_COMMAND="/usr/local/bin/spoa-mp".
COMMAND_ENV = "SPOA_MP_E2E_COMMAND"


class Server:
    """`python -m spoa_mp -p PORT -n N ARGS...` in its own session.

    Entering starts it (cwd: `cwd`, stdout and stderr to `<name>.log` there)
    and, when `wait`, waits (bounded) until the port accepts connections and
    every worker said it is ready. Leaving kills the whole process group and
    every process of the tree seen so far, and reaps them. Subclasses start
    something else by overriding `_start` (and calling `_spawn`).
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
        self.proc: Process | None = None
        self.name = f"spoa-mp-{next(self._counter)}"
        self.stderr_path = self.cwd / f"{self.name}.log"

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
        self._spawn([*argv, *self.args], child_env())

    def _spawn(self, argv: list[str], env: dict[str, str], **popen: Any) -> None:
        self.proc = Process(
            self.name, argv, self.cwd, merge_output=True, cwd=self.cwd, env=env, **popen
        )

    @property
    def popen(self) -> Any:
        assert self.proc is not None
        return self.proc.popen

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return self.proc.ps

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log(self) -> str:
        return self.proc.stderr() if self.proc is not None else ""

    def check_alive(self) -> None:
        assert self.proc is not None
        self.proc.check_alive()

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
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except TimeoutError:
            raise TimeoutError(f"spoa-mp still running after {timeout} s:\n{self.log()}") from None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    # -- the process tree

    def children(self) -> list[psutil.Process]:
        """Live children of the supervisor (remembered for the final kill)."""
        return self.proc.descendants(recursive=False) if self.proc is not None else []

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
        return self.proc.known() if self.proc is not None else []

    def leftovers(self) -> list[psutil.Process]:
        """Live (non-zombie) processes still in the server's process group."""
        if self.proc is None:
            return []
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(p.pid) == self.proc.pid and not dead(p):
                    out.append(p)
        return out

    def kill(self) -> None:
        """SIGKILL the process group and every process of the tree we saw; reap
        the supervisor and wait (bounded) until the others are dead."""
        if self.proc is not None:
            self.proc.kill()


def started(servers: list[Server], srv: Server) -> Server:
    """`srv` entered (started, waited for) and registered in `servers` (the
    conftest fixture that kills them at teardown) first, so that a failed
    start is cleaned up too."""
    servers.append(srv)
    return srv.__enter__()


# ------------------------------------------------------------------ e2e: spoa_command


def spoa_command(
    port: int,
    workers: int = 2,
    reputation_file: Path | None = None,
    default_score: int | None = None,
    debug: bool = False,
) -> list[str]:
    """argv of `python -m spoa_mp -p PORT -n WORKERS [...]` (the CLI contract)."""
    prefix = shlex.split(os.environ.get(COMMAND_ENV, "")) or [sys.executable, "-m", "spoa_mp"]
    argv = [*prefix, "-p", str(port), "-n", str(workers), "--host", HOST]
    if reputation_file is not None:
        argv += ["--reputation-file", str(reputation_file)]
    if default_score is not None:
        argv += ["--default-score", str(default_score)]
    if debug:
        argv.append("-d")
    return argv


class SpoaProcess(Process):
    """A running spoa-mp supervisor and the port its workers serve."""

    def __init__(self, name: str, port: int, workers: int, argv: list[str], log_dir: Path):
        super().__init__(name, argv, log_dir)
        self.port = port
        self.workers = workers

    def wait_workers(self, timeout: float = START_TIMEOUT) -> list[psutil.Process]:
        """The supervisor's descendants, once there are exactly -n of them
        (the port may accept before every worker is forked)."""

        def all_forked() -> list[psutil.Process] | None:
            self.check_alive()
            children = self.descendants()
            return children if len(children) == self.workers else None

        return wait_for(all_forked, timeout, f"{self.workers} workers of {self.name}")

"""Process handling and machine-load helpers shared by the bench scripts.

Every child runs in its own session (process group) with its output in a log
file, and is stopped by its pid (then its group, then every descendant seen)
with bounded waits. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
EXAMPLE_AGENT = REPO.parent / "shared" / "bin" / "spoa-example"
START_TIMEOUT = 20.0  # process start until ready
STOP_TIMEOUT = 10.0  # SIGTERM until exit, then SIGKILL

T = TypeVar("T")


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


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Proc:
    """A child in its own session, output appended to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, **popen: Any) -> None:
        """`popen`: more Popen arguments (cwd, env)."""
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
                **popen,
            )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)
        self._known: dict[int, psutil.Process] = {self.pid: self.ps}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants now (remembered for stop())."""
        try:
            kids = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return [self.ps, *kids]

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
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


# ------------------------------------------------------------------ the agents


def agent_argv(kind: str, port: int, workers: int, threads: int, python: str) -> list[str]:
    """spoa-mp `-n workers` or the example agent `-n threads -c pipelining`."""
    if kind == "spoa-mp":
        argv = [python, "-m", "spoa_mp", "-p", str(port), "-n", str(workers), "--host", HOST]
        return [*argv, "--graceful-timeout", "3"]
    if kind == "example":
        # binds every address (no option): the port is a free loopback test port
        return [str(EXAMPLE_AGENT), "-p", str(port), "-n", str(threads), "-c", "pipelining"]
    raise ValueError(f"unknown agent {kind!r}")


def start_agent(
    procs: Procs, kind: str, port: int, workers: int, threads: int, python: str, log_dir: Path
) -> Proc:
    """Start an agent and wait until it accepts (spoa-mp: with all its workers)."""
    agent = procs.start(kind, agent_argv(kind, port, workers, threads, python), log_dir)

    def ready() -> bool:
        agent.check_alive()
        if kind == "spoa-mp" and len(agent.tree()) != workers + 1:
            return False
        return accepting(port)

    wait_for(ready, START_TIMEOUT, f"{kind} to accept on port {port}")
    return agent


def parse_agents(text: str) -> list[str]:
    """'spoa-mp,example' -> ['spoa-mp', 'example']; ValueError on anything else."""
    agents = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in agents if a not in ("spoa-mp", "example")]
    if bad or not agents:
        raise ValueError(f"--agents takes spoa-mp and/or example, comma-separated: {text!r}")
    return list(dict.fromkeys(agents))


# ------------------------------------------------------------------ CPU and noise


def cpu_seconds(ps: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in ps:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, not iowait), all CPUs."""
    t = psutil.cpu_times()._asdict()
    skip = ("idle", "iowait", "guest", "guest_nice")  # guest is counted in user already
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


# ------------------------------------------------------------------ figures


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def paired_ratio(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Median over the rounds both have of a[round] / b[round]."""
    return median([a[r] / b[r] for r in a if b.get(r)])


def fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def version_of(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "unknown"

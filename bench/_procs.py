"""Process handling and machine-load helpers shared by the bench scripts.

Every child is a tests/support `Process`: its own session (process group),
its output in a log file, stopped by its pid (then its group, then every
descendant seen) with bounded waits. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_AGENT = REPO.parent / "shared" / "bin" / "spoa-example"
START_TIMEOUT = 20.0  # process start until ready

# Process handling is the tests' (tests/support): one wrapper for both.
sys.path.insert(0, str(REPO / "tests"))
from support.processes import Process  # noqa: E402
from support.waits import HOST, accepting, free_port, wait_for  # noqa: E402, F401


class Proc(Process):
    """A child in its own session, stdout and stderr appended to
    `<log_dir>/<name>.log` (the path is `log`); `popen`: more Popen arguments
    (cwd, env). `shutdown()` stops it: SIGTERM, then its group and every
    descendant seen, bounded."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, **popen: Any) -> None:
        super().__init__(name, argv, log_dir, merge_output=True, append=True, **popen)
        self.log = self.stdout_path


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
            p.shutdown()
        finally:
            with contextlib.suppress(ValueError):
                self.live.remove(p)

    def stop_all(self) -> None:
        while self.live:
            self.stop(self.live[-1])


# ------------------------------------------------------------------ the agents


# spoa-mp on its default loop or on one asked for, spoa-mp with --tls-* (the
# caller's extra flags), the same command from another checkout's python
# (--baseline-python: old against new), HAProxy's example agent
AGENTS = (
    "spoa-mp", "spoa-mp:asyncio", "spoa-mp:uvloop", "spoa-mp-tls", "baseline", "example",
)  # fmt: skip


def is_spoa(kind: str) -> bool:
    return kind != "example"


def agent_argv(kind: str, port: int, workers: int, threads: int, python: str) -> list[str]:
    """spoa-mp `-n workers` (`spoa-mp:LOOP`: with `--loop LOOP`; `baseline`: run by
    the baseline's python) or the example agent `-n threads -c pipelining`."""
    if is_spoa(kind) and kind in AGENTS:
        argv = [python, "-m", "spoa_mp", "-p", str(port), "-n", str(workers), "--host", HOST]
        loop = ["--loop", kind.partition(":")[2]] if ":" in kind else []
        return [*argv, "--graceful-timeout", "3", *loop]
    if kind == "example":
        # binds every address (no option): the port is a free loopback test port
        return [str(EXAMPLE_AGENT), "-p", str(port), "-n", str(threads), "-c", "pipelining"]
    raise ValueError(f"unknown agent {kind!r}")


def start_agent(
    procs: Procs,
    kind: str,
    port: int,
    workers: int,
    threads: int,
    python: str,
    log_dir: Path,
    extra: Sequence[str] = (),
) -> Proc:
    """Start an agent (`extra`: more flags) and wait until it accepts (spoa-mp:
    with all its workers)."""
    argv = [*agent_argv(kind, port, workers, threads, python), *extra]
    agent = procs.start(kind, argv, log_dir)

    def ready() -> bool:
        agent.check_alive()
        if is_spoa(kind) and len(agent.tree()) != workers + 1:
            return False
        return accepting(port)

    wait_for(ready, START_TIMEOUT, f"{kind} to accept on port {port}")
    return agent


def parse_agents(text: str) -> list[str]:
    """'spoa-mp,example' -> ['spoa-mp', 'example']; ValueError on anything else."""
    agents = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in agents if a not in AGENTS]
    if bad or not agents:
        raise ValueError(f"--agents takes {', '.join(AGENTS)}, comma-separated: {text!r}")
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

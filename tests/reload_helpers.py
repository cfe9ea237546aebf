"""Helpers of the reload tests (tests/test_reload.py): the test app, log
parsing, a watcher of old workers' exits, and a HAProxy 2.6 configuration with `option pipelining`
whose `score` frontend turns any SPOE error into a 503.

Everything is bounded: waits poll a condition until a deadline. The load
generators are in tests/support/load.py. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import psutil
from support.apps import SLOW_HANDLER
from support.haproxy import HAProxyConfig, render_haproxy_cfg, render_spoe_cfg
from support.processes import gone

# ------------------------------------------------------------------ the test app

# Handlers and a start hook whose behaviour is steered by files next to the
# module (so that a reload can be made to fail without touching the module):
#   fail-hook          -> every new worker's start hook raises
#   fail-hook-worker-N -> only worker N's start hook raises
#   slow-hook          -> the start hook sleeps that many seconds (file content)
# `ver` answers txn.ver = VERSION (the module's text decides it), `slow` is
# support.apps.SLOW_HANDLER ("slow start N" in the log, then MS ms of sleep).
APP_TEMPLATE = """
import asyncio
import logging
from pathlib import Path

import setproctitle

from spoa_mp.agent import Agent
from spoa_mp.model import set_var

{prelude}
HERE = Path(__file__).resolve().parent
VERSION = {version}
log = logging.getLogger("reloadapp")
agent = Agent("reloadapp")


@agent.on_message("ver")
def ver(msg):
    return set_var("txn", "ver", VERSION)


{slow_handler}

@agent.on_worker_start
async def start_hook():
    index = setproctitle.getproctitle().rpartition(" ")[2]
    {hook_body}
    if (HERE / "fail-hook").exists() or (HERE / f"fail-hook-worker-{{index}}").exists():
        raise RuntimeError(f"hook refused to start worker {{index}} on purpose")
    delay = HERE / "slow-hook"
    if delay.exists():
        await asyncio.sleep(float(delay.read_text()))
"""

IMPORT_ERROR = 'raise ImportError("the frobnicator library is missing (on purpose)")'
HOOK_ERROR = 'raise RuntimeError("database unreachable (on purpose)")'


def write_app(
    directory: Path, version: int = 1, import_error: bool = False, hook_error: bool = False
) -> Path:
    """Write reloadapp.py (served as --app reloadapp:agent); returns its path.
    Any cached bytecode is removed, so the next import reads the source."""
    path = directory / "reloadapp.py"
    path.write_text(
        APP_TEMPLATE.format(
            version=version,
            prelude=IMPORT_ERROR if import_error else "",
            hook_body=HOOK_ERROR if hook_error else "pass",
            slow_handler=SLOW_HANDLER,
        )
    )
    cache = directory / "__pycache__"
    for pyc in cache.glob("reloadapp.*.pyc") if cache.is_dir() else ():
        pyc.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ the log

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SERVING = r"reload: generation {gen} serving"
RELOAD_FAILED = re.compile(r"reload failed, the running workers keep serving: (.*)")
HANDED = re.compile(r"worker (\d+) \(pid (\d+)\) handed (\d+) connection\(s\) over")
# a worker's own line when it starts handing over ("[reload: ]handing N connection(s) over")
HANDING = r"(?m)^\S+ \S+ (\d+) worker (\d+) \w+ [\w.]+: (?:reload: )?handing (\d+) connection"
READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


def line_time(line: str) -> float:
    """The wall-clock time (epoch seconds) of a log line (spoa_mp.logs format)."""
    m = LOG_TIME.match(line)
    if m is None:
        raise ValueError(f"no timestamp in {line!r}")
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def find_line(log: str, pattern: str) -> tuple[int, str]:
    """(index, text) of the first log line matching `pattern`."""
    rx = re.compile(pattern)
    for i, line in enumerate(log.splitlines()):
        if rx.search(line):
            return i, line
    raise AssertionError(f"no log line matches {pattern!r}:\n{log}")


def handed_over(log: str, pids: Iterable[int]) -> dict[int, int]:
    """{pid: connections} of the supervisor's "handed N connection(s) over"
    lines about these pids."""
    wanted = set(pids)
    return {int(m[2]): int(m[3]) for m in HANDED.finditer(log) if int(m[2]) in wanted}


# ------------------------------------------------------------------ processes


class ExitWatcher:
    """A thread noting, every few ms, when each of `pids` is gone (exited and
    reaped), in epoch seconds. Bounded: it stops once all are gone, when
    stopped, or after `limit` seconds."""

    def __init__(self, pids: Iterable[int], interval: float = 0.005, limit: float = 30.0):
        self.procs: dict[int, psutil.Process] = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                self.procs[pid] = psutil.Process(pid)
        self.exits: dict[int, float] = {}
        self.interval = interval
        self.limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ExitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            for pid, p in self.procs.items():
                if pid not in self.exits and gone(p):
                    self.exits[pid] = time.time()
            if len(self.exits) == len(self.procs):
                return
            self._stop.wait(self.interval)

    def all_gone(self) -> bool:
        return len(self.exits) == len(self.procs)

    def after(self, t0: float) -> dict[int, float]:
        """{pid: seconds from t0 (epoch) to its exit} of the pids gone so far."""
        return {pid: t - t0 for pid, t in self.exits.items()}


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED on the server side of 127.0.0.1:port."""
    return sum(
        1
        for c in psutil.net_connections(kind="tcp4")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def rx_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds unread on the server side of one connection
    (from /proc/net/tcp); None when the connection is not found."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        cols = line.split()
        local, remote, queues = cols[1], cols[2], cols[4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            return int(queues.split(":")[1], 16)
    return None


# ------------------------------------------------------------------ HAProxy + wrk

SCORE_RETURN = "    http-request return status 200 content-type text/plain lf-string"
ERROR_503 = "    http-request return status 503 if { var(txn.iprep.error) -m found }\n"


class ReloadHAProxyConfig(HAProxyConfig):
    """The e2e configuration plus `option pipelining` on the agent and a 503
    from the `score` frontend whenever the SPOE set txn.iprep.error. Use the
    HTTP_NAMED form: one SPOE message per request, not per connection."""

    def write(self) -> None:
        spoe = render_spoe_cfg(self)
        anchor = "    option var-prefix iprep\n"
        assert anchor in spoe, spoe
        spoe = spoe.replace(anchor, anchor + "    option pipelining\n")
        cfg = render_haproxy_cfg(self)
        frontend = cfg.index("frontend score")
        at = cfg.index(SCORE_RETURN, frontend)
        cfg = cfg[:at] + ERROR_503 + cfg[at:]
        self.spoe_path.write_text(spoe)
        self.cfg_path.write_text(cfg)

"""The one HAProxy runner of the tests: binaries, configuration, process.

Everything here is bounded: every wait polls a condition until a deadline
(`wait_for`), every process runs in its own session (process group) so that
teardown can kill it with all its children, and every process writes its
stdout/stderr to files that the conftest hook prints when a test fails.

What is here:

* `HAProxyBinary` / `haproxy_binaries` / `haproxy_params`: the HAProxy
  binaries the e2e tests run against (Debian's 2.6, `../shared/bin/
  haproxy-3.2.0`, any in `HAPROXY_BINS`), found once, each with its version.
* `HAProxyConfig` / `render_haproxy_cfg` / `render_spoe_cfg`: the
  configuration of spop.md §9.5 (2.6) / §9.6 (3.1+) in two forms (see
  `SpoeForm`).
* `HAProxy`: `haproxy -c` then `haproxy -f cfg -db`, plus a stats-socket
  client (`show stat`) to read the agent server's state.
* `http_get`: a raw HTTP/1.0 GET from a chosen 127.x source address.
"""

from __future__ import annotations

import csv
import enum
import functools
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from support.processes import Process
from support.waits import HOST, IO_TIMEOUT, START_TIMEOUT, free_port, wait_for

HAPROXY = "haproxy"
CHECK_TIMEOUT = 15.0  # HAProxy health check to reach a state

# ------------------------------------------------------------------ HAProxy binaries

REPO = Path(__file__).resolve().parents[2]
DEBIAN_HAPROXY = "/usr/sbin/haproxy"  # Debian 12's 2.6 (make deps)
SHARED_HAPROXY = REPO.parent / "shared" / "bin" / "haproxy-3.2.0"
# More binaries to test against, colon-separated: HAPROXY_BINS=/opt/haproxy-3.4/haproxy
BINS_ENV = "HAPROXY_BINS"
_VERSION = re.compile(r"HAProxy version (\d+)\.(\d+)(\S*)")


@dataclass(frozen=True)
class HAProxyBinary:
    """One HAProxy executable and the version its `-v` printed."""

    path: str
    version: str  # "2.6.12-1+deb12u4", "3.2.0"

    @property
    def release(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(re.match(r"\d+", minor)[0])  # type: ignore[index]

    @property
    def spop(self) -> bool:
        """3.1 and later: the SPOP multiplexer, `mode spop` agents' backend
        (spop.md §8.2); 2.6 to 3.0: the SPOE applets, `mode tcp`."""
        return self.release >= (3, 1)

    @property
    def id(self) -> str:
        return "haproxy{}.{}".format(*self.release)

    @property
    def generator_version(self) -> str:
        """`spoa-mp haproxy-config --haproxy` for this binary."""
        return "3.x" if self.spop else "2.6"


# What the harness renders when a test names no binary (HAProxy 2.6 on PATH).
DEFAULT_HAPROXY = HAProxyBinary(HAPROXY, "2.6")


def read_version(path: str) -> str | None:
    """The version `path -v` prints, None if it is not a runnable HAProxy."""
    try:
        out = subprocess.run(
            [path, "-v"], capture_output=True, text=True, timeout=IO_TIMEOUT, check=False
        )
    except OSError:
        return None
    m = _VERSION.search(out.stdout)
    return f"{m[1]}.{m[2]}{m[3]}" if m else None


def candidate_paths() -> list[tuple[str, str]]:
    """(path, what it should be) of every HAProxy the e2e tests look for."""
    debian = shutil.which(HAPROXY) or DEBIAN_HAPROXY
    found = [(debian, "haproxy2.6"), (str(SHARED_HAPROXY), "haproxy3.2")]
    extra = [p for p in os.environ.get(BINS_ENV, "").split(":") if p]
    found.extend((path, f"{BINS_ENV}:{Path(path).name}") for path in extra)
    return found


@functools.cache
def haproxy_binaries() -> tuple[list[HAProxyBinary], list[tuple[str, str]]]:
    """(the binaries found, (id, path) of those missing), each real file once."""
    present: list[HAProxyBinary] = []
    missing: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path, label in candidate_paths():
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        version = read_version(path) if os.access(path, os.X_OK) else None
        if version is None:
            missing.append((label, path))
        else:
            present.append(HAProxyBinary(path, version))
    return present, missing


def haproxy_params() -> list[Any]:
    """pytest params, one per HAProxy binary (ids `haproxy2.6`, `haproxy3.2`;
    a second binary of the same release gets its full version); a missing
    one is a skipped param whose reason names the path."""
    present, missing = haproxy_binaries()
    ids = [b.id for b in present]
    params = [
        pytest.param(b, id=b.id if ids.count(b.id) == 1 else f"haproxy{b.version}") for b in present
    ]
    for label, path in missing:
        reason = f"HAProxy {path} not found or not runnable ({label} not tested)"
        params.append(pytest.param(None, id=label, marks=pytest.mark.skip(reason=reason)))
    return params


# ------------------------------------------------------------------ HAProxy config


class SpoeForm(enum.Enum):
    """The two common ways to send the client address (spop.md §9.5)."""

    # `args src`, event on-client-session: one unnamed argument
    SESSION_POSITIONAL = ("src", "on-client-session")
    # `args ip=src`, event on-frontend-http-request: an argument named "ip"
    HTTP_NAMED = ("ip=src", "on-frontend-http-request")

    @property
    def args(self) -> str:
        return self.value[0]

    @property
    def event(self) -> str:
        return self.value[1]


@dataclass
class HAProxyConfig:
    agent_port: int
    form: SpoeForm
    workdir: Path  # haproxy.cfg, the SPOE file
    socket_dir: Path  # the stats socket (short path: sun_path is 108 bytes)
    score_port: int = field(default_factory=free_port)
    deny_port: int = field(default_factory=free_port)
    processing_timeout_ms: int = 1000
    hello_timeout_ms: int = 2000
    check_inter_ms: int = 500
    haproxy: HAProxyBinary = DEFAULT_HAPROXY  # the syntax follows its version

    @property
    def cfg_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def spoe_path(self) -> Path:
        return self.workdir / "spoe-iprep.conf"

    @property
    def stats_socket(self) -> Path:
        return self.socket_dir / "haproxy.sock"

    def write(self) -> None:
        self.spoe_path.write_text(render_spoe_cfg(self))
        self.cfg_path.write_text(render_haproxy_cfg(self))


AGENT_BACKEND = "iprep-agents"
AGENT_SERVER = "agent1"
SCORE_BODY = re.compile(r"^score=(?P<score>\S*) err=(?P<err>\S*)$")


def render_spoe_cfg(c: HAProxyConfig) -> str:
    """The SPOE file of `c` (see spoe_file)."""
    return spoe_file(
        spop=c.haproxy.spop,
        args=c.form.args,
        event=c.form.event,
        processing_ms=c.processing_timeout_ms,
        hello_ms=c.hello_timeout_ms,
        agent_extra="    log global\n",
    )


def spoe_file(
    *, spop: bool, args: str, event: str, processing_ms: int, hello_ms: int, agent_extra: str = ""
) -> str:
    """The SPOE file of spop.md §9.5 (HAProxy 2.6: hello/idle/processing) or
    §9.6 (`spop`, 3.1+: processing only; hello and idle are ignored), one
    message `check-client-ip` with `args` on `event`; `agent_extra`: more
    lines for the spoe-agent section (the tests' and bench_haproxy.py's)."""
    hello_idle = "" if spop else f"    timeout hello      {hello_ms}ms\n    timeout idle       2m\n"
    return f"""\
[iprep]
spoe-agent iprep-agent
    messages check-client-ip
    option var-prefix iprep
    option set-on-error error
{hello_idle}\
    timeout processing {processing_ms}ms
    use-backend {AGENT_BACKEND}
{agent_extra}\

spoe-message check-client-ip
    args {args}
    event {event}
"""


def agent_backend_mode(haproxy: HAProxyBinary) -> str:
    """The agents' backend's mode line (3.1+ converts `mode tcp` itself, but
    `mode spop` is what its documentation asks for)."""
    return "mode spop" if haproxy.spop else "mode tcp"


def render_common_cfg(c: HAProxyConfig, global_extra: str = "") -> str:
    """haproxy.cfg's global and defaults sections and the frontend that
    returns the score; `global_extra`: more lines for the global section."""
    return f"""\
global
    log stderr format raw local0 info
    stats socket {c.stats_socket} mode 600 level admin
    stats timeout 30s
{global_extra}\

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend score
    bind {HOST}:{c.score_port}
    filter spoe engine iprep config {c.spoe_path}
    http-request return status 200 content-type text/plain lf-string \
"score=%[var(sess.iprep.ip_score)] err=%[var(txn.iprep.error)]\\n"
"""


def render_haproxy_cfg(c: HAProxyConfig) -> str:
    """haproxy.cfg: a frontend that returns the score, one that denies < 20,
    and the agents' backend with `option spop-check` (`mode spop` for 3.1+)."""
    return (
        render_common_cfg(c)
        + f"""
frontend guard
    bind {HOST}:{c.deny_port}
    filter spoe engine iprep config {c.spoe_path}
    http-request deny if {{ var(sess.iprep.ip_score) -m int lt 20 }}
    http-request return status 200 content-type text/plain lf-string \
"allowed score=%[var(sess.iprep.ip_score)]\\n"

backend {AGENT_BACKEND}
    {agent_backend_mode(c.haproxy)}
    timeout connect 5s
    timeout server  3m
    option spop-check
    server {AGENT_SERVER} {HOST}:{c.agent_port} check inter {c.check_inter_ms}ms
"""
    )


# ------------------------------------------------------------------ HAProxy process


def check_config(
    cfg: Path, haproxy: HAProxyBinary = DEFAULT_HAPROXY
) -> subprocess.CompletedProcess[str]:
    """`haproxy -c -f cfg` (the caller asserts returncode 0)."""
    return subprocess.run(
        [haproxy.path, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT * 2,
        check=False,
    )


H = TypeVar("H", bound="HAProxy")


def start_haproxy(
    config: HAProxyConfig, log_dir: Path, processes: list[Process], runner: type[H]
) -> H:
    """Write `config`, check it (`haproxy -c`), start `runner` on it
    (registered in `processes` first) and wait until it is ready."""
    config.write()
    checked = check_config(config.cfg_path, config.haproxy)
    assert checked.returncode == 0, (
        f"haproxy -c -f {config.cfg_path} failed ({checked.returncode}):\n"
        f"{checked.stdout}{checked.stderr}\n{config.cfg_path.read_text()}"
    )
    proc = runner(config, log_dir)
    processes.append(proc)
    proc.wait_ready()
    return proc


class HAProxy(Process):
    """HAProxy in the foreground (`-db`), with a stats-socket client."""

    def __init__(self, config: HAProxyConfig, log_dir: Path) -> None:
        self.config = config
        argv = [config.haproxy.path, "-f", str(config.cfg_path), "-db"]
        super().__init__("haproxy", argv, log_dir)

    def command(self, line: str, timeout: float = IO_TIMEOUT) -> str:
        """One command on the admin stats socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.config.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def show_stat(self) -> list[dict[str, str]]:
        """`show stat` as one dict per proxy/server row."""
        text = self.command("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise RuntimeError(f"unexpected 'show stat' answer: {text[:200]!r}")
        return list(csv.DictReader([lines[0][2:], *(ln for ln in lines[1:] if ln)]))

    def server_stat(
        self, backend: str = AGENT_BACKEND, server: str = AGENT_SERVER
    ) -> dict[str, str]:
        for row in self.show_stat():
            if row["pxname"] == backend and row["svname"] == server:
                return row
        raise KeyError(f"{backend}/{server} not in show stat")

    FRONTENDS: tuple[str, ...] = ("score", "guard")  # what render_haproxy_cfg binds

    def wait_ready(
        self, timeout: float = START_TIMEOUT, frontends: tuple[str, ...] | None = None
    ) -> None:
        """Until the stats socket answers and the frontends (`FRONTENDS` unless
        given) are OPEN (listeners are bound before the stats socket serves)."""
        names = frontends or self.FRONTENDS

        def ready() -> bool:
            self.check_alive()
            try:
                rows = self.show_stat()
            except (OSError, RuntimeError):
                return False
            status = {r["pxname"]: r["status"] for r in rows if r["svname"] == "FRONTEND"}
            return all(status.get(name) == "OPEN" for name in names)

        wait_for(ready, timeout, f"HAProxy's stats socket and frontends {names}")

    def wait_server(
        self, status: str, check_status: str | None = None, timeout: float = CHECK_TIMEOUT
    ) -> dict[str, str]:
        """Until the agent server's `status` (UP/DOWN) and, if given, its last
        `check_status` (L7OK, L4CON...) match; returns that stat row."""

        def matches() -> dict[str, str] | None:
            self.check_alive()
            row = self.server_stat()
            ok = row["status"] == status and check_status in (None, row["check_status"])
            return row if ok else None

        return wait_for(
            matches, timeout, f"agent server status {status} / check {check_status}", 0.05
        )


# ------------------------------------------------------------------ HTTP client


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: str
    elapsed: float

    def score(self) -> tuple[str, str]:
        """(score, err) from the `score` frontend's body ('' when unset)."""
        m = SCORE_BODY.match(self.body.strip("\n"))
        if m is None:
            raise AssertionError(f"unexpected body {self.body!r}")
        return m.group("score"), m.group("err")


def http_get(port: int, source: str, path: str = "/", timeout: float = IO_TIMEOUT) -> HttpResponse:
    """GET over HTTP/1.0 from `source` (any 127.x address works on Linux
    loopback) to 127.0.0.1:port; reads until the server closes."""
    started = time.monotonic()
    deadline = started + timeout
    with socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: e2e\r\nUser-Agent: spoa-mp-e2e\r\n\r\n".encode())
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete HTTP response within {timeout}s")
            s.settimeout(remaining)
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    elapsed = time.monotonic() - started
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"malformed HTTP response {raw[:200]!r}")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(int(status_line.split(" ", 2)[1]), headers, body.decode(), elapsed)

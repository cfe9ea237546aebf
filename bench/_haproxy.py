"""HAProxy side of bench_haproxy.py: finding binaries, the configuration both
agents get, HAProxy's stats, a keep-alive sample check and wrk's output."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs as P  # noqa: N812  (bench/ is not a package; puts tests/ on sys.path)
from support.haproxy import AGENT_BACKEND, spoe_file

HAPROXY_CANDIDATES = ("/usr/sbin/haproxy", str(P.REPO.parent / "shared" / "bin" / "haproxy-3.2.0"))
AGENT_SERVER = "agent1"
FRONTEND = "bench"
IO_TIMEOUT = 5.0
BODY = re.compile(rb"score=(?P<score>\S*) err=(?P<err>\S*)")


@dataclass(frozen=True)
class HAProxy:
    path: str
    version: str  # "2.6.12-1+deb12u4"

    @property
    def spop_mode(self) -> bool:
        """3.1+: the agents' backend is `mode spop` (the SPOP multiplexer)."""
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return bool(m) and (int(m.group(1)), int(m.group(2))) >= (3, 1)

    @property
    def label(self) -> str:
        return self.version.split("-")[0]


def find_haproxy(path: str) -> HAProxy | None:
    exe = shutil.which(path)
    if exe is None:
        return None
    exe = os.path.abspath(exe)
    version = P.version_of([exe, "-v"], r"version (\S+)")
    return None if version in ("missing", "unknown") else HAProxy(exe, version)


# ------------------------------------------------------------------ configurations


def render_spoe(hap: HAProxy, pipelining: bool, processing_ms: int) -> str:
    """The tests' SPOE file (tests/support/haproxy.py), pipelining or not."""
    return spoe_file(
        spop=hap.spop_mode,
        args="src",
        event="on-frontend-http-request",
        processing_ms=processing_ms,
        hello_ms=2000,
        agent_extra=f"    {'' if pipelining else 'no '}option pipelining\n",
    )


@dataclass(frozen=True)
class AgentTLS:
    """Mutual TLS between HAProxy and spoa-mp (files made by tests/support/tls_certs)."""

    ca: Path
    agent_cert: Path
    agent_key: Path
    haproxy_pem: Path  # HAProxy's client certificate and key

    def agent_flags(self) -> list[str]:
        return [
            "--tls-cert", str(self.agent_cert), "--tls-key", str(self.agent_key),
            "--tls-client-ca", str(self.ca),
        ]  # fmt: skip

    def server_words(self) -> str:
        return f" ssl verify required ca-file {self.ca} crt {self.haproxy_pem} check-ssl"


def render_haproxy(
    hap: HAProxy,
    spoe: Path | None,
    port: int,
    agent_port: int,
    stats: Path,
    nbthread: int,
    tls: AgentTLS | None = None,
) -> str:
    body = "score=%[var(sess.iprep.ip_score)] err=%[var(txn.iprep.error)]\\n"
    ret = "content-type text/plain lf-string"
    config = f"""\
global
    nbthread {nbthread}
    maxconn 4000
    stats socket {stats} mode 600 level admin

defaults
    mode http
    timeout connect 5s
    timeout client  30s
    timeout server  30s
    timeout http-keep-alive 30s

frontend {FRONTEND}
    bind {P.HOST}:{port}
"""
    if spoe is not None:
        config += f"    filter spoe engine iprep config {spoe}\n"
    config += f"""\
    http-request return status 503 {ret} "{body}" if {{ var(txn.iprep.error) -m found }}
    http-request return status 200 {ret} "{body}"
"""
    if spoe is not None:
        config += f"""
backend {AGENT_BACKEND}
    mode {"spop" if hap.spop_mode else "tcp"}
    timeout connect 5s
    timeout server  3m
    option spop-check
    server {AGENT_SERVER} {P.HOST}:{agent_port}{tls.server_words() if tls else ""} check inter 10s
"""
    return config


def server_status(stats: Path) -> dict[str, str]:
    """'show stat' statuses: {"FRONTEND": "OPEN", "agent1": "UP"}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT)
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        text = b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    rows = csv.DictReader([lines[0][2:], *(ln for ln in lines[1:] if ln)])
    return {r["svname"]: r["status"] for r in rows if r["pxname"] in (FRONTEND, AGENT_BACKEND)}


# ------------------------------------------------------------------ HTTP and wrk


def sample_keepalive(port: int, n: int) -> list[tuple[int, bytes, bytes]]:
    """n GETs on one HTTP/1.1 keep-alive connection: (status, score, err)."""
    out = []
    with socket.create_connection((P.HOST, port), timeout=IO_TIMEOUT) as s:
        f = s.makefile("rb")
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            status = int(f.readline().split(b" ", 2)[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            m = BODY.search(f.read(length))
            if m is None:
                raise RuntimeError("unexpected response body")
            out.append((status, m.group("score"), m.group("err")))
    return out


def check_samples(spoe: bool, samples: list[tuple[int, bytes, bytes]]) -> str:
    """'' when the samples are as expected, else what is wrong."""
    problems = []
    for status, score, err in samples:
        if status != 200 or err:
            problems.append(f"status {status} err={err.decode(errors='replace')!r}")
        elif spoe and not (score.isdigit() and 0 <= int(score) <= 100):
            problems.append(f"score {score!r}")
        elif not spoe and score:
            problems.append(f"score {score!r} without the filter")
    if spoe and not problems and len({s for _, s, _ in samples}) == 1:
        problems.append("the same score for every request: not one NOTIFY per request")
    return "; ".join(problems)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict[str, Any]:
    """req/s, p50/p99 (ms), non-2xx and socket errors from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    lat = {
        m.group(1): float(m.group(2)) * _UNITS[m.group(3)]
        for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)$", out, re.M)
    }
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }

"""The metrics as Prometheus itself sees them: `promtool check metrics` on a real
server's /metrics, and a real Prometheus server (started here on a free loopback
port, temp config and storage) scraping spoa-mp while `spoa-mp bench` loads it,
queried through its HTTP API. Skipped with a line when the binaries are absent
(Debian package `prometheus`, installed by `make test`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import Process
from support.server import Server
from support.waits import HOST, free_port, wait_for

pytestmark = pytest.mark.e2e

METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus)")
    return path


def get(url: str, accept: str = "") -> tuple[str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with OPENER.open(req, timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    """spoa-mp -n 2 with --metrics on a port the OS picks."""
    with Server(tmp_path, "--metrics", f"{HOST}:0", workers=2) as srv:
        m = METRICS_LINE.search(srv.log())
        assert m, srv.log()
        yield srv, int(m[1])


def bench(port: int, tmp_path: Path, seconds: float) -> dict[str, int]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spoa_mp",
            "bench",
            "-p",
            str(port),
            "-c",
            "4",
            "-P",
            "8",
            "-d",
            str(seconds),
            "--warmup",
            "0.2",
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout)
    assert result["errors"] == 0, result
    return result


def test_promtool_finds_nothing_to_complain_about(
    server: tuple[Server, int], tmp_path: Path
) -> None:
    promtool = binary("promtool")
    srv, metrics_port = server
    bench(srv.port, tmp_path, 0.5)  # so that labeled families have samples
    url = f"http://{HOST}:{metrics_port}/metrics"

    def scraped_traffic() -> bytes | None:
        body = get(url)[1]
        return body if b'spoa_mp_messages_total{message="check-client-ip"}' in body else None

    body = wait_for(scraped_traffic, 10.0, "messages in /metrics")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")


@pytest.fixture
def prometheus(server: tuple[Server, int], tmp_path: Path) -> Iterator[str]:
    """A Prometheus server scraping spoa-mp every 0.5 s; yields its base URL."""
    exe = binary("prometheus")
    _, metrics_port = server
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
        "scrape_configs:\n  - job_name: spoa\n"
        f"    static_configs:\n      - targets: ['{HOST}:{metrics_port}']\n"
    )
    port = free_port()
    argv = [
        exe,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    proc = Process("prometheus", argv, tmp_path, merge_output=True, cwd=tmp_path)
    base = f"http://{HOST}:{port}"

    def ready() -> bool:
        proc.check_alive()
        try:
            return get(base + "/-/ready")[1].startswith(b"Prometheus")
        except OSError:
            return False

    try:
        wait_for(ready, 30.0, "Prometheus to be ready")
        yield base
    finally:
        proc.shutdown()


def query(base: str, expr: str) -> float | None:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(get(url)[1])
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_a_real_prometheus_reads_what_bench_got_acked(
    server: tuple[Server, int], prometheus: str, tmp_path: Path
) -> None:
    srv, _ = server
    wait_for(lambda: query(prometheus, 'up{job="spoa"}') == 1, 15.0, "a first scrape")
    result = bench(srv.port, tmp_path, 1.5)
    acked = result["acked"]
    assert acked == result["sent"] > 0
    expr = 'sum(spoa_mp_messages_total{job="spoa"})'
    got = wait_for(
        lambda: (v := query(prometheus, expr)) == acked and v, 15.0, f"{expr} == {acked}"
    )
    print(f"bench acked {acked}; Prometheus reads {expr} = {got:.0f}")
    by_worker = query(prometheus, 'sum(spoa_mp_worker_messages_total{job="spoa"})')
    assert by_worker == acked
    spread = query(prometheus, 'count(spoa_mp_worker_messages_total{job="spoa"})')
    assert spread == 2  # one series per worker slot
    # the scrape went through OpenMetrics (what Prometheus asks for first)
    content_type, _ = get(f"http://{HOST}:{server[1]}/metrics", OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")

"""The bench scripts' argument parsing, output parsing, configurations and ratios.

Nothing here is timed: the scripts measure, these tests only check that they
read, write and compute what they say (HAProxy validates the configurations
with `haproxy -c` where the binaries are present)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _haproxy as H  # noqa: E402, N812
import _procs as P  # noqa: E402, N812
import bench_direct  # noqa: E402
import bench_haproxy  # noqa: E402
from support.tls_certs import make_pki  # noqa: E402

HAPROXY_26 = Path("/usr/sbin/haproxy")
HAPROXY_32 = BENCH.parent.parent / "shared" / "bin" / "haproxy-3.2.0"

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   652.12us    1.10ms  40.01ms   97.20%
    Req/Sec    50.12k     2.01k   53.00k    80.00%
  Latency Distribution
     50%  512.00us
     75%  601.00us
     90%  700.00us
     99%    2.50ms
  498765 requests in 10.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  49876.50
Transfer/sec:      6.00MB
"""


def test_parse_wrk_reads_rate_latency_and_failures() -> None:
    w = H.parse_wrk(WRK_OUTPUT)
    assert w == {
        "rps": 49876.5,
        "p50_ms": pytest.approx(0.512),
        "p99_ms": pytest.approx(2.5),
        "non2xx": 7,
        "socket_errors": 6,
    }


def test_parse_wrk_without_errors_and_without_a_rate() -> None:
    clean = "\n".join(
        ln for ln in WRK_OUTPUT.splitlines() if "errors" not in ln and "Non" not in ln
    )
    w = H.parse_wrk(clean)
    assert (w["non2xx"], w["socket_errors"]) == (0, 0)
    with pytest.raises(RuntimeError, match="no Requests/sec"):
        H.parse_wrk("wrk: connection refused\n")


def test_check_samples() -> None:
    varied = [(200, str(s).encode(), b"") for s in (1, 50, 7, 100, 0, 33)]
    assert H.check_samples(True, varied) == ""
    assert "same score" in H.check_samples(True, [(200, b"5", b"")] * 6)
    assert "status 503" in H.check_samples(True, [(503, b"", b"1"), *varied])
    assert "score b'101'" in H.check_samples(True, [(200, b"101", b""), *varied])
    assert H.check_samples(False, [(200, b"", b"")] * 6) == ""
    assert "without the filter" in H.check_samples(False, [(200, b"3", b"")])


@pytest.mark.parametrize(
    ("version", "spop"),
    [("2.6.12-1+deb12u4", False), ("3.0.5", False), ("3.1.0", True), ("3.2.0", True)],
)
def test_spop_mode_from_the_version(version: str, spop: bool) -> None:
    hap = H.HAProxy("/x", version)
    assert hap.spop_mode is spop
    assert hap.label == version.split("-", maxsplit=1)[0]
    spoe = H.render_spoe(hap, pipelining=True, processing_ms=1000)
    assert ("timeout hello" in spoe) is not spop
    assert "    option pipelining" in spoe
    assert "args src" in spoe
    assert "no option pipelining" in H.render_spoe(hap, pipelining=False, processing_ms=1000)
    cfg = H.render_haproxy(hap, Path("/t/spoe.conf"), 1, 2, Path("/t/s.sock"), 1)
    assert f"mode {'spop' if spop else 'tcp'}" in cfg
    assert "filter spoe engine iprep config /t/spoe.conf" in cfg
    baseline = H.render_haproxy(hap, None, 1, 2, Path("/t/s.sock"), 1)
    assert "filter spoe" not in baseline
    assert H.AGENT_BACKEND not in baseline


@pytest.mark.parametrize("binary", [HAPROXY_26, HAPROXY_32], ids=["2.6", "3.2"])
def test_haproxy_accepts_the_configurations(binary: Path, tmp_path: Path) -> None:
    if not binary.exists():
        pytest.skip(f"{binary} is absent")
    hap = H.find_haproxy(str(binary))
    assert hap is not None
    spoe = tmp_path / "spoe.conf"
    spoe.write_text(H.render_spoe(hap, pipelining=True, processing_ms=1000))
    for with_filter in (spoe, None):
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(H.render_haproxy(hap, with_filter, 40001, 40002, tmp_path / "s.sock", 1))
        chk = subprocess.run(
            [hap.path, "-c", "-f", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.parametrize("binary", [HAPROXY_26, HAPROXY_32], ids=["2.6", "3.2"])
def test_haproxy_accepts_the_tls_configuration(binary: Path, tmp_path: Path) -> None:
    """--tls: the agents' server line with mutual TLS passes `haproxy -c`."""
    if not binary.exists():
        pytest.skip(f"{binary} is absent")
    hap = H.find_haproxy(str(binary))
    assert hap is not None
    pki = make_pki(tmp_path / "pki")
    tls = H.AgentTLS(pki.ca, pki.server_cert, pki.server_key, pki.haproxy_pem)
    spoe = tmp_path / "spoe.conf"
    spoe.write_text(H.render_spoe(hap, pipelining=True, processing_ms=1000))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(H.render_haproxy(hap, spoe, 40001, 40002, tmp_path / "s.sock", 1, tls))
    assert (
        f"ssl verify required ca-file {pki.ca} crt {pki.haproxy_pem} check-ssl" in cfg.read_text()
    )
    assert tls.agent_flags()[-2:] == ["--tls-client-ca", str(pki.ca)]
    chk = subprocess.run(
        [hap.path, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_loads_and_agents_parsing() -> None:
    assert bench_direct.parse_loads("1x1, 8x16,1x1") == [(1, 1), (8, 16)]
    for bad in ("8", "0x1", "8x", "8*16"):
        with pytest.raises(ValueError, match="CONNSxINFLIGHT"):
            bench_direct.parse_loads(bad)
    assert P.parse_agents("example, spoa-mp") == ["example", "spoa-mp"]
    assert P.parse_agents("spoa-mp,spoa-mp-tls") == ["spoa-mp", "spoa-mp-tls"]
    for bad in ("", "spoa-mp,haproxy"):
        with pytest.raises(ValueError, match="--agents"):
            P.parse_agents(bad)


def test_agent_command_lines() -> None:
    assert P.agent_argv("example", 4000, 2, 3, "py") == [
        str(P.EXAMPLE_AGENT), "-p", "4000", "-n", "3", "-c", "pipelining",
    ]  # fmt: skip
    mp = P.agent_argv("spoa-mp", 4000, 2, 3, "py")
    assert mp[:3] == ["py", "-m", "spoa_mp"]
    assert mp[mp.index("-n") + 1] == "2"
    assert mp[mp.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize(
    "argv",
    [["--loads", "8x"], ["--agents", "nginx"], ["--repeat", "0"], ["-d", "0"]],
)
def test_direct_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_direct.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_haproxy_bad_binary_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\necho nothing\n")
    fake.chmod(0o755)
    with pytest.raises(SystemExit) as e:
        bench_haproxy.parse_args(["--agents", "spoa-mp", "--haproxy", str(fake)])
    assert e.value.code == 2
    assert "not an HAProxy binary" in capsys.readouterr().err


def test_ratio_helpers() -> None:
    assert P.ratio(115.0, 100.0) == 1.15
    assert P.ratio(None, 100.0) is None
    assert P.ratio(1.0, 0.0) is None
    # per-round ratios 1.2, 1.0, 2.0 (round 4 has no partner): median 1.2
    assert P.paired_ratio({1: 12, 2: 10, 3: 20, 4: 5}, {1: 10, 2: 10, 3: 10}) == 1.2
    assert P.median([3.0, None, 1.0, 2.0]) == 2.0
    assert P.median([None]) is None


def _direct_run(agent: str, rnd: int, rate: float) -> bench_direct.Run:
    data = {"acked": 1000, "msg_per_s": rate, "errors": 0, "no_pipelining": 0,
            "latency_us": {"p50": 10.0, "p99": 50.0}}  # fmt: skip
    return bench_direct.run_from_json(data, agent, "8x16", rnd, agent_cpu_s=0.004, wall=2.0)


def test_direct_summary_ratios_and_cpu_per_message() -> None:
    r = _direct_run("spoa-mp", 1, 300.0)
    assert (r.agent_cpu, r.agent_us_per_msg) == (0.0, 4.0)  # 4 ms over 1000 ACKs
    runs = [_direct_run("spoa-mp", n, v) for n, v in ((1, 300), (2, 330), (3, 360))]
    runs += [_direct_run("example", n, v) for n, v in ((1, 100), (2, 150), (3, 120))]
    args = argparse.Namespace(loads=[(8, 16)], agents=["spoa-mp", "example"])
    (row,) = bench_direct.summarize(args, runs)
    assert row["spoa-mp"]["msg_per_s"] == 330
    assert row["example"]["msg_per_s"] == 120
    assert row["ratio"] == 2.75  # 330 / 120
    assert row["ratio_paired"] == 3.0  # median of 3.0, 2.2, 3.0


def test_direct_summary_compares_every_agent_with_the_last_one() -> None:
    runs = [_direct_run("spoa-mp:uvloop", n, v) for n, v in ((1, 200), (2, 220))]
    runs += [_direct_run("baseline", n, v) for n, v in ((1, 150), (2, 160))]
    runs += [_direct_run("example", n, v) for n, v in ((1, 100), (2, 100))]
    agents = ["spoa-mp:uvloop", "baseline", "example"]
    (row,) = bench_direct.summarize(argparse.Namespace(loads=[(8, 16)], agents=agents), runs)
    assert row["spoa-mp:uvloop"]["ratio"] == 2.1  # 210 / 100
    assert row["baseline"]["ratio"] == 1.55  # 155 / 100
    assert "ratio" not in row["example"]  # the reference
    assert (row["ratio"], row["ratio_paired"]) == (2.1, 2.1)


def test_agent_kinds_for_loops_and_a_baseline_checkout() -> None:
    assert P.parse_agents("spoa-mp:uvloop,spoa-mp:asyncio,baseline") == [
        "spoa-mp:uvloop", "spoa-mp:asyncio", "baseline",
    ]  # fmt: skip
    argv = P.agent_argv("spoa-mp:asyncio", 4000, 2, 3, "py")
    assert argv[:3] == ["py", "-m", "spoa_mp"]
    assert argv[-2:] == ["--loop", "asyncio"]
    assert "--loop" not in P.agent_argv("baseline", 4000, 2, 3, "old/py")  # older CLIs lack it
    with pytest.raises(SystemExit):
        bench_direct.parse_args(["--agents", "spoa-mp,baseline"])  # needs --baseline-python


def _hap_run(agent: str, rnd: int, rps: float, non2xx: int = 0) -> bench_haproxy.Run:
    return bench_haproxy.Run(
        haproxy="3.2.0", agent=agent, round=rnd, rps=rps, p50_ms=1.0, p99_ms=2.0,
        non2xx=non2xx, socket_errors=1 if non2xx else 0, cpu_haproxy=0.5, cpu_agent=0.25,
    )  # fmt: skip


def test_haproxy_summary_ratios_and_failures() -> None:
    runs = [_hap_run("none", n, 100.0) for n in (1, 2)]
    runs += [_hap_run("spoa-mp", 1, 60.0), _hap_run("spoa-mp", 2, 50.0, non2xx=2)]
    runs += [_hap_run("example", 1, 50.0), _hap_run("example", 2, 50.0)]
    hap = H.HAProxy("/x", "3.2.0")
    (row,) = bench_haproxy.summarize([hap], ["spoa-mp", "example"], runs, ["3.2.0 example"])
    assert row["spoa-mp"]["rps"] == 55.0
    assert row["spoa-mp"]["vs_none"] == 0.55
    assert row["spoa-mp"]["failed_requests"] == 3  # 2 non-2xx + 1 socket error
    assert row["example"]["failed_runs"] == 1
    assert row["example"]["failed_requests"] == 0
    assert row["ratio"] == 1.1
    assert row["ratio_paired"] == 1.1
    # median of the per-run figures: 0.25 cores / 60 and / 50 req/s
    assert row["spoa-mp"]["us_per_req_agent"] == pytest.approx((4166.7 + 5000.0) / 2)


def test_haproxy_summary_tls_ratio() -> None:
    runs = [_hap_run("none", n, 100.0) for n in (1, 2, 3)]
    runs += [_hap_run("spoa-mp", n, v) for n, v in ((1, 50.0), (2, 60.0), (3, 40.0))]
    runs += [_hap_run("spoa-mp-tls", n, v) for n, v in ((1, 45.0), (2, 48.0), (3, 40.0))]
    hap = H.HAProxy("/x", "3.2.0")
    (row,) = bench_haproxy.summarize([hap], ["spoa-mp", "spoa-mp-tls"], runs, [])
    assert row["tls_ratio"] == 0.9  # 45 / 50
    assert row["tls_ratio_paired"] == 0.9  # median of 0.9, 0.8, 1.0
    assert "ratio" not in row  # no example agent


def test_floors_script_runs_and_reports_both_floors() -> None:
    """bench_floors.py end to end, briefly: a real redis-server, both lines per loop."""
    pytest.importorskip("redis")
    from support.redis_server import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_floors.py"), "--loops", "asyncio", "-d", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "asyncio  sleep" in out
    assert "sleeps/s" in out
    assert "GET/s" in out
    assert "µs of client CPU per GET" in out

#!/usr/bin/env python3
"""HAProxy req/s under wrk with the SPOE filter: spoa-mp and the example agent side by side.

    .venv/bin/python bench/bench_haproxy.py       # every HAProxy found, both agents, 3 rounds
    .venv/bin/python bench/bench_haproxy.py --haproxy /usr/sbin/haproxy -d 2 --repeat 1
    .venv/bin/python bench/bench_haproxy.py --agents spoa-mp --workers 1 --json
    .venv/bin/python bench/bench_haproxy.py --tls  # spoa-mp in clear vs with mutual TLS

Each HAProxy (--haproxy, repeatable; default: Debian's 2.6 and
../shared/bin/haproxy-3.2.0, those present) runs one frontend on 127.0.0.1
that answers by itself (`http-request return`, no backend server):

    http-request return status 503 ... if { var(txn.iprep.error) -m found }
    http-request return status 200 ... lf-string "score=%[var(sess.iprep.ip_score)] ..."

"none" is that frontend as it is (the baseline); an agent run adds `filter
spoe engine iprep config spoe.conf` whose agent gets one NOTIFY
`check-client-ip` (`args src`) per request (event on-frontend-http-request).
Both agents get the very same SPOE file and do the same job: a random
`sess.iprep.ip_score` in 0..100. spoa-mp runs `-n 2` (its default IP
reputation agent, two worker processes), HAProxy's example agent `-n 2 -c
pipelining` (two worker threads): two workers each on this 2-core machine.
The SPOE side is spop.md 9.5 (`option pipelining` unless --no-pipelining,
`timeout processing 1s`, `option spop-check`); the agents' backend is `mode
tcp` for HAProxy up to 3.0 and `mode spop` from 3.1, and `timeout hello` /
`timeout idle` are written for the former only.

One run: start the agent and HAProxy, wait until the agent server is UP,
warm up with wrk (--warmup s), then `wrk -t T -c C -d D --latency` while
sampling the CPU time of HAProxy, the agent and wrk; a few keep-alive
requests then check that scores are there and change from request to
request; stop everything. Rounds alternate the configurations (none,
spoa-mp, example, none, spoa-mp, example...) for every HAProxy, so that drift
hits them alike; figures are medians over the rounds, and "paired" is the
median of the per-round ratios. Failed requests are wrk's non-2xx (503 = a
NOTIFY failed) plus its socket errors, in the measured runs (after warm-up).

--tls compares spoa-mp in clear ("spoa-mp") with spoa-mp behind mutual TLS
("spoa-mp-tls": --tls-cert/--tls-key/--tls-client-ca, and the server line
`ssl verify required ca-file CA crt HAPROXY.pem check-ssl`), certificates
made once with the openssl command (tests/support/tls_certs.py); "tls ratio"
is spoa-mp-tls over spoa-mp.

The machine may be shared: before each run the script waits (--quiet-timeout)
until the rest of the machine uses less than --max-others cores, and redoes a
run during which it used more (--noisy-retries); the "others" column says how
noisy the runs were. Every process started is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs as P  # noqa: N812  (bench/ is not a package)
import _report as R  # noqa: N812
from _haproxy import (
    AGENT_SERVER,
    HAPROXY_CANDIDATES,
    AgentTLS,
    HAProxy,
    check_samples,
    find_haproxy,
    parse_wrk,
    render_haproxy,
    render_spoe,
    sample_keepalive,
    server_status,
)
from support.tls_certs import make_pki  # tests/support, on the path through _procs

# ------------------------------------------------------------------ one run


@dataclass
class Run:
    haproxy: str
    agent: str  # "none", "spoa-mp", "example"
    round: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non2xx: int
    socket_errors: int
    cpu_haproxy: float = 0.0  # cores used during the run
    cpu_agent: float = 0.0
    cpu_wrk: float = 0.0
    cpu_others: float = 0.0  # the machine's busy time but ours (noise, softirq)
    cpu_busy: float = 0.0  # the whole machine
    samples_problem: str = ""
    noisy: bool = False

    @property
    def failed(self) -> int:
        return self.non2xx + self.socket_errors

    def per_req_us(self, cores: float) -> float | None:
        return round(1e6 * cores / self.rps, 1) if self.rps else None


def wrk_argv(args: argparse.Namespace, url: str, seconds: float) -> list[str]:
    return [
        args.wrk,
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{seconds:g}s",
        "--latency",
        url,
    ]


def run_wrk(procs: P.Procs, proc: P.Proc, seconds: float) -> str:
    try:
        proc.popen.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError("wrk did not finish in time") from None
    finally:
        procs.stop(proc)
    text = proc.log.read_text(errors="replace")
    proc.log.unlink()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.popen.returncode}:\n{text}")
    return text


def one_run(
    hap: HAProxy, agent: str, rnd: int, args: argparse.Namespace, tmp: Path, procs: P.Procs
) -> Run:
    run_dir = Path(tempfile.mkdtemp(prefix=f"r{rnd}-", dir=tmp))
    port, agent_port = P.free_port(), P.free_port()
    spoe = None if agent == "none" else run_dir / "spoe.conf"
    if spoe is not None:
        spoe.write_text(render_spoe(hap, not args.no_pipelining, args.processing_ms))
    cfg, stats = run_dir / "haproxy.cfg", run_dir / "stats.sock"
    tls = args.tls_files if agent == "spoa-mp-tls" else None
    cfg.write_text(render_haproxy(hap, spoe, port, agent_port, stats, args.nbthread, tls))
    chk = subprocess.run(
        [hap.path, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )
    if chk.returncode != 0:
        raise RuntimeError(f"haproxy -c failed:\n{chk.stdout}{chk.stderr}")

    ag = None
    if agent != "none":
        ag = P.start_agent(
            procs, agent, agent_port, args.workers, args.example_threads, args.python, run_dir,
            extra=tls.agent_flags() if tls else (),
        )  # fmt: skip
    hp = procs.start("haproxy", [hap.path, "-f", str(cfg), "-db"], run_dir)

    def ready() -> bool:
        hp.check_alive()
        try:
            st = server_status(stats)
        except OSError:
            return False
        return st.get("FRONTEND") == "OPEN" and (ag is None or st.get(AGENT_SERVER) == "UP")

    P.wait_for(ready, P.START_TIMEOUT, "HAProxy ready and the agent server UP")
    url = f"http://{P.HOST}:{port}/"
    if args.warmup > 0:
        run_wrk(procs, procs.start("wrk", wrk_argv(args, url, args.warmup), run_dir), args.warmup)

    agent_tree = ag.tree() if ag else []
    wrk = procs.start("wrk", wrk_argv(args, url, args.duration), run_dir)
    mine = [P.psutil.Process(), hp.ps, wrk.ps, *agent_tree]

    def snapshot() -> tuple[float, ...]:
        return (
            time.monotonic(),
            P.cpu_seconds([hp.ps]),
            P.cpu_seconds(agent_tree),
            P.cpu_seconds([wrk.ps]),
            P.cpu_seconds(mine),
            P.machine_busy(),
        )

    s0 = snapshot()
    # CPU up to just before wrk ends (its times vanish when it is reaped)
    while wrk.alive() and time.monotonic() < s0[0] + args.duration - 0.3:
        time.sleep(0.05)
    s1 = snapshot()
    out = run_wrk(procs, wrk, args.duration)
    if ag is not None:
        ag.check_alive()
        if len(ag.tree()) != len(agent_tree):
            raise RuntimeError(f"{agent} lost a process during the run")
    wall = max(s1[0] - s0[0], 1e-9)
    d = [round((b - a) / wall, 2) for a, b in zip(s0, s1, strict=True)]
    res = Run(
        haproxy=hap.label,
        agent=agent,
        round=rnd,
        **parse_wrk(out),
        cpu_haproxy=d[1],
        cpu_agent=d[2],
        cpu_wrk=d[3],
        cpu_others=round(max(0.0, d[5] - d[4]), 2),
        cpu_busy=d[5],
    )
    try:
        res.samples_problem = check_samples(ag is not None, sample_keepalive(port, 6))
    except (OSError, RuntimeError, ValueError, IndexError) as e:
        res.samples_problem = f"sample failed: {e}"
    procs.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def measure(
    hap: HAProxy, agent: str, rnd: int, args: argparse.Namespace, tmp: Path, log: Any
) -> Run | None:
    """One run after a quiet-machine wait, redone when noisy; None when it failed."""
    label = f"  round {rnd} {hap.label:<8} {agent:<8}"
    procs = P.Procs()
    r = None
    for attempt in range(args.noisy_retries + 1):
        if args.max_others > 0:
            P.wait_quiet(args.max_others, args.quiet_timeout)
        try:
            r = one_run(hap, agent, rnd, args, tmp, procs)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            print(f"{label} FAILED: {e}", file=log, flush=True)
            return None
        finally:
            procs.stop_all()
        r.noisy = args.max_others > 0 and r.cpu_others >= args.max_others
        again = r.noisy and attempt < args.noisy_retries
        print(
            f"{label} {r.rps:>8.0f} req/s  p50 {P.fmt(r.p50_ms, '.2f')} p99"
            f" {P.fmt(r.p99_ms, '.2f')} ms  failed {r.failed}  cores haproxy/agent/wrk/others"
            f" {r.cpu_haproxy:.2f}/{r.cpu_agent:.2f}/{r.cpu_wrk:.2f}/{r.cpu_others:.2f}"
            + (f"  SAMPLES: {r.samples_problem}" if r.samples_problem else "")
            + ("  NOISY" + (": again" if again else "") if r.noisy else ""),
            file=log,
            flush=True,
        )
        if not again:
            break
    return r


# ------------------------------------------------------------------ report


def summarize(
    haps: list[HAProxy], agents: list[str], runs: list[Run], failures: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for hap in haps:
        per_round: dict[str, dict[int, float]] = {}
        row: dict[str, Any] = {"haproxy": hap.label, "path": hap.path}
        for agent in ["none", *agents]:
            rs = [r for r in runs if r.haproxy == hap.label and r.agent == agent]
            per_round[agent] = {r.round: r.rps for r in rs}
            row[agent] = {
                "runs": len(rs),
                "noisy": sum(r.noisy for r in rs),
                "failed_runs": sum(1 for f in failures if f == f"{hap.label} {agent}"),
                "rps": P.median([r.rps for r in rs]),
                "rps_all": [r.rps for r in rs],
                "p50_ms": P.median([r.p50_ms for r in rs]),
                "p99_ms": P.median([r.p99_ms for r in rs]),
                "failed_requests": sum(r.failed for r in rs),
                "samples_problems": [r.samples_problem for r in rs if r.samples_problem],
                "cpu_others": P.median([r.cpu_others for r in rs]),
                "us_per_req_haproxy": P.median([r.per_req_us(r.cpu_haproxy) for r in rs]),
                "us_per_req_agent": P.median([r.per_req_us(r.cpu_agent) for r in rs]),
                "us_per_req_machine": P.median([r.per_req_us(r.cpu_busy) for r in rs]),
                "vs_none": P.ratio(
                    P.median([r.rps for r in rs]), P.median(list(per_round["none"].values()))
                )
                if agent != "none"
                else None,
            }
        if "spoa-mp" in agents and "example" in agents:
            row["ratio"] = P.ratio(row["spoa-mp"]["rps"], row["example"]["rps"])
            paired = P.paired_ratio(per_round["spoa-mp"], per_round["example"])
            row["ratio_paired"] = round(paired, 3) if paired is not None else None
        if "spoa-mp" in agents and "spoa-mp-tls" in agents:
            row["tls_ratio"] = P.ratio(row["spoa-mp-tls"]["rps"], row["spoa-mp"]["rps"])
            paired = P.paired_ratio(per_round["spoa-mp-tls"], per_round["spoa-mp"])
            row["tls_ratio_paired"] = round(paired, 3) if paired is not None else None
        rows.append(row)
    return rows


def print_table(agents: list[str], rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'HAProxy':<9}{'agent':<9}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'failed':>8}"
        f"{'vs none':>8}{'ratio':>7}{'paired':>7}  {'us/req h/a/all':<17}{'others':>7}  runs"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        for i, agent in enumerate(["none", *agents]):
            a = row[agent]
            ratio = paired = ""
            key = {"spoa-mp": "ratio", "spoa-mp-tls": "tls_ratio"}.get(agent)
            if key:
                ratio = P.fmt(row.get(key), ".2f")
                paired = P.fmt(row.get(f"{key}_paired"), ".2f")
            us = "/".join(
                P.fmt(a[k], ".1f")
                for k in ("us_per_req_haproxy", "us_per_req_agent", "us_per_req_machine")
            )
            runs = f"{a['runs']}" + (f" ({a['noisy']} noisy)" if a["noisy"] else "")
            runs += f" +{a['failed_runs']} FAILED" if a["failed_runs"] else ""
            runs += (
                "  SAMPLES: " + "; ".join(a["samples_problems"]) if a["samples_problems"] else ""
            )
            print(
                f"{row['haproxy'] if i == 0 else '':<9}{agent:<9}{P.fmt(a['rps'], '.0f'):>8}"
                f"{P.fmt(a['p50_ms'], '.2f'):>8}{P.fmt(a['p99_ms'], '.2f'):>8}"
                f"{a['failed_requests']:>8}{P.fmt(a['vs_none'], '.2f'):>8}{ratio:>7}{paired:>7}"
                f"  {us:<17}{P.fmt(a['cpu_others'], '.2f'):>7}  {runs}"
            )


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HAProxy req/s with spoa-mp and the example agent behind the SPOE filter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--haproxy",
        action="append",
        metavar="PATH",
        help=f"HAProxy binary, repeatable (default: those of {HAPROXY_CANDIDATES})",
    )
    p.add_argument("--agents", default="spoa-mp,example", help=", ".join(P.AGENTS))
    p.add_argument("--tls", action="store_true", help="--agents spoa-mp,spoa-mp-tls")
    p.add_argument("--workers", type=int, default=2, help="spoa-mp -n")
    p.add_argument("--example-threads", type=int, default=2, help="spoa-example -n")
    p.add_argument("--nbthread", type=int, default=1, help="HAProxy nbthread")
    p.add_argument("--no-pipelining", action="store_true", help="no option pipelining")
    p.add_argument("--threads", "-t", type=int, default=1, help="wrk -t")
    p.add_argument("--connections", "-c", type=int, default=32, help="wrk -c")
    p.add_argument(
        "--duration",
        "-d",
        type=int,
        default=10,
        help="wrk -d, whole seconds (wrk takes no fractions)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up, seconds")
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--processing-ms", type=int, default=1000, help="SPOE timeout processing")
    p.add_argument("--max-others", type=float, default=0.25, help="noise threshold, cores")
    p.add_argument("--quiet-timeout", type=float, default=30.0, help="longest quiet wait, s")
    p.add_argument("--noisy-retries", type=int, default=1, help="redos of a noisy run")
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--python", default=sys.executable, help="python with spoa_mp")
    p.add_argument("--json", action="store_true", help="JSON on stdout (progress on stderr)")
    args = p.parse_args(argv)
    args.tls_files = None  # made with the rounds' temporary directory (main)
    try:
        args.agents = P.parse_agents("spoa-mp,spoa-mp-tls" if args.tls else args.agents)
    except ValueError as e:
        p.error(str(e))
    for name in ("repeat", "threads", "connections", "workers", "example_threads", "nbthread"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration < 2:
        p.error("--duration must be at least 2 (whole seconds)")
    if shutil.which(args.wrk) is None:
        p.error(f"{args.wrk} not found (apt-get install -y wrk)")
    if "example" in args.agents and not P.EXAMPLE_AGENT.exists():
        p.error(f"{P.EXAMPLE_AGENT} not found (use --agents spoa-mp)")
    paths = args.haproxy or [c for c in HAPROXY_CANDIDATES if Path(c).exists()]
    args.haproxies = []
    for path in dict.fromkeys(paths):
        hap = find_haproxy(path)
        if hap is None:
            p.error(f"{path}: not an HAProxy binary (apt-get install -y haproxy)")
        args.haproxies.append(hap)
    if not args.haproxies:
        p.error("no HAProxy found (apt-get install -y haproxy, or --haproxy PATH)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, log = R.start(argv, args.json)
    info = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "haproxy": {h.label: h.path for h in args.haproxies},
        "wrk": P.version_of([args.wrk, "-v"], r"wrk (\S+)"),
        "wrk_args": f"-t {args.threads} -c {args.connections} -d {args.duration:g}s --latency",
        "python": platform.python_version(),
        "cpus": len(P.psutil.Process().cpu_affinity() or []),
        "spoa_mp": f"-n {args.workers}",
        "example": f"-n {args.example_threads} -c pipelining",
        "pipelining": not args.no_pipelining,
        "tls": "spoa-mp-tls: mutual TLS, EC P-256 certificates" if args.tls else None,
        "nbthread": args.nbthread,
        "repeat": args.repeat,
    }
    print(
        f"{info['date']}: HAProxy {', '.join(info['haproxy'])} nbthread {args.nbthread},"
        f" wrk {info['wrk_args']} (warm-up {args.warmup:g}s), spoa-mp {info['spoa_mp']}"
        f" vs spoa-example {info['example']}, pipelining {'on' if info['pipelining'] else 'off'},"
        f" {args.repeat} rounds, {info['cpus']} CPUs",
        file=log,
        flush=True,
    )
    runs: list[Run] = []
    failures: list[str] = []

    def rounds(tmp: Path) -> None:
        if "spoa-mp-tls" in args.agents:
            pki = make_pki(tmp / "pki")
            args.tls_files = AgentTLS(pki.ca, pki.server_cert, pki.server_key, pki.haproxy_pem)
        for rnd in range(1, args.repeat + 1):
            for hap in args.haproxies:
                for agent in ["none", *args.agents]:
                    r = measure(hap, agent, rnd, args, tmp, log)
                    if r is None:
                        failures.append(f"{hap.label} {agent}")
                    else:
                        runs.append(r)

    if not R.run_rounds("bench-haproxy-", rounds):
        return 130
    rows = summarize(args.haproxies, args.agents, runs, failures)
    R.report(
        args.json,
        info,
        rows,
        runs,
        lambda: print_table(args.agents, rows),
        "req/s, p50, p99: medians over the rounds; failed: non-2xx + socket errors of wrk,"
        " measured runs, all rounds; vs none: req/s over the no-filter baseline; ratio:"
        " spoa-mp/example medians (spoa-mp-tls: over spoa-mp in clear); paired: median of"
        " per-round ratios; us/req h/a/all: CPU"
        " us per request of HAProxy / the agent / the whole machine; others: cores used by"
        " the rest of the machine during the runs (noise).",
    )
    bad = failures or any(r.failed or r.samples_problem for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

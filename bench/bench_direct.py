#!/usr/bin/env python3
"""spoa-mp and HAProxy's example agent side by side under `spoa-mp bench`.

    .venv/bin/python bench/bench_direct.py                      # 1x1 4x1 64x1 8x16, 3 rounds
    .venv/bin/python bench/bench_direct.py --loads 8x16 -d 2 --repeat 1 --json
    .venv/bin/python bench/bench_direct.py --agents spoa-mp:uvloop,spoa-mp:asyncio,example
    .venv/bin/python bench/bench_direct.py --agents spoa-mp,baseline \
        --baseline-python ../old/.venv/bin/python      # old against new, same run

For every load (connections x NOTIFYs in flight per connection) and round,
each agent in turn (spoa-mp, example, spoa-mp, example...) is started afresh on
a free 127.0.0.1 port, loaded with `python -m spoa_mp bench -p PORT -c C -P P
-d D --warmup W --json -q` (the C generator: HAProxy-like HELLO offering
pipelining, one `check-client-ip` NOTIFY per frame, every ACK checked), then
stopped. spoa-mp runs `-n 2` (two worker processes), the example agent `-n 2
-c pipelining` (two worker threads, pipelining on so that P > 1 is honoured:
the generator counts connections where it was not negotiated), so each has
two cores' worth of workers on this 2-core machine (--workers,
--example-threads change that).

Per agent and load: median msg/s, p50 and p99 over the rounds, errors, and the
agents' CPU per message (user+sys of the agent's processes over the whole
generator run / every ACK of that run, warm-up included). The ratio is
spoa-mp's median msg/s over the example's; "paired" is the median of the
per-round ratios. Before each run the script waits for other processes to use
less than --max-others cores and redoes (--noisy-retries) a run during which
they used more.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs as P  # noqa: N812  (bench/ is not a package)
import _report as R  # noqa: N812

DEFAULT_LOADS = "1x1,4x1,64x1,8x16"


@dataclass
class Run:
    agent: str
    load: str
    round: int
    msg_per_s: float
    p50_us: float | None
    p99_us: float | None
    errors: int
    no_pipelining: int  # connections where the agent did not offer pipelining
    acked: int
    agent_cpu: float  # cores the agent used during the generator run
    agent_us_per_msg: float | None
    others_cpu: float  # cores the rest of the machine used (noise)
    noisy: bool = False


def parse_loads(text: str) -> list[tuple[int, int]]:
    """'1x1,8x16' -> [(1, 1), (8, 16)]; ValueError on anything else."""
    loads = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"a load is CONNSxINFLIGHT, e.g. 8x16: {part!r}")
        loads.append((int(m.group(1)), int(m.group(2))))
    return list(dict.fromkeys(loads))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="spoa-mp vs spoa-example msg/s under `spoa-mp bench`, alternating.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--loads", default=DEFAULT_LOADS, help="CONNSxINFLIGHT, comma-separated")
    p.add_argument("--agents", default="spoa-mp,example", help="spoa-mp and/or example")
    p.add_argument("--workers", type=int, default=2, help="spoa-mp -n")
    p.add_argument("--example-threads", type=int, default=2, help="spoa-example -n")
    p.add_argument("--duration", "-d", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="generator warm-up, seconds")
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--max-others", type=float, default=0.25, help="noise threshold, cores")
    p.add_argument("--quiet-timeout", type=float, default=30.0, help="longest quiet wait, s")
    p.add_argument("--noisy-retries", type=int, default=1, help="redos of a noisy run")
    p.add_argument("--python", default=sys.executable, help="python with spoa_mp")
    p.add_argument(
        "--baseline-python",
        help="the `baseline` agent's python: another checkout's .venv/bin/python (old vs new)",
    )
    p.add_argument("--json", action="store_true", help="JSON on stdout (progress on stderr)")
    args = p.parse_args(argv)
    try:
        args.loads = parse_loads(args.loads)
        args.agents = P.parse_agents(args.agents)
    except ValueError as e:
        p.error(str(e))
    if args.repeat < 1 or args.workers < 1 or args.example_threads < 1:
        p.error("--repeat, --workers and --example-threads must be >= 1")
    if args.duration <= 0:
        p.error("--duration must be > 0")
    if "baseline" in args.agents and not args.baseline_python:
        p.error("--agents baseline needs --baseline-python")
    if "example" in args.agents and not P.EXAMPLE_AGENT.exists():
        p.error(f"{P.EXAMPLE_AGENT} not found (use --agents spoa-mp)")
    return args


def generator_argv(args: argparse.Namespace, port: int, conns: int, in_flight: int) -> list[str]:
    return [
        args.python,
        "-m",
        "spoa_mp",
        "bench",
        "-p",
        str(port),
        "-c",
        str(conns),
        "-P",
        str(in_flight),
        "-d",
        f"{args.duration:g}",
        "--warmup",
        f"{args.warmup:g}",
        "--json",
        "-q",
    ]


def run_from_json(
    data: dict[str, Any], agent: str, load: str, rnd: int, agent_cpu_s: float, wall: float
) -> Run:
    """A Run from the generator's --json output and the agent's CPU seconds."""
    acked = int(data["acked"])
    lat = data.get("latency_us") or {}
    return Run(
        agent=agent,
        load=load,
        round=rnd,
        msg_per_s=round(float(data["msg_per_s"]), 1),
        p50_us=lat.get("p50"),
        p99_us=lat.get("p99"),
        errors=int(data["errors"]),
        no_pipelining=int(data["no_pipelining"]),
        acked=acked,
        agent_cpu=round(agent_cpu_s / wall, 2) if wall > 0 else 0.0,
        agent_us_per_msg=round(1e6 * agent_cpu_s / acked, 2) if acked else None,
        others_cpu=0.0,
    )


def one_run(
    args: argparse.Namespace, agent: str, conns: int, in_flight: int, rnd: int, tmp: Path
) -> Run:
    procs = P.Procs()
    try:
        port = P.free_port()
        python = args.baseline_python if agent == "baseline" else args.python
        proc = P.start_agent(procs, agent, port, args.workers, args.example_threads, python, tmp)
        tree = proc.tree()
        gen = procs.start("generator", generator_argv(args, port, conns, in_flight), tmp)
        mine = [*tree, gen.ps]
        t0, busy0, agent0, mine0 = (
            time.monotonic(),
            P.machine_busy(),
            P.cpu_seconds(tree),
            P.cpu_seconds(mine),
        )
        # CPU up to just before the generator exits (its times vanish when it is reaped)
        end = t0 + args.warmup + args.duration + 0.9
        while gen.alive() and time.monotonic() < end:
            time.sleep(0.05)
        t1, busy1, agent1, mine1 = (
            time.monotonic(),
            P.machine_busy(),
            P.cpu_seconds(tree),
            P.cpu_seconds(mine),
        )
        try:
            gen.popen.wait(timeout=args.warmup + args.duration + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError("the generator did not finish in time") from None
        out = gen.log.read_text(errors="replace")
        proc.check_alive()
        if P.is_spoa(agent) and len(proc.tree()) != args.workers + 1:
            raise RuntimeError("a spoa-mp worker died during the run")
        try:
            data = json.loads(out[out.index("{") :])
        except ValueError:
            raise RuntimeError(f"no JSON from the generator:\n{out[-2000:]}") from None
        r = run_from_json(data, agent, f"{conns}x{in_flight}", rnd, agent1 - agent0, t1 - t0)
        r.others_cpu = round(max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (t1 - t0), 2)
        return r
    finally:
        procs.stop_all()
        for f in tmp.glob("*.log"):
            f.unlink()


def measure(
    args: argparse.Namespace, agent: str, conns: int, in_flight: int, rnd: int, tmp: Path, log: Any
) -> Run:
    for attempt in range(args.noisy_retries + 1):
        if args.max_others > 0:
            P.wait_quiet(args.max_others, args.quiet_timeout)
        r = one_run(args, agent, conns, in_flight, rnd, tmp)
        r.noisy = args.max_others > 0 and r.others_cpu >= args.max_others
        line = (
            f"  round {rnd} {r.load:>5} {agent:<15} {r.msg_per_s:>10,.0f} msg/s  p50"
            f" {P.fmt(r.p50_us, '.0f')} p99 {P.fmt(r.p99_us, '.0f')} us  errors {r.errors}"
            f"  agent {r.agent_cpu:.2f} cores {P.fmt(r.agent_us_per_msg, '.2f')} us/msg"
            f"  others {r.others_cpu:.2f}" + ("  NOISY" if r.noisy else "")
        )
        again = r.noisy and attempt < args.noisy_retries
        print(line + (": again" if again else ""), file=log, flush=True)
        if not again:
            break
    return r


def summarize(args: argparse.Namespace, runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for conns, in_flight in args.loads:
        load = f"{conns}x{in_flight}"
        row: dict[str, Any] = {"load": load}
        per_round: dict[str, dict[int, float]] = {}
        for agent in args.agents:
            rs = [r for r in runs if r.load == load and r.agent == agent]
            per_round[agent] = {r.round: r.msg_per_s for r in rs}
            row[agent] = {
                "runs": len(rs),
                "noisy": sum(r.noisy for r in rs),
                "msg_per_s": P.median([r.msg_per_s for r in rs]),
                "msg_per_s_all": [r.msg_per_s for r in rs],
                "p50_us": P.median([r.p50_us for r in rs]),
                "p99_us": P.median([r.p99_us for r in rs]),
                "errors": sum(r.errors for r in rs),
                "no_pipelining": sum(r.no_pipelining for r in rs),
                "agent_cpu": P.median([r.agent_cpu for r in rs]),
                "agent_us_per_msg": P.median([r.agent_us_per_msg for r in rs]),
            }
        # each agent against the last one listed (the reference: the example, or the baseline)
        ref = args.agents[-1]
        for agent in args.agents[:-1]:
            row[agent]["ratio"] = P.ratio(row[agent]["msg_per_s"], row[ref]["msg_per_s"])
            paired = P.paired_ratio(per_round[agent], per_round[ref])
            row[agent]["ratio_paired"] = round(paired, 3) if paired is not None else None
        if len(args.agents) > 1:  # the first against the reference, as a row figure
            row["ratio"] = row[args.agents[0]]["ratio"]
            row["ratio_paired"] = row[args.agents[0]]["ratio_paired"]
        rows.append(row)
    return rows


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    head = f"{'load':>6}  {'agent':<15}{'msg/s':>10}{'p50 us':>8}{'p99 us':>8}{'errors':>7}"
    head += f"{'cores':>7}{'us/msg':>8}{'ratio':>7}{'paired':>7}  runs"
    print(head)
    print("-" * len(head))
    for row in rows:
        for i, agent in enumerate(args.agents):
            a = row[agent]
            ratio = P.fmt(a.get("ratio"), ".2f") if "ratio" in a else ""
            paired = P.fmt(a.get("ratio_paired"), ".2f") if "ratio_paired" in a else ""
            errors = a["errors"] + a["no_pipelining"]
            print(
                f"{row['load'] if i == 0 else '':>6}  {agent:<15}"
                f"{P.fmt(a['msg_per_s'], ',.0f'):>10}"
                f"{P.fmt(a['p50_us'], '.0f'):>8}{P.fmt(a['p99_us'], '.0f'):>8}{errors:>7}"
                f"{P.fmt(a['agent_cpu'], '.2f'):>7}{P.fmt(a['agent_us_per_msg'], '.2f'):>8}"
                f"{ratio:>7}{paired:>7}  {a['runs']}"
                + (f" ({a['noisy']} noisy)" if a["noisy"] else "")
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, log = R.start(argv, args.json)
    info = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": len(P.psutil.Process().cpu_affinity() or []),
        "spoa_mp": f"-n {args.workers}",
        "example": f"-n {args.example_threads} -c pipelining",
        "generator": f"spoa-mp bench -d {args.duration:g} --warmup {args.warmup:g}",
        "repeat": args.repeat,
    }
    print(
        f"{info['date']}: spoa-mp {info['spoa_mp']} vs spoa-example {info['example']},"
        f" {info['generator']}, loads {', '.join(f'{c}x{p}' for c, p in args.loads)},"
        f" {args.repeat} rounds, {info['cpus']} CPUs",
        file=log,
        flush=True,
    )
    runs: list[Run] = []

    def rounds(tmp: Path) -> None:
        for rnd in range(1, args.repeat + 1):
            for conns, in_flight in args.loads:
                runs.extend(
                    measure(args, agent, conns, in_flight, rnd, tmp, log) for agent in args.agents
                )

    if not R.run_rounds("bench-direct-", rounds):
        return 130
    rows = summarize(args, runs)
    R.report(
        args.json,
        info,
        rows,
        runs,
        lambda: print_table(args, rows),
        "msg/s, p50, p99: medians over the rounds; errors: generator errors + connections"
        " without pipelining; cores, us/msg: the agent's CPU (all its processes) during"
        " the generator run, per ACK (warm-up included); ratio: the agent's median over"
        " the last agent's (--agents order);"
        " paired: median of per-round ratios.",
    )
    bad = any(r.errors or r.no_pipelining for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

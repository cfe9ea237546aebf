"""`spoa-mp bench`: load an SPOP agent the way HAProxy does, and measure it.

The generator opens C connections to the agent, sends a HAPROXY-HELLO like
HAProxy 2.6 (versions "2.0", max-frame-size 16380, capabilities
"pipelining,async"), then keeps P NOTIFY `check-client-ip` frames in flight
on each connection (random IPv4, or IPv6 for --ipv6-percent of them),
checking that every ACK matches an outstanding (stream-id, frame-id) of its
connection. Latencies go into a log-linear histogram (0.4% buckets).

The hot loop is C (csrc/loadgen.c, in the cffi module): Python only starts
it, runs it in slices to print a live progress line, and formats the result.
Only 127.0.0.1, ::1 and unix sockets can be targeted, here and in C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NoReturn, TextIO

from spoa_mp._spop import ffi, lib

LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1", "[::1]": "::1"}
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))
PHASES = ("open", "warmup", "running", "draining", "closing", "done")
SID_STYLES = {"3x": lib.SPOP_LG_SIDS_3X, "2.6": lib.SPOP_LG_SIDS_26}
ERROR_KINDS = tuple(
    ffi.string(lib.spop_lg_error_name(k)).decode() for k in range(lib.SPOP_LG_ERR_KINDS)
)
_OPEN_ERRORS = {
    lib.SPOP_LG_E_ADDR: "only 127.0.0.1, ::1 or a unix socket may be targeted",
    lib.SPOP_LG_E_ARG: "a setting is out of range",
    lib.SPOP_LG_E_NOMEM: "out of memory",
    lib.SPOP_LG_E_CODEC: "could not encode the frames (a bug)",
    lib.SPOP_LG_E_STATE: "generator used out of order (a bug)",
}


class BenchError(Exception):
    """The generator could not run (bad settings, a local system error)."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    host: str = "127.0.0.1"
    port: int = 12345
    unix: str | None = None
    connections: int = 4
    in_flight: int = 1
    duration: float = 10.0  # seconds measured, after the warmup
    warmup: float = 1.0
    messages: int = 0  # stop after this many NOTIFYs in the window (0: duration only)
    ipv6_percent: int = 0
    sids: str = "3x"  # "3x": 1, 3, 5... per connection; "2.6": 0, 1, 2... over all
    drain: float = 1.0  # seconds to wait for outstanding ACKs at the end
    seed: int | None = None

    @property
    def target(self) -> str:
        if self.unix:
            return f"unix:{self.unix}"
        host = loopback_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Progress:
    """A live snapshot, handed to the progress callback about once a second."""

    elapsed: float
    phase: str
    acked: int
    rate: float  # msg/s since the previous snapshot
    errors: int


@dataclass(slots=True)
class BenchResult:
    target: str
    connections: int
    in_flight: int
    messages: int  # ACKs received in the measured window
    duration: float  # length of the measured window, seconds
    msg_per_s: float
    latency_us: dict[str, float]  # min, mean, p50, p90, p99, p99.9, max
    errors: int
    errors_by_kind: dict[str, int]
    sent: int
    acked: int
    connections_ready: int
    no_pipelining: int  # agents that did not offer pipelining: 1 in flight there
    max_frame_size: int  # negotiated (last handshake)
    last_status: int | None  # last AGENT-DISCONNECT status (or refused HELLO)
    last_message: str
    last_errno: str | None
    cpu_user: float
    cpu_sys: float
    wall: float
    cpu_percent: float  # generator's user+sys over wall time: % of one core
    interrupted: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # the settings, seed included
    histogram: list[tuple[int, int]] = field(default_factory=list)  # (ns, count), non-empty

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["histogram"]
        return data


def loopback_host(host: str) -> str:
    """The address for a host name the generator accepts; ValueError otherwise."""
    try:
        return LOOPBACK_HOSTS[host.strip().lower()]
    except KeyError:
        raise ValueError(
            f"refusing to target {host!r}: only 127.0.0.1, ::1 or --unix PATH"
        ) from None


def check_config(cfg: BenchConfig) -> None:
    """Raise ValueError (one line) for settings the generator refuses."""
    if not cfg.unix:
        loopback_host(cfg.host)
        if not 1 <= cfg.port <= 65535:
            raise ValueError("port must be in 1..65535")
    elif len(os.fsencode(cfg.unix)) >= 108:
        raise ValueError("unix socket path too long")
    if not 1 <= cfg.connections <= lib.SPOP_LG_MAX_CONNECTIONS:
        raise ValueError(f"connections must be in 1..{lib.SPOP_LG_MAX_CONNECTIONS}")
    if not 1 <= cfg.in_flight <= lib.SPOP_LG_MAX_IN_FLIGHT:
        raise ValueError(f"in-flight must be in 1..{lib.SPOP_LG_MAX_IN_FLIGHT}")
    if not 0 <= cfg.ipv6_percent <= 100:
        raise ValueError("ipv6-percent must be in 0..100")
    if not cfg.duration > 0 and not cfg.messages:
        raise ValueError("duration must be > 0 (or give --messages)")
    if cfg.duration < 0 or cfg.warmup < 0 or cfg.drain < 0 or cfg.messages < 0:
        raise ValueError("durations and counts cannot be negative")
    if cfg.seed is not None and not 0 <= cfg.seed < 1 << 64:
        raise ValueError("seed must be in 0..2**64-1")
    if cfg.sids not in SID_STYLES:
        raise ValueError(f"sids must be one of {', '.join(SID_STYLES)}")


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def run(
    cfg: BenchConfig,
    on_progress: Callable[[Progress], None] | None = None,
    interval: float = 1.0,
) -> BenchResult:
    """Run the generator to the end; Ctrl-C ends the window early (drain, report)."""
    check_config(cfg)
    if cfg.seed is None:
        cfg = replace(cfg, seed=int.from_bytes(os.urandom(8), "little"))
    keep: list[Any] = []  # C strings, alive until spop_lg_open has copied them
    c = ffi.new("spop_lg_config *")
    if cfg.unix:
        keep.append(ffi.new("char[]", os.fsencode(cfg.unix)))
        c.unix_path = keep[-1]
    else:
        keep.append(ffi.new("char[]", loopback_host(cfg.host).encode()))
        c.host = keep[-1]
        c.port = cfg.port
    c.connections = cfg.connections
    c.in_flight = cfg.in_flight
    c.ipv6_percent = cfg.ipv6_percent
    c.sid_style = SID_STYLES[cfg.sids]
    c.warmup_ns = _ns(cfg.warmup)
    c.duration_ns = _ns(cfg.duration)
    c.max_messages = cfg.messages
    c.drain_ns = max(1, _ns(cfg.drain))
    c.seed = cfg.seed or 0

    res = ffi.new("spop_lg_result *")
    mem = ffi.new("char[]", lib.spop_lg_state_size())
    st = ffi.cast("spop_lg_state *", mem)
    rc = lib.spop_lg_open(st, c, res)
    if rc < 0:
        raise BenchError(_OPEN_ERRORS.get(rc) or f"system error: {os.strerror(res.sys_errno)}")
    interrupted = False
    try:
        cpu0, t0 = os.times(), time.monotonic()
        next_report, last_t, last_acked = t0 + interval, t0, 0
        while True:
            try:
                if on_progress:
                    slice_s = min(interval, max(0.0, next_report - time.monotonic()))
                else:
                    slice_s = 0.5
                rc = lib.spop_lg_run(st, _ns(slice_s))
                if rc < 0:
                    reason = os.strerror(res.sys_errno) if rc == lib.SPOP_LG_E_SYS else ""
                    raise BenchError(_OPEN_ERRORS.get(rc) or f"system error: {reason}")
                now = time.monotonic()
                if on_progress and rc and now >= next_report:
                    acked = res.acked
                    rate = (acked - last_acked) / (now - last_t) if now > last_t else 0.0
                    on_progress(
                        Progress(now - t0, PHASES[res.phase], acked, rate, res.errors_total)
                    )
                    last_t, last_acked = now, acked
                    next_report = max(next_report + interval, now + interval / 4)
                if rc == 0:
                    break
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                lib.spop_lg_stop(st)
        cpu1, t1 = os.times(), time.monotonic()
    finally:
        lib.spop_lg_close(st)
    return _result(cfg, res, cpu1.user - cpu0.user, cpu1.system - cpu0.system, t1 - t0, interrupted)


def _result(
    cfg: BenchConfig, res: Any, user: float, sys_: float, wall: float, interrupted: bool
) -> BenchResult:
    latency: dict[str, float] = {}
    if res.lat_count:
        latency["min"] = res.lat_min_ns / 1e3
        latency["mean"] = res.lat_sum_ns / res.lat_count / 1e3
        for name, q in PERCENTILES:
            latency[name] = lib.spop_lg_percentile(res, q) / 1e3
        latency["max"] = res.lat_max_ns / 1e3
    duration = res.measured_ns / 1e9
    errors = {name: int(res.errors[k]) for k, name in enumerate(ERROR_KINDS)}
    hist = res.hist
    histogram = [
        (int(lib.spop_lg_hist_value(i)), int(hist[i]))
        for i in range(lib.SPOP_LG_HIST_BUCKETS)
        if hist[i]
    ]
    return BenchResult(
        target=cfg.target,
        connections=cfg.connections,
        in_flight=cfg.in_flight,
        messages=int(res.measured),
        duration=duration,
        msg_per_s=res.measured / duration if duration > 0 else 0.0,
        latency_us=latency,
        errors=int(res.errors_total),
        errors_by_kind=errors,
        sent=int(res.sent),
        acked=int(res.acked),
        connections_ready=int(res.connections_ready),
        no_pipelining=int(res.no_pipelining),
        max_frame_size=int(res.max_frame_size),
        last_status=None if res.last_status < 0 else int(res.last_status),
        last_message=ffi.string(res.last_message).decode("utf-8", "replace"),
        last_errno=os.strerror(res.sys_errno) if res.sys_errno else None,
        cpu_user=user,
        cpu_sys=sys_,
        wall=wall,
        cpu_percent=100.0 * (user + sys_) / wall if wall > 0 else 0.0,
        interrupted=interrupted,
        config=asdict(cfg),
        histogram=histogram,
    )


# ------------------------------------------------------------------ output


def format_progress(p: Progress) -> str:
    return (
        f"[{p.elapsed:6.1f}s] {p.phase:<8} {p.acked:>12,} msgs {p.rate:>10,.0f} msg/s "
        f"{p.errors:>6,} errors"
    )


def format_table(cfg: BenchConfig, r: BenchResult) -> str:
    warm = f" after {cfg.warmup:g} s warmup" if cfg.warmup else ""
    lines = [
        f"spoa-mp bench: {r.target}, {r.connections} connections x {r.in_flight} in flight, "
        f"IPv6 {cfg.ipv6_percent}%, sids {cfg.sids}{warm}"
        + (" (interrupted)" if r.interrupted else ""),
        f"  {'messages':<16}{r.messages:>14,}",
        f"  {'duration':<16}{r.duration:>14.2f} s",
        f"  {'throughput':<16}{r.msg_per_s:>14,.0f} msg/s",
    ]
    for name in ("p50", "p99", "p99.9", "max"):
        value = r.latency_us.get(name)
        shown = f"{value:>14,.1f} us" if value is not None else f"{'-':>14}"
        lines.append(f"  {'latency ' + name:<16}{shown}")
    kinds = ", ".join(f"{k} {v:,}" for k, v in r.errors_by_kind.items() if v)
    lines.append(f"  {'errors':<16}{r.errors:>14,}" + (f"  ({kinds})" if kinds else ""))
    if r.last_status is not None:
        lines.append(f"  {'last status':<16}{r.last_status:>14}  {r.last_message}".rstrip())
    if r.errors and r.last_errno:
        lines.append(f"  {'last errno':<16}{'':>14}  {r.last_errno}")
    if r.no_pipelining:
        lines.append(
            f"  {'no pipelining':<16}{r.no_pipelining:>14}  connections limited to 1 in flight"
        )
    lines.append(
        f"  {'generator CPU':<16}{r.cpu_percent:>13.1f}% of a core "
        f"(user {r.cpu_user:.2f} s + sys {r.cpu_sys:.2f} s over {r.wall:.2f} s)"
    )
    return "\n".join(lines)


class _ProgressLine:
    """One line rewritten in place on a terminal, one line a second otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def __call__(self, p: Progress) -> None:
        text = format_progress(p)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------ CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print usage and exit
        raise _UsageError(message)


def _parser() -> _Parser:
    p = _Parser(
        prog="spoa-mp bench",
        description="Load an SPOP agent as HAProxy does and report msg/s, latency and errors "
        "(127.0.0.1, ::1 or a unix socket only).",
    )
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), ::1 or localhost")
    p.add_argument("-p", "--port", type=int, default=12345, help="TCP port (default 12345)")
    p.add_argument("--unix", metavar="PATH", help="connect to a unix socket instead")
    p.add_argument("-c", "--connections", type=int, default=4, help="connections (default 4)")
    p.add_argument(
        "-P", "--in-flight", type=int, default=1, help="NOTIFYs in flight per connection (1)"
    )
    p.add_argument(
        "-d", "--duration", type=float, default=10.0, help="measured seconds (default 10)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    p.add_argument("-n", "--messages", type=int, default=0, help="stop after N messages measured")
    p.add_argument("--ipv6-percent", type=int, default=0, help="share of IPv6 client addresses (0)")
    p.add_argument(
        "--sids", choices=tuple(SID_STYLES), default="3x",
        help="stream ids: 3x = 1,3,5.. per connection (HAProxy 3.1+), 2.6 = 0,1,2.. shared",
    )  # fmt: skip
    p.add_argument(
        "--drain", type=float, default=1.0, help="seconds to wait for late ACKs (default 1)"
    )
    p.add_argument("--seed", type=int, help="random seed for the addresses")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str]) -> int:
    """`spoa-mp bench ...`: 0 no errors, 1 errors (or no answer), 2 bad arguments."""
    try:
        args = _parser().parse_args(argv)
        cfg = BenchConfig(
            host=args.host,
            port=args.port,
            unix=args.unix,
            connections=args.connections,
            in_flight=args.in_flight,
            duration=args.duration,
            warmup=args.warmup,
            messages=args.messages,
            ipv6_percent=args.ipv6_percent,
            sids=args.sids,
            drain=args.drain,
            seed=args.seed,
        )
        check_config(cfg)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (_UsageError, ValueError) as e:
        print(f"spoa-mp bench: error: {e}", file=sys.stderr)
        return 2

    progress = None if args.json or args.quiet else _ProgressLine(sys.stderr)
    try:
        result = run(cfg, progress)
    except BenchError as e:
        print(f"spoa-mp bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: no report
        return 130
    finally:
        if progress:
            progress.end()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_table(cfg, result))
    return 0 if result.errors == 0 and result.messages > 0 else 1


__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Progress",
    "check_config",
    "format_table",
    "loopback_host",
    "main",
    "run",
]

"""Prometheus metrics: worker counters summed in the supervisor, served over HTTP.

Workers count what they do and send the cumulative numbers (since that worker
started) in every heartbeat; the worker side of the handler-latency histogram
is :class:`LatencyHistogram`. The supervisor feeds each heartbeat to an
:class:`Aggregator`, which keeps the latest snapshot of every live worker plus
a running total of the workers that are gone, so an exported counter never goes
down across worker restarts, recycling and reloads. :class:`MetricsServer`
serves ``GET /metrics`` from the supervisor's own selector loop: no thread
(the supervisor forks), no blocking call, one request per connection.

The text is the Prometheus exposition format, version 0.0.4: a ``# HELP`` and a
``# TYPE`` line per family, then its samples; counters are named ``*_total``;
label values escape backslash, double quote and newline; a histogram has
cumulative ``_bucket{le="..."}`` samples ending with ``le="+Inf"`` (equal to
``_count``), then ``_sum`` and ``_count``.

The heartbeat ``counters`` object (every key optional, missing means 0)::

    {"messages": {"<message name>": n}, "handler_errors": {"<message name>": n},
     "latency": {"bounds": LATENCY_BOUNDS, "counts": [non-cumulative counts,
                 len(bounds) + 1, the last one for > bounds[-1]], "sum": seconds},
     "frames_in": {"<frame type>": n}, "frames_out": {"<frame type>": n},
     "disconnects": {"in": {"<status code>": n}, "out": {"<status code>": n}},
     "connections_total": n, "protocol_errors": n, "acks_cut": n,
     "handed_over": n, "adopted": n}

and the ``gauges`` object sent alongside::

    {"connections": n, "in_flight": n,
     "negotiated": {"max_frame_size": {"<size>": connections},
                    "capabilities": {"<comma list or empty>": connections}}}

Malformed data (wrong types, negative numbers, histogram bounds other than the
agreed ones) is ignored piece by piece: it never raises and never makes a
counter go down.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import re
import selectors
import socket
import time
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, pairwise, repeat
from operator import sub
from typing import Any

from spoa_mp import __version__

log = logging.getLogger(__name__)

PREFIX = "spoa_mp_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The agreed upper bounds (seconds) of the handler-latency buckets.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

MAX_LABELS = 1000  # distinct label values per family in one snapshot; more are dropped
MAX_LABEL_LENGTH = 200  # characters; longer label values are cut
MAX_TOMBSTONES = 4096  # retired worker ids remembered (late heartbeats are ignored)

# always exported, at 0 until seen, so that rate() has a starting point
KNOWN_FRAMES_IN = ("haproxy-disconnect", "haproxy-hello", "notify")
KNOWN_FRAMES_OUT = ("ack", "agent-disconnect", "agent-hello")

_LABELED_COUNTERS = ("messages", "handler_errors", "frames_in", "frames_out")
_SCALAR_COUNTERS = ("connections_total", "protocol_errors", "acks_cut", "handed_over", "adopted")
_DIRECTIONS = ("in", "out")

# A snapshot is kept flat: {key: number}, the key being ("messages", name),
# ("disconnects", direction, status), ("acks_cut",), ("latency", bucket index)
# or ("latency_sum",); that makes carrying keys forward, detecting a reset and
# folding into the retired total one loop each.
Key = tuple[str, ...]
Flat = dict[Key, Any]  # int, or float for latency_sum
# (suffix, ((label name, value), ...), sample value) for one family
Samples = list[tuple[str, tuple[tuple[str, str], ...], float]]


# --------------------------------------------------------------------------
# worker side


class LatencyHistogram:
    """Handler latency in a worker: ``observe()`` per message, ``snapshot()``
    per heartbeat. A value lands in the first bucket whose bound is >= it
    (Prometheus' ``le``); values above the last bound go to the overflow
    bucket. NaN, infinities and negative values are dropped (they would poison
    the sum for the rest of the worker's life)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        self.bounds: tuple[float, ...] = _check_bounds(bounds)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        if 0.0 <= seconds < math.inf:
            self.counts[bisect_left(self.bounds, seconds)] += 1
            self.sum += seconds

    def observe_stamps(self, stamps: Sequence[float]) -> None:
        """observe() each interval between consecutive clock readings (a
        batch of handlers timed back to back), with C-level loops."""
        if len(stamps) <= 2:  # one handler (an unpipelined read), or none
            if len(stamps) == 2:
                self.observe(stamps[1] - stamps[0])
            return
        durations = list(map(sub, islice(stamps, 1, None), stamps))
        total = stamps[-1] - stamps[0]
        if not (min(durations) >= 0.0 and total < math.inf):
            for d in durations:  # a clock step back (or NaN): observe() drops those
                self.observe(d)
            return
        counts = self.counts
        for bucket, n in Counter(map(bisect_left, repeat(self.bounds), durations)).items():
            counts[bucket] += n
        self.sum += total  # the intervals add up to the whole

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, Any]:
        """The ``latency`` entry of the heartbeat counters (JSON-ready)."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def _check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(b) for b in bounds)
    if not out:
        raise ValueError("histogram bounds must not be empty")
    if any(not math.isfinite(b) for b in out):
        raise ValueError("histogram bounds must be finite")
    if any(a >= b for a, b in pairwise(out)):
        raise ValueError("histogram bounds must be strictly increasing")
    return out


# --------------------------------------------------------------------------
# supervisor side: aggregation


def _count(value: object) -> int | None:
    """A counter or gauge value from JSON: a non-negative integer, else None."""
    if type(value) is int:  # not bool
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    return None


def _label(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    if len(value) > MAX_LABEL_LENGTH:
        value = value[:MAX_LABEL_LENGTH]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800"
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _labeled(flat: Flat, prefix: Key, mapping: object) -> None:
    if not isinstance(mapping, Mapping):
        return
    for i, (name, raw) in enumerate(mapping.items()):
        if i >= MAX_LABELS:
            break
        label, n = _label(name), _count(raw)
        if label is not None and n is not None:
            key = (*prefix, label)
            flat[key] = flat.get(key, 0) + n  # cut labels may collide


def _same_bounds(got: object, want: tuple[float, ...]) -> bool:
    if not isinstance(got, list | tuple) or len(got) != len(want):
        return False
    return all(type(g) in (int, float) and g == w for g, w in zip(got, want, strict=True))


class Aggregator:
    """Worker heartbeats in, Prometheus text out.

    ``worker_id`` must be unique per worker *process* (its pid, say): a new
    process under an id that is still live is detected (a counter went down)
    and handled as a restart, but an update for an id already retired is
    ignored, as a late heartbeat of a dead worker would otherwise be counted
    twice."""

    def __init__(
        self, *, version: str = __version__, bounds: Sequence[float] = LATENCY_BOUNDS
    ) -> None:
        self.version = version
        self.bounds = _check_bounds(bounds)
        self._retired: Flat = {}
        self._live: dict[str, Flat] = {}
        self._gauges: dict[str, Flat] = {}
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._supervisor = {
            "workers_alive": 0, "worker_restarts": 0, "reloads": 0, "reloads_failed": 0,
            "generation": 0,
        }  # fmt: skip
        self.ignored = 0  # snapshots, or parts of them, that were malformed

    # -- input

    def update(self, worker_id: str, counters: object, gauges: object = None) -> bool:
        """Take a worker's latest heartbeat. Returns False if it was ignored
        as a whole (retired worker); malformed parts are skipped, the rest is
        taken. Never raises."""
        try:
            wid = str(worker_id)
            if wid in self._gone:
                self.ignored += 1
                return False
            new = self._flatten_counters(counters)
            prev = self._live.get(wid)
            if prev is None:
                self._live[wid] = new
            elif any(v < prev.get(k, 0) for k, v in new.items()):
                # a counter went down: a new process under an old id
                log.debug("metrics: worker %s restarted its counters", wid)
                self._fold(prev)
                self._live[wid] = new
            else:
                prev.update(new)  # counters it did not send keep their last value
            if gauges is not None:
                if isinstance(gauges, Mapping):
                    self._gauges[wid] = self._flatten_gauges(gauges)
                else:
                    self.ignored += 1
        except Exception:  # pragma: no cover - defensive: never break the supervisor
            log.exception("metrics: could not take a heartbeat of worker %s", worker_id)
            return False
        return True

    def retire(self, worker_id: str) -> None:
        """The worker is gone: keep its last counters in the running total
        of retired workers, drop its gauges, ignore later updates for it."""
        wid = str(worker_id)
        last = self._live.pop(wid, None)
        if last is not None:
            self._fold(last)
        self._gauges.pop(wid, None)
        self._gone[wid] = None
        while len(self._gone) > MAX_TOMBSTONES:
            self._gone.popitem(last=False)

    def set_supervisor(
        self,
        workers_alive: int,
        worker_restarts: int,
        reloads: int,
        reloads_failed: int,
        generation: int,
    ) -> None:
        values = {
            "workers_alive": workers_alive, "worker_restarts": worker_restarts,
            "reloads": reloads, "reloads_failed": reloads_failed, "generation": generation,
        }  # fmt: skip
        for name, value in values.items():
            n = _count(value)
            if n is not None:
                self._supervisor[name] = n

    def _fold(self, flat: Flat) -> None:
        retired = self._retired
        for k, v in flat.items():
            retired[k] = retired.get(k, 0) + v

    def _flatten_counters(self, counters: object) -> Flat:
        flat: Flat = {}
        if not isinstance(counters, Mapping):
            self.ignored += 1
            return flat
        for name in _LABELED_COUNTERS:
            _labeled(flat, (name,), counters.get(name))
        disconnects = counters.get("disconnects")
        if isinstance(disconnects, Mapping):
            for direction in _DIRECTIONS:
                _labeled(flat, ("disconnects", direction), disconnects.get(direction))
        for name in _SCALAR_COUNTERS:
            n = _count(counters.get(name))
            if n is not None:
                flat[(name,)] = n
        latency = counters.get("latency")
        if latency is not None and not self._flatten_latency(flat, latency):
            self.ignored += 1
        return flat

    def _flatten_latency(self, flat: Flat, latency: object) -> bool:
        """All or nothing: a partial histogram would not add up."""
        if not isinstance(latency, Mapping) or not _same_bounds(latency.get("bounds"), self.bounds):
            return False
        counts, total = latency.get("counts"), latency.get("sum")
        if not isinstance(counts, list | tuple) or len(counts) != len(self.bounds) + 1:
            return False
        ns = [_count(c) for c in counts]
        if any(n is None for n in ns):
            return False
        if type(total) not in (int, float) or not 0 <= total < math.inf:
            return False
        for i, n in enumerate(ns):
            flat[("latency", str(i))] = n
        flat[("latency_sum",)] = float(total)
        return True

    def _flatten_gauges(self, gauges: Mapping[str, Any]) -> Flat:
        flat: Flat = {}
        for name in ("connections", "in_flight"):
            n = _count(gauges.get(name))
            if n is not None:
                flat[(name,)] = n
        negotiated = gauges.get("negotiated")
        if isinstance(negotiated, Mapping):
            for name in ("max_frame_size", "capabilities"):
                _labeled(flat, (name,), negotiated.get(name))
        return flat

    # -- output

    def totals(self) -> Flat:
        """Every counter: retired workers plus the latest of live ones."""
        out = dict(self._retired)
        for flat in self._live.values():
            for k, v in flat.items():
                out[k] = out.get(k, 0) + v
        return out

    def gauge_totals(self) -> Flat:
        out: Flat = {}
        for flat in self._gauges.values():
            for k, v in flat.items():
                out[k] = out.get(k, 0) + v
        return out

    def total(self, name: str) -> int:
        """One counter summed over its labels, e.g. ``total("messages")``."""
        return sum(v for k, v in self.totals().items() if k[0] == name)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        c, g, sup = self.totals(), self.gauge_totals(), self._supervisor
        out: list[str] = []

        def labeled(flat: Flat, name: str, label: str, known: Iterable[str] = ()) -> Samples:
            values = dict.fromkeys(known, 0)
            values.update({k[1]: v for k, v in flat.items() if k[0] == name and len(k) == 2})
            return [("", ((label, v),), n) for v, n in sorted(values.items())]

        _family(out, "messages_total", "counter",
                "SPOE messages handled, by message name.",
                labeled(c, "messages", "message"))  # fmt: skip
        _family(out, "handler_errors_total", "counter",
                "Handler calls that raised, by message name.",
                labeled(c, "handler_errors", "message"))  # fmt: skip
        _family(out, "handler_latency_seconds", "histogram",
                "Time spent in message handlers, in seconds.",
                self._histogram(c))  # fmt: skip
        _family(out, "frames_in_total", "counter",
                "SPOP frames received from HAProxy, by frame type.",
                labeled(c, "frames_in", "type", KNOWN_FRAMES_IN))  # fmt: skip
        _family(out, "frames_out_total", "counter",
                "SPOP frames sent to HAProxy, by frame type.",
                labeled(c, "frames_out", "type", KNOWN_FRAMES_OUT))  # fmt: skip
        disconnects = [
            ("", (("direction", k[1]), ("status", k[2])), n)
            for k, n in sorted(c.items())
            if k[0] == "disconnects"
        ]
        _family(out, "disconnects_total", "counter",
                "DISCONNECT frames by direction (in: from HAProxy, out: sent by the agent) "
                "and status code.", disconnects)  # fmt: skip
        for name, key, text in (
            ("connections_accepted_total", "connections_total",
             "Connections accepted from HAProxy."),
            ("protocol_errors_total", "protocol_errors",
             "Connections closed for a protocol error."),
            ("acks_cut_total", "acks_cut",
             "ACKs whose actions were cut to fit the negotiated max-frame-size."),
            ("connections_handed_over_total", "handed_over",
             "Connections passed on to another worker on reload or recycling."),
            ("connections_adopted_total", "adopted",
             "Connections taken over from another worker on reload or recycling."),
        ):  # fmt: skip
            _family(out, name, "counter", text, [("", (), c.get((key,), 0))])
        _family(out, "connections_open", "gauge",
                "Connections from HAProxy open now, in live workers.",
                [("", (), g.get(("connections",), 0))])  # fmt: skip
        _family(out, "messages_in_flight", "gauge",
                "Messages handed to coroutine handlers and not answered yet.",
                [("", (), g.get(("in_flight",), 0))])  # fmt: skip
        _family(out, "negotiated_max_frame_size_connections", "gauge",
                "Open connections by negotiated max-frame-size.",
                labeled(g, "max_frame_size", "size"))  # fmt: skip
        _family(out, "negotiated_capabilities_connections", "gauge",
                "Open connections by negotiated capabilities.",
                labeled(g, "capabilities", "capabilities"))  # fmt: skip
        _family(out, "workers_alive", "gauge", "Worker processes alive.",
                [("", (), sup["workers_alive"])])  # fmt: skip
        _family(out, "worker_restarts_total", "counter",
                "Workers replaced: one died, hung, or was recycled (--max-requests, --max-rss).",
                [("", (), sup["worker_restarts"])])  # fmt: skip
        _family(out, "reloads_total", "counter",
                "Reloads (SIGHUP) completed: a new generation serves.",
                [("", (), sup["reloads"])])  # fmt: skip
        _family(out, "reloads_failed_total", "counter",
                "Reloads that failed and were rolled back.",
                [("", (), sup["reloads_failed"])])  # fmt: skip
        _family(out, "generation", "gauge", "Current worker generation (bumped by each reload).",
                [("", (), sup["generation"])])  # fmt: skip
        _family(out, "build_info", "gauge", "Always 1; the labels tell the spoa-mp version.",
                [("", (("version", _label(self.version) or ""),), 1)])  # fmt: skip
        return "\n".join(out) + "\n"

    def _histogram(self, c: Flat) -> Samples:
        samples: Samples = []
        cumulative = 0
        for i, bound in enumerate((*self.bounds, math.inf)):
            cumulative += c.get(("latency", str(i)), 0)
            samples.append(("_bucket", (("le", _value(bound)),), cumulative))
        samples.append(("_sum", (), c.get(("latency_sum",), 0.0)))
        samples.append(("_count", (), cumulative))
        return samples


def _family(out: list[str], name: str, kind: str, text: str, samples: Samples) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {escape_help(text)}")
    out.append(f"# TYPE {full} {kind}")
    for suffix, labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            out.append(f"{full}{suffix}{{{inner}}} {_value(value)}")
        else:
            out.append(f"{full}{suffix} {_value(value)}")


def escape_label(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (double quotes are literal there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if type(v) is int:
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


# --------------------------------------------------------------------------
# HTTP

MAX_REQUEST = 8192  # bytes of request line + headers
TIMEOUT = 5.0  # seconds a connection may live, from accept to close
MAX_CONNECTIONS = 32  # beyond this, new connections are closed at once
DRAIN_LIMIT = 65536  # bytes read and dropped after the response, waiting for the client's FIN
ACCEPT_BATCH = 16  # accepts per handle() call: the supervisor has other work
EMFILE_PAUSE = 1.0  # seconds to stop accepting when out of descriptors

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}  # fmt: skip
_VERSION = re.compile(rb"HTTP/1\.[01]")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_INDEX = (
    b"<html><head><title>spoa-mp</title></head><body><h1>spoa-mp</h1>"
    b'<p><a href="/metrics">Metrics</a></p></body></html>\n'
)

READING, WRITING, DRAINING = "reading", "writing", "draining"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for --metrics: an IPv4 address or a host name,
    ``[IPv6]:PORT``, or ``:PORT`` for every IPv4 interface; port 0 picks a
    free one. Raises ValueError with a one-line message."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9100 or [::1]:9100")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' after the IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, e.g. [::1]:9100, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9100, got {text!r}")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, e.g. [::1]:9100, got {text!r}")
        if host in ("", "*"):
            host = "0.0.0.0"
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False, slots=True)
class _Client:
    sock: socket.socket
    fd: int
    deadline: float
    state: str = READING
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    sent: int = 0
    drained: int = 0


class MetricsServer:
    """A minimal HTTP/1.0 and 1.1 server for Prometheus, driven by the
    caller's selector: the listening socket and every connection are
    registered with ``data=self``, and the caller's loop calls
    ``handle(key)`` for them and ``expire()`` now and then (every loop
    iteration is fine). ``GET /metrics`` answers ``render()``; every response
    closes its connection. Nothing here blocks or raises into the loop.

    After a fork, the child must call :meth:`close_in_child` (not
    :meth:`close`): the child shares the parent's epoll instance, and
    unregistering there would unregister in the parent too."""

    def __init__(
        self,
        address: str,
        render: Callable[[], str],
        *,
        timeout: float = TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address = address
        self.render = render
        self.timeout = timeout
        self.max_request = max_request
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._listening = False  # registered for accepts
        self._paused_until = 0.0
        self._clients: dict[int, _Client] = {}
        self.requests = 0  # responses started (any status)

    # -- set-up and tear-down

    def listen(self) -> str:
        """Bind and listen (SO_REUSEADDR); return the bound ``HOST:PORT``.
        Raises ValueError for a bad address, OSError if it cannot bind."""
        host, port = parse_address(self.address)
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, _, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        bound = sock.getsockname()
        return format_address(bound[0], bound[1])

    def register(self, selector: selectors.BaseSelector) -> None:
        if self._sock is None:
            raise RuntimeError("MetricsServer.register() before listen()")
        self._selector = selector
        selector.register(self._sock, selectors.EVENT_READ, self)
        self._listening = True

    @property
    def sockname(self) -> tuple[Any, ...] | None:
        return self._sock.getsockname() if self._sock is not None else None

    @property
    def connections(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Close the listener and every connection (idempotent)."""
        for c in list(self._clients.values()):
            self._close(c)
        if self._sock is not None:
            if self._listening:
                self._unregister(self._sock)
            self._sock.close()
            self._sock = None
        self._listening = False

    def close_in_child(self) -> None:
        """In a forked child: close our descriptors, leave the selector alone."""
        for c in self._clients.values():
            c.sock.close()
        self._clients.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._listening = False
        self._selector = None

    def expire(self, now: float | None = None) -> int:
        """Close connections past their deadline (``time.monotonic()``
        clock); resume accepting after a pause for EMFILE. Returns how many
        were closed."""
        try:
            now = time.monotonic() if now is None else now
            stale = [c for c in self._clients.values() if c.deadline <= now]
            for c in stale:
                log.debug("metrics: closing connection %d after %.1f s", c.fd, self.timeout)
                self._close(c)
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
                if self._sock is not None and self._selector is not None and not self._listening:
                    self._selector.register(self._sock, selectors.EVENT_READ, self)
                    self._listening = True
            return len(stale)
        except Exception:  # pragma: no cover - defensive
            log.exception("metrics: expire failed")
            return 0

    # -- events

    def handle(self, key: selectors.SelectorKey) -> None:
        """Whatever the socket of ``key`` is ready for; never raises. (The
        state of the connection says whether to read or write; a spurious
        call does nothing.)"""
        client = None
        try:
            if self._sock is not None and key.fileobj is self._sock:
                self._accept()
                return
            client = self._clients.get(key.fd)
            if client is None or client.sock is not key.fileobj:
                self._unregister(key.fileobj)  # stale: should not happen
                return
            if client.state == WRITING:
                self._write(client)
            else:
                self._read(client)
        except Exception:
            log.exception("metrics: unexpected error")
            if client is not None:
                self._close(client)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the listener stays readable: stop polling it for a while
                    log.warning("metrics: cannot accept: %s; pausing %.0f s", e, EMFILE_PAUSE)
                    self._pause()
                    return
                continue  # ECONNABORTED and friends: that one is gone
            if len(self._clients) >= self.max_connections:
                log.debug("metrics: over %d connections, closing a new one", self.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock, sock.fileno(), time.monotonic() + self.timeout)
            self._clients[c.fd] = c
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, self)

    def _pause(self) -> None:
        self._paused_until = time.monotonic() + EMFILE_PAUSE
        if self._listening and self._sock is not None:
            self._unregister(self._sock)
            self._listening = False

    def _read(self, c: _Client) -> None:
        while True:
            try:
                data = c.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
            if not data:  # the client closed (or finished after our response)
                self._close(c)
                return
            if c.state == DRAINING:
                c.drained += len(data)
                if c.drained > DRAIN_LIMIT:
                    self._close(c)
                    return
                continue
            c.inbuf += data
            if c.inbuf[:1] in (b"\r", b"\n"):  # RFC 9112 2.2: ignore CRLFs before a request
                del c.inbuf[: len(c.inbuf) - len(c.inbuf.lstrip(b"\r\n"))]
            end = _header_end(c.inbuf)
            if end > self.max_request or (end < 0 and len(c.inbuf) > self.max_request):
                self._respond(c, 431, b"request too large\n")
                return
            if end >= 0:
                self._answer(c, bytes(c.inbuf[:end]))
                return

    def _answer(self, c: _Client, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            self._respond(c, 400, b"bad request line\n")
            return
        method, target, version = parts
        if not _VERSION.fullmatch(version):
            if version.startswith(b"HTTP/"):
                self._respond(c, 505, b"HTTP/1.0 or HTTP/1.1 only\n")
            else:
                self._respond(c, 400, b"bad request line\n")
            return
        path = target.split(b"?", 1)[0].split(b"#", 1)[0]
        if path.startswith((b"http://", b"https://")):  # absolute form
            slash = path.find(b"/", path.find(b"//") + 2)
            path = path[slash:] if slash >= 0 else b"/"
        if path not in (b"/metrics", b"/"):
            self._respond(c, 404, b"not found: try /metrics\n")
            return
        if method not in (b"GET", b"HEAD"):
            self._respond(c, 405, b"method not allowed\n", extra=(("Allow", "GET, HEAD"),))
            return
        head_only = method == b"HEAD"
        if path == b"/":
            self._respond(c, 200, _INDEX, "text/html; charset=utf-8", head_only=head_only)
            return
        try:
            body = self.render().encode("utf-8")
        except Exception:
            log.exception("metrics: render failed")
            self._respond(c, 500, b"could not render metrics\n")
            return
        self._respond(c, 200, body, CONTENT_TYPE, head_only=head_only)

    def _respond(
        self,
        c: _Client,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        extra: Iterable[tuple[str, str]] = (),
        head_only: bool = False,
    ) -> None:
        self.requests += 1
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra),
        ]
        c.out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        c.sent = 0
        c.inbuf.clear()
        c.state = WRITING
        assert self._selector is not None
        self._selector.modify(c.sock, selectors.EVENT_WRITE, self)
        self._write(c)

    def _write(self, c: _Client) -> None:
        view = memoryview(c.out)
        while c.sent < len(view):
            try:
                c.sent += c.sock.send(view[c.sent :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(c)
                return
        # all sent: half-close, then read until the client closes, so that
        # bytes it sent after its request cannot turn our close into a RST
        # that destroys the response before it reads it
        c.out = b""
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)
            return
        c.state = DRAINING
        assert self._selector is not None
        self._selector.modify(c.sock, selectors.EVENT_READ, self)
        self._read(c)

    def _close(self, c: _Client) -> None:
        if self._clients.pop(c.fd, None) is None:
            return
        self._unregister(c.sock)
        c.sock.close()

    def _unregister(self, fileobj: Any) -> None:
        if self._selector is not None:
            with contextlib.suppress(Exception):  # e.g. the selector was closed first
                self._selector.unregister(fileobj)


def _header_end(buf: bytearray) -> int:
    """Index just past the blank line that ends the headers, or -1."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else -1

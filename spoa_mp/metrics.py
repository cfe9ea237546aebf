"""Metrics, aggregation side: worker counters summed in the supervisor.

Workers count what they do and send the cumulative numbers (since that worker
started) in every heartbeat; the worker side of the handler-latency histogram
is :class:`LatencyHistogram`. The supervisor feeds each heartbeat to an
:class:`Aggregator`, which keeps the latest snapshot of every live worker plus
a running total of the workers that are gone, so an exported counter never goes
down across worker restarts, recycling and reloads. (Summing in one process
beats one file per process: nothing on disk, one scrape reads everything.)
The exposition is in :mod:`spoa_mp.metrics_prometheus`, the HTTP serving in
:mod:`spoa_mp.metrics_http`.

Which heartbeat keys become which metric families is the tables below
(:data:`LABELED_COUNTERS`, :data:`SCALAR_COUNTERS`, :data:`GAUGES`): adding a
counter the workers send is one line there.

The heartbeat ``counters`` object (every key optional, missing means 0)::

    {"messages": {"<message name>": n}, "handler_errors": {"<message name>": n},
     "handler_timeouts": {"<message name>": n}, "backpressure": n,
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

import logging
import math
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from itertools import islice, pairwise, repeat
from operator import sub
from typing import Any, NamedTuple

from spoa_mp import __version__

log = logging.getLogger(__name__)

PREFIX = "spoa_mp_"

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


class Family(NamedTuple):
    """A metric family fed by one heartbeat key."""

    key: str  # in the heartbeat's counters (or gauges)
    name: str  # exported as spoa_mp_<name>, plus _total for counters
    help: str
    label: str = ""  # the label of a {"<label value>": n} key
    known: tuple[str, ...] = ()  # label values exported at 0 until seen


# fmt: off
LABELED_COUNTERS: tuple[Family, ...] = (
    Family("messages", "messages", "SPOE messages handled, by message name.", "message"),
    Family("handler_errors", "handler_errors", "Handler calls that raised, by message name.",
           "message"),
    Family("handler_timeouts", "handler_timeouts",
           "Handler calls that ran past their timeout, by message name.", "message"),
    Family("frames_in", "frames_in", "SPOP frames received from HAProxy, by frame type.",
           "type", KNOWN_FRAMES_IN),
    Family("frames_out", "frames_out", "SPOP frames sent to HAProxy, by frame type.",
           "type", KNOWN_FRAMES_OUT),
)
SCALAR_COUNTERS: tuple[Family, ...] = (
    Family("connections_total", "connections_accepted", "Connections accepted from HAProxy."),
    Family("connections_refused", "connections_refused",
           "Connections closed at accept: the worker had --max-connections open."),
    Family("hello_timeouts", "hello_timeouts",
           "Connections closed for sending no HELLO within --hello-timeout."),
    Family("tls_handshake_failures", "tls_handshake_failures",
           "Connections closed whose TLS handshake failed or missed --hello-timeout."),
    Family("connections_not_allowed", "connections_not_allowed",
           "Connections closed at accept: the peer is outside every --allow network."),
    Family("protocol_errors", "protocol_errors", "Connections closed for a protocol error."),
    Family("acks_cut", "acks_cut",
           "ACKs whose actions were cut to fit the negotiated max-frame-size."),
    Family("handed_over", "connections_handed_over",
           "Connections passed on to another worker on reload or recycling."),
    Family("adopted", "connections_adopted",
           "Connections taken over from another worker on reload or recycling."),
    Family("backpressure", "backpressure",
           "Times a worker stopped reading at its in-flight cap."),
)
GAUGES: tuple[Family, ...] = (
    Family("connections", "connections_open",
           "Connections from HAProxy open now, in live workers."),
    Family("in_flight", "messages_in_flight",
           "Messages handed to coroutine handlers and not answered yet."),
)
NEGOTIATED: tuple[Family, ...] = (
    Family("max_frame_size", "negotiated_max_frame_size_connections",
           "Open connections by negotiated max-frame-size.", "size"),
    Family("capabilities", "negotiated_capabilities_connections",
           "Open connections by negotiated capabilities.", "capabilities"),
)
# fmt: on
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


def label_value(value: object) -> str | None:
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
        label, n = label_value(name), _count(raw)
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
        self._slot: dict[str, str] = {}  # worker id -> its slot index, as a label
        self._supervisor = {
            "workers_alive": 0, "worker_restarts": 0, "reloads": 0, "reloads_failed": 0,
            "generation": 0,
        }  # fmt: skip
        self.ignored = 0  # snapshots, or parts of them, that were malformed

    # -- input

    def update(
        self, worker_id: str, counters: object, gauges: object = None, slot: int | None = None
    ) -> bool:
        """Take a worker's latest heartbeat. Returns False if it was ignored
        as a whole (retired worker); malformed parts are skipped, the rest is
        taken. Never raises. `slot` is the worker's index (1..N), for the
        per-worker series; a worker replaced in its slot adds to it."""
        try:
            wid = str(worker_id)
            if slot is not None and type(slot) is int:
                self._slot[wid] = str(slot)
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
                self._fold(prev, wid)
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
            self._fold(last, wid)
        self._gauges.pop(wid, None)
        self._slot.pop(wid, None)
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

    def _fold(self, flat: Flat, wid: str) -> None:
        retired = self._retired
        for k, v in flat.items():
            retired[k] = retired.get(k, 0) + v
        slot = self._slot.get(wid)
        if slot is not None:
            key = ("worker_messages", slot)
            retired[key] = retired.get(key, 0) + _messages(flat)

    def _flatten_counters(self, counters: object) -> Flat:
        flat: Flat = {}
        if not isinstance(counters, Mapping):
            self.ignored += 1
            return flat
        for f in LABELED_COUNTERS:
            _labeled(flat, (f.key,), counters.get(f.key))
        disconnects = counters.get("disconnects")
        if isinstance(disconnects, Mapping):
            for direction in _DIRECTIONS:
                _labeled(flat, ("disconnects", direction), disconnects.get(direction))
        for f in SCALAR_COUNTERS:
            n = _count(counters.get(f.key))
            if n is not None:
                flat[(f.key,)] = n
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
        ns = [n for n in map(_count, counts) if n is not None]
        if len(ns) != len(counts):
            return False
        if not (type(total) is int or type(total) is float) or not 0 <= total < math.inf:
            return False
        for i, n in enumerate(ns):
            flat[("latency", str(i))] = n
        flat[("latency_sum",)] = float(total)
        return True

    def _flatten_gauges(self, gauges: Mapping[str, Any]) -> Flat:
        flat: Flat = {}
        for f in GAUGES:
            n = _count(gauges.get(f.key))
            if n is not None:
                flat[(f.key,)] = n
        negotiated = gauges.get("negotiated")
        if isinstance(negotiated, Mapping):
            for f in NEGOTIATED:
                _labeled(flat, (f.key,), negotiated.get(f.key))
        return flat

    # -- output

    def totals(self) -> Flat:
        """Every counter: retired workers plus the latest of live ones; the
        per-worker messages under ("worker_messages", slot)."""
        out = dict(self._retired)
        for wid, flat in self._live.items():
            for k, v in flat.items():
                out[k] = out.get(k, 0) + v
            slot = self._slot.get(wid)
            if slot is not None:
                key = ("worker_messages", slot)
                out[key] = out.get(key, 0) + _messages(flat)
        return out

    def gauge_totals(self) -> Flat:
        out: Flat = {}
        for flat in self._gauges.values():
            for k, v in flat.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def supervisor(self) -> dict[str, int]:
        return dict(self._supervisor)

    def total(self, name: str) -> int:
        """One counter summed over its labels, e.g. ``total("messages")``."""
        return sum(v for k, v in self.totals().items() if k[0] == name)


def _messages(flat: Flat) -> int:
    return sum(v for k, v in flat.items() if k[0] == "messages")

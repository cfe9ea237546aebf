"""Metrics, exposition side: an Aggregator's counters in Prometheus's formats.

:class:`AggregatorCollector` is a ``prometheus_client`` custom collector that
turns the aggregated counters (:mod:`spoa_mp.metrics`) into metric families
at each scrape; :func:`exposition` encodes them in the format the scraper's
``Accept`` header asks for (the Prometheus text format, or OpenMetrics), with
``prometheus_client``'s own encoders. Serving them over HTTP is
:mod:`spoa_mp.metrics_http`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from spoa_mp.metrics import (
    GAUGES,
    LABELED_COUNTERS,
    NEGOTIATED,
    PREFIX,
    SCALAR_COUNTERS,
    Aggregator,
    Flat,
    label_value,
)

__all__ = ["AggregatorCollector", "exposition", "registry_for"]

# the supervisor's own numbers: (key, name, kind, help)
_SUPERVISOR = (
    ("workers_alive", "workers_alive", "gauge", "Worker processes alive."),
    ("worker_restarts", "worker_restarts", "counter",
     "Workers replaced: one died, hung, or was recycled (--max-requests, --max-rss)."),
    ("reloads", "reloads", "counter", "Reloads (SIGHUP or a changed blocklist) completed."),
    ("reloads_failed", "reloads_failed", "counter", "Reloads that failed and were rolled back."),
    ("generation", "generation", "gauge", "Current worker generation (bumped by each reload)."),
)  # fmt: skip


def _by_label(flat: Flat, key: str, known: Iterable[str] = ()) -> list[tuple[str, float]]:
    values = dict.fromkeys(known, 0)
    values.update({k[1]: v for k, v in flat.items() if k[0] == key and len(k) == 2})
    return sorted(values.items())


class AggregatorCollector(Collector):
    """The aggregated counters as metric families, computed at each scrape."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        agg = self.aggregator
        c, g, sup = agg.totals(), agg.gauge_totals(), agg.supervisor
        for f in LABELED_COUNTERS:
            fam = CounterMetricFamily(PREFIX + f.name, f.help, labels=[f.label])
            for value, n in _by_label(c, f.key, f.known):
                fam.add_metric([value], n)
            yield fam
        workers = CounterMetricFamily(
            PREFIX + "worker_messages",
            "SPOE messages handled, by worker slot (how work spreads over workers).",
            labels=["worker"],
        )
        for slot, n in sorted(_by_label(c, "worker_messages"), key=lambda x: int(x[0])):
            workers.add_metric([slot], n)
        yield workers
        yield self._histogram(c)
        disconnects = CounterMetricFamily(
            PREFIX + "disconnects",
            "DISCONNECT frames by direction (in: from HAProxy, out: sent by the agent) "
            "and status code.",
            labels=["direction", "status"],
        )
        for k, n in sorted(c.items()):
            if k[0] == "disconnects":
                disconnects.add_metric([k[1], k[2]], n)
        yield disconnects
        for f in SCALAR_COUNTERS:
            yield CounterMetricFamily(PREFIX + f.name, f.help, value=c.get((f.key,), 0))
        for f in GAUGES:
            yield GaugeMetricFamily(PREFIX + f.name, f.help, value=g.get((f.key,), 0))
        for f in NEGOTIATED:
            negotiated = GaugeMetricFamily(PREFIX + f.name, f.help, labels=[f.label])
            for value, n in _by_label(g, f.key):
                negotiated.add_metric([value], n)
            yield negotiated
        for key, name, kind, text in _SUPERVISOR:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(PREFIX + name, text, value=sup[key])
        info = GaugeMetricFamily(
            PREFIX + "build_info", "Always 1; the labels tell the spoa-mp version.",
            labels=["version"],
        )  # fmt: skip
        info.add_metric([label_value(agg.version) or ""], 1)
        yield info

    def _histogram(self, c: Flat) -> HistogramMetricFamily:
        buckets = []
        cumulative = 0
        bounds = self.aggregator.bounds
        for i, bound in enumerate((*bounds, math.inf)):
            cumulative += c.get(("latency", str(i)), 0)
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        return HistogramMetricFamily(
            PREFIX + "handler_latency_seconds",
            "Time spent in message handlers, in seconds.",
            buckets=buckets,
            sum_value=c.get(("latency_sum",), 0.0),
        )


def registry_for(aggregator: Aggregator) -> CollectorRegistry:
    """A registry of its own (not the library's global one, whose process
    collectors would describe the supervisor alone)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(aggregator))
    return registry


def exposition(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) for a scrape: OpenMetrics when `accept` asks for
    it, the Prometheus text format otherwise."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type

"""spoa_mp.metrics: the Prometheus text format, aggregation of worker heartbeats
in the supervisor, the worker-side latency histogram, and the HTTP server.

The rendered text is checked by a small parser of the exposition format
(version 0.0.4) written here: HELP then TYPE once per family, every sample
belongs to the family declared before it, label values unescape, counters end
in _total, histograms are cumulative and end with le="+Inf" == _count.

The HTTP tests run the server in a real selector loop in the test process (as
the supervisor does) and talk to it over 127.0.0.1 with plain sockets; every
wait is a select() with a timeout in a loop bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from spoa_mp import __version__, metrics, metrics_http
from spoa_mp.metrics import LATENCY_BOUNDS, Aggregator, LatencyHistogram
from spoa_mp.metrics_http import MetricsServer, parse_address
from spoa_mp.metrics_prometheus import exposition, registry_for


def render(agg: Aggregator) -> str:
    """The Prometheus text exposition of an aggregator, as a scrape gets it."""
    body, content_type = exposition(registry_for(agg))
    assert content_type.startswith("text/plain; version=")
    return body.decode("utf-8")


# --------------------------------------------------------------------------
# a parser of the text exposition format 0.0.4

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    help: str
    type: str = ""
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def value(self, name: str | None = None, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        found = [
            v for n, ls, v in self.samples if n == (name or self.name) and tuple(sorted(ls)) == want
        ]
        assert len(found) == 1, (name, labels, self.samples)
        return found[0]

    def by_label(self, label: str) -> dict[str, float]:
        return {dict(ls)[label]: v for _, ls, v in self.samples}


def _unescape(text: str, allowed: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1]
            assert nxt in allowed, f"bad escape \\{nxt} in {text!r}"
            out.append(allowed[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(text: str, i: int) -> tuple[Labels, int]:
    """Labels from the '{' at text[i]; returns them and the index after '}'."""
    assert text[i] == "{"
    i += 1
    labels: list[tuple[str, str]] = []
    while text[i] != "}":
        m = _LABEL_NAME.match(text, i)
        assert m, f"bad label name at {i} in {text!r}"
        name, i = m.group(), m.end()
        assert text[i : i + 2] == '="', text
        i += 2
        raw: list[str] = []
        while text[i] != '"':
            if text[i] == "\\":
                assert text[i + 1] in '\\"n', f"bad escape in {text!r}"
                raw.append(text[i : i + 2])
                i += 2
            else:
                assert text[i] != "\n"
                raw.append(text[i])
                i += 1
        i += 1
        labels.append((name, _unescape("".join(raw), {"\\": "\\", '"': '"', "n": "\n"})))
        if text[i] == ",":
            i += 1
    assert len({n for n, _ in labels}) == len(labels), f"repeated label in {text!r}"
    return tuple(labels), i + 1


def parse_sample(line: str) -> tuple[str, Labels, float]:
    m = _METRIC_NAME.match(line)
    assert m, f"bad sample line {line!r}"
    name, i = m.group(), m.end()
    labels: Labels = ()
    if line[i] == "{":
        labels, i = _parse_labels(line, i)
    assert line[i] == " ", f"expected one space before the value in {line!r}"
    value_text = line[i + 1 :]
    assert " " not in value_text, f"unexpected timestamp or junk in {line!r}"
    assert re.fullmatch(r"[+-]?(Inf|NaN|[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?)", value_text), line
    return name, labels, float(value_text)


def parse_exposition(text: str) -> dict[str, Family]:
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        assert line, "blank line"
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert _METRIC_NAME.fullmatch(name), line
            assert name not in families, f"family {name} declared twice"
            current = families[name] = Family(name, _unescape(help_text, {"\\": "\\", "n": "\n"}))
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            assert current is not None, f"TYPE without HELP: {line}"
            assert current.name == name, f"TYPE without HELP: {line}"
            assert not current.type, f"TYPE twice: {line}"
            assert not current.samples, f"TYPE after samples: {line}"
            assert kind in _TYPES, line
            current.type = kind
        else:
            assert not line.startswith("#"), f"unexpected comment {line!r}"
            name, labels, value = parse_sample(line)
            assert current is not None, f"sample before TYPE: {line}"
            assert current.type, f"sample before TYPE: {line}"
            if current.type == "histogram":
                allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                allowed = {current.name}
            assert name in allowed, f"{name} outside its family ({current.name})"
            current.samples.append((name, labels, value))
    for fam in families.values():
        assert fam.type, fam.name
        keys = [(n, tuple(sorted(ls))) for n, ls, _ in fam.samples]
        assert len(keys) == len(set(keys)), f"duplicate series in {fam.name}"
        if fam.type == "counter":
            assert fam.name.endswith("_total"), fam.name
            assert all(v >= 0 for _, _, v in fam.samples)
        if fam.type == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Family) -> list[tuple[float, float]]:
    buckets = [(float(dict(ls)["le"]), v) for n, ls, v in fam.samples if n.endswith("_bucket")]
    assert buckets, "no buckets"
    assert buckets[-1][0] == math.inf, "no +Inf bucket"
    les = [le for le, _ in buckets]
    assert les == sorted(les)
    assert len(set(les)) == len(les)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"buckets not cumulative: {counts}"
    assert buckets[-1][1] == fam.value(fam.name + "_count")
    fam.value(fam.name + "_sum")  # present, once
    return buckets


def families_of(agg: Aggregator) -> dict[str, Family]:
    return parse_exposition(render(agg))


def fam(families: dict[str, Family], short: str) -> Family:
    return families["spoa_mp_" + short]


def counter_series(families: dict[str, Family]) -> dict[tuple[str, Labels], float]:
    """Every sample that must never go down (counters and histogram parts)."""
    return {
        (n, tuple(sorted(ls))): v
        for f in families.values()
        if f.type in ("counter", "histogram")
        for n, ls, v in f.samples
    }


# --------------------------------------------------------------------------
# exposition format

EXPECTED = {
    "messages_total": "counter",
    "handler_errors_total": "counter",
    "handler_latency_seconds": "histogram",
    "frames_in_total": "counter",
    "frames_out_total": "counter",
    "disconnects_total": "counter",
    "connections_accepted_total": "counter",
    "connections_refused_total": "counter",
    "hello_timeouts_total": "counter",
    "tls_handshake_failures_total": "counter",
    "connections_not_allowed_total": "counter",
    "protocol_errors_total": "counter",
    "acks_cut_total": "counter",
    "connections_handed_over_total": "counter",
    "connections_adopted_total": "counter",
    "backpressure_total": "counter",
    "handler_timeouts_total": "counter",
    "worker_messages_total": "counter",
    "connections_open": "gauge",
    "messages_in_flight": "gauge",
    "negotiated_max_frame_size_connections": "gauge",
    "negotiated_capabilities_connections": "gauge",
    "workers_alive": "gauge",
    "worker_restarts_total": "counter",
    "reloads_total": "counter",
    "reloads_failed_total": "counter",
    "generation": "gauge",
    "build_info": "gauge",
}
UNLABELED = [
    "connections_accepted_total", "protocol_errors_total", "acks_cut_total",
    "connections_handed_over_total", "connections_adopted_total", "connections_open",
    "messages_in_flight", "workers_alive", "worker_restarts_total", "reloads_total",
    "reloads_failed_total", "generation",
]  # fmt: skip


def snapshot(**kw: Any) -> dict[str, Any]:
    """A heartbeat `counters` object, JSON round-tripped as the control channel does."""
    return json.loads(json.dumps(kw))


def test_empty_render_has_every_family_once_with_zeros() -> None:
    text = render(Aggregator())
    families = parse_exposition(text)
    assert {n.removeprefix("spoa_mp_"): f.type for n, f in families.items()} == EXPECTED
    assert text.count("# TYPE ") == text.count("# HELP ") == len(EXPECTED)
    assert all(f.help for f in families.values())
    for name in UNLABELED:
        assert fam(families, name).value() == 0, name
    lat = fam(families, "handler_latency_seconds")
    buckets = check_histogram(lat)
    assert [le for le, _ in buckets] == [*LATENCY_BOUNDS, math.inf]
    assert all(v == 0 for _, v in buckets)
    assert lat.value("spoa_mp_handler_latency_seconds_sum") == 0
    # the frame types always sent or received start at 0, so that rate() has a start
    assert fam(families, "frames_in_total").by_label("type") == {
        "haproxy-hello": 0, "notify": 0, "haproxy-disconnect": 0,
    }  # fmt: skip
    assert fam(families, "frames_out_total").by_label("type") == {
        "ack": 0, "agent-hello": 0, "agent-disconnect": 0,
    }  # fmt: skip
    assert fam(families, "messages_total").samples == []
    assert fam(families, "build_info").value(version=__version__) == 1


def test_label_values_are_escaped() -> None:
    name = 'a\\b"c\nd'
    agg = Aggregator(version='1"\\\n')
    agg.update("1", snapshot(messages={name: 5}))
    text = render(agg)
    assert 'spoa_mp_messages_total{message="a\\\\b\\"c\\nd"} 5.0\n' in text
    assert 'spoa_mp_build_info{version="1\\"\\\\\\n"} 1.0\n' in text
    families = parse_exposition(text)
    assert fam(families, "messages_total").by_label("message") == {name: 5}
    assert fam(families, "build_info").by_label("version") == {'1"\\\n': 1}


def test_non_utf8_label_does_not_break_render() -> None:
    agg = Aggregator()
    agg.update("1", {"messages": {"bad\ud800name": 1, "x" * 1000: 2}})
    text = render(agg)
    text.encode("utf-8")
    labels = fam(parse_exposition(text), "messages_total").by_label("message")
    assert labels == {"bad?name": 1, "x" * metrics.MAX_LABEL_LENGTH: 2}


def test_histogram_buckets_are_cumulative_and_inf_is_count() -> None:
    agg = Aggregator()
    n = len(LATENCY_BOUNDS) + 1
    a = [0] * n
    a[0], a[3], a[-1] = 2, 1, 4  # 2 <= 0.1 ms, 1 <= 1 ms, 4 > 1 s
    b = [0] * n
    b[3], b[5] = 3, 1
    agg.update("a", snapshot(latency={"bounds": list(LATENCY_BOUNDS), "counts": a, "sum": 5.5}))
    agg.update("b", snapshot(latency={"bounds": list(LATENCY_BOUNDS), "counts": b, "sum": 0.25}))
    lat = fam(families_of(agg), "handler_latency_seconds")
    buckets = dict(check_histogram(lat))
    assert buckets[0.0001] == 2
    assert buckets[0.0005] == 2
    assert buckets[0.001] == 6
    assert buckets[0.005] == 7
    assert buckets[1.0] == 7
    assert buckets[math.inf] == 11
    assert lat.value("spoa_mp_handler_latency_seconds_count") == 11
    assert lat.value("spoa_mp_handler_latency_seconds_sum") == 5.75
    assert 'spoa_mp_handler_latency_seconds_bucket{le="+Inf"} 11.0\n' in render(agg)


# --------------------------------------------------------------------------
# aggregation


def full_counters(k: int) -> dict[str, Any]:
    return snapshot(
        messages={"check": 10 * k, "other": k},
        handler_errors={"check": k},
        frames_in={"notify": 11 * k, "haproxy-hello": 1, "unknown": k},
        frames_out={"ack": 11 * k, "agent-hello": 1},
        disconnects={"in": {"0": k}, "out": {"2": 1}},
        connections_total=2 * k,
        protocol_errors=k,
        acks_cut=3 * k,
        handed_over=4 * k,
        adopted=5 * k,
    )


def test_counters_and_gauges_sum_across_workers() -> None:
    agg = Aggregator()
    agg.update(
        "1", full_counters(1),
        snapshot(connections=2, in_flight=1,
                 negotiated={"max_frame_size": {"16380": 2},
                             "capabilities": {"pipelining": 1, "": 1}}),
    )  # fmt: skip
    agg.update(
        "2", full_counters(2),
        snapshot(connections=3, in_flight=0,
                 negotiated={"max_frame_size": {"16380": 1, "4096": 2},
                             "capabilities": {"pipelining": 3}}),
    )  # fmt: skip
    agg.set_supervisor(
        workers_alive=2, worker_restarts=1, reloads=3, reloads_failed=1, generation=4
    )
    f = families_of(agg)
    assert fam(f, "messages_total").by_label("message") == {"check": 30, "other": 3}
    assert fam(f, "handler_errors_total").by_label("message") == {"check": 3}
    assert fam(f, "frames_in_total").by_label("type") == {
        "notify": 33, "haproxy-hello": 2, "unknown": 3, "haproxy-disconnect": 0,
    }  # fmt: skip
    assert fam(f, "frames_out_total").by_label("type") == {
        "ack": 33, "agent-hello": 2, "agent-disconnect": 0,
    }  # fmt: skip
    d = fam(f, "disconnects_total")
    assert d.value(direction="in", status="0") == 3
    assert d.value(direction="out", status="2") == 2
    assert len(d.samples) == 2
    assert fam(f, "connections_accepted_total").value() == 6
    assert fam(f, "protocol_errors_total").value() == 3
    assert fam(f, "acks_cut_total").value() == 9
    assert fam(f, "connections_handed_over_total").value() == 12
    assert fam(f, "connections_adopted_total").value() == 15
    assert fam(f, "connections_open").value() == 5
    assert fam(f, "messages_in_flight").value() == 1
    assert fam(f, "negotiated_max_frame_size_connections").by_label("size") == {
        "16380": 3, "4096": 2,
    }  # fmt: skip
    assert fam(f, "negotiated_capabilities_connections").by_label("capabilities") == {
        "pipelining": 4, "": 1,
    }  # fmt: skip
    assert fam(f, "workers_alive").value() == 2
    assert fam(f, "worker_restarts_total").value() == 1
    assert fam(f, "reloads_total").value() == 3
    assert fam(f, "reloads_failed_total").value() == 1
    assert fam(f, "generation").value() == 4
    assert agg.total("messages") == 33
    assert agg.total("acks_cut") == 9


def test_latest_snapshot_replaces_the_previous_one() -> None:
    agg = Aggregator()
    agg.update("1", snapshot(messages={"m": 5}), snapshot(connections=4))
    agg.update("1", snapshot(messages={"m": 7}), snapshot(connections=1))
    f = families_of(agg)
    assert fam(f, "messages_total").value(message="m") == 7
    assert fam(f, "connections_open").value() == 1


def test_counters_survive_retire_and_never_go_down() -> None:
    agg = Aggregator()
    seen: list[dict[tuple[str, Labels], float]] = []

    def scrape() -> dict[str, Family]:
        f = families_of(agg)
        series = counter_series(f)
        if seen:
            for key, before in seen[-1].items():
                assert series.get(key, 0) >= before, f"{key} went down"
        seen.append(series)
        return f

    hist = LatencyHistogram()
    hist.observe(0.002)
    agg.update("100", {**full_counters(1), "latency": hist.snapshot()}, {"connections": 1})
    agg.update("101", full_counters(1), {"connections": 1})
    assert fam(scrape(), "messages_total").value(message="check") == 20
    agg.retire("100")  # died: its last counters are kept
    f = scrape()
    assert fam(f, "messages_total").value(message="check") == 20
    assert fam(f, "handler_latency_seconds").value("spoa_mp_handler_latency_seconds_count") == 1
    agg.update("102", snapshot(messages={"check": 1}))  # its replacement starts from 0
    assert fam(scrape(), "messages_total").value(message="check") == 21
    agg.retire("101")  # a reload retires the old generation
    agg.retire("102")
    f = scrape()
    assert fam(f, "messages_total").value(message="check") == 21
    assert fam(f, "connections_accepted_total").value() == 4
    assert fam(f, "connections_open").value() == 0
    agg.update("103", full_counters(1))
    f = scrape()
    assert fam(f, "messages_total").value(message="check") == 31
    assert fam(f, "handler_latency_seconds").value("spoa_mp_handler_latency_seconds_count") == 1
    assert agg.total("messages") == 31 + 3


def test_gauges_drop_on_retire() -> None:
    agg = Aggregator()
    negotiated = {"max_frame_size": {"16380": 3}, "capabilities": {"": 3}}
    gauges = snapshot(connections=3, in_flight=2, negotiated=negotiated)
    agg.update("1", {}, gauges)
    agg.update("2", {}, {"connections": 1})
    agg.retire("1")
    f = families_of(agg)
    assert fam(f, "connections_open").value() == 1
    assert fam(f, "messages_in_flight").value() == 0
    assert fam(f, "negotiated_max_frame_size_connections").samples == []
    assert fam(f, "negotiated_capabilities_connections").samples == []


def test_update_after_retire_is_ignored() -> None:
    agg = Aggregator()
    agg.update("7", snapshot(messages={"m": 5}), {"connections": 1})
    agg.retire("7")
    assert agg.update("7", snapshot(messages={"m": 6}), {"connections": 1}) is False
    f = families_of(agg)
    assert fam(f, "messages_total").value(message="m") == 5  # not 5 + 6
    assert fam(f, "connections_open").value() == 0
    agg.retire("7")  # twice, or never updated: harmless
    agg.retire("never-seen")
    assert agg.total("messages") == 5


def test_a_counter_going_down_is_a_restart_under_the_same_id() -> None:
    agg = Aggregator()
    agg.update("1", snapshot(messages={"m": 50}, acks_cut=3))
    agg.update("1", snapshot(messages={"m": 2}, acks_cut=3))  # a new process
    f = families_of(agg)
    assert fam(f, "messages_total").value(message="m") == 52
    assert fam(f, "acks_cut_total").value() == 6
    agg.update("1", snapshot(messages={"m": 4}, acks_cut=4))
    assert families_of(agg)["spoa_mp_messages_total"].value(message="m") == 54


def test_a_counter_missing_later_keeps_its_value() -> None:
    agg = Aggregator()
    agg.update("1", snapshot(messages={"a": 5, "b": 1}, acks_cut=2))
    agg.update("1", snapshot(messages={"a": 6}))
    f = families_of(agg)
    assert fam(f, "messages_total").by_label("message") == {"a": 6, "b": 1}
    assert fam(f, "acks_cut_total").value() == 2


GOOD = {"messages": {"m": 1}, "acks_cut": 1}


def _latency(**over: Any) -> dict[str, Any]:
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    counts[0] = 1
    return {"latency": {"bounds": list(LATENCY_BOUNDS), "counts": counts, "sum": 0.0001} | over}


@pytest.mark.parametrize(
    "counters",
    [
        None, [], "x", 3, {"messages": [1]}, {"messages": "m"}, {"messages": {"m": -1}},
        {"messages": {"m": True}}, {"messages": {"m": "3"}}, {"messages": {"m": None}},
        {"messages": {"m": 1.5}}, {"messages": {"m": math.nan}}, {"messages": {3: 1}},
        {"connections_total": -2}, {"connections_total": 1.5}, {"connections_total": [1]},
        {"disconnects": {"in": 5}}, {"disconnects": [1]}, {"disconnects": {"in": {"0": "x"}}},
        {"latency": 1}, {"latency": {}},
        _latency(bounds=[0.1, 1.0]), _latency(bounds=[*LATENCY_BOUNDS[:-1], 2.0]),
        _latency(bounds="x"), _latency(bounds=[True] * len(LATENCY_BOUNDS)),
        _latency(counts=[1, 2]), _latency(counts=[-1] * (len(LATENCY_BOUNDS) + 1)),
        _latency(counts="x"), _latency(sum=-1.0), _latency(sum=math.nan),
        _latency(sum=math.inf), _latency(sum="1"), _latency(sum=None),
    ],
)  # fmt: skip
def test_malformed_counters_are_ignored(counters: Any) -> None:
    agg = Aggregator()
    assert agg.update("w", counters, None) is True
    f = families_of(agg)
    assert fam(f, "messages_total").samples == []
    assert fam(f, "connections_accepted_total").value() == 0
    assert fam(f, "disconnects_total").samples == []
    assert fam(f, "handler_latency_seconds").value("spoa_mp_handler_latency_seconds_count") == 0
    # nor does it spoil what comes next
    agg.update("w", {**GOOD, **_latency()})
    f = families_of(agg)
    assert fam(f, "messages_total").value(message="m") == 1
    assert fam(f, "handler_latency_seconds").value("spoa_mp_handler_latency_seconds_count") == 1


def test_malformed_parts_do_not_spoil_the_rest() -> None:
    agg = Aggregator()
    agg.update(
        "w",
        {"messages": {"ok": 2, "bad": -1, "worse": "x"}, "acks_cut": "x", "adopted": 3,
         **_latency(bounds=[1, 2, 3])},
        {"connections": "x", "in_flight": 2, "negotiated": {"max_frame_size": {"9": -1, "8": 1}}},
    )  # fmt: skip
    f = families_of(agg)
    assert fam(f, "messages_total").by_label("message") == {"ok": 2}
    assert fam(f, "acks_cut_total").value() == 0
    assert fam(f, "connections_adopted_total").value() == 3
    assert fam(f, "handler_latency_seconds").value("spoa_mp_handler_latency_seconds_count") == 0
    assert fam(f, "connections_open").value() == 0
    assert fam(f, "messages_in_flight").value() == 2
    assert fam(f, "negotiated_max_frame_size_connections").by_label("size") == {"8": 1}
    assert agg.ignored >= 1


@pytest.mark.parametrize(
    "gauges",
    [[], "x", 1, {"connections": -1}, {"connections": True}, {"negotiated": 3},
     {"negotiated": {"max_frame_size": [1]}}],
)  # fmt: skip
def test_malformed_gauges_are_ignored(gauges: Any) -> None:
    agg = Aggregator()
    agg.update("w", GOOD, gauges)
    f = families_of(agg)
    assert fam(f, "connections_open").value() == 0
    assert fam(f, "negotiated_max_frame_size_connections").samples == []
    assert fam(f, "messages_total").value(message="m") == 1


def test_a_late_bad_latency_keeps_the_last_good_one() -> None:
    agg = Aggregator()
    agg.update("w", _latency())
    agg.update("w", _latency(bounds=[0.5, 1.0]))  # a worker with other buckets: ignored
    lat = fam(families_of(agg), "handler_latency_seconds")
    assert lat.value("spoa_mp_handler_latency_seconds_count") == 1


def test_too_many_labels_are_cut() -> None:
    agg = Aggregator()
    agg.update("w", {"messages": {f"m{i}": 1 for i in range(metrics.MAX_LABELS + 50)}})
    assert len(fam(families_of(agg), "messages_total").samples) == metrics.MAX_LABELS


def test_set_supervisor_ignores_bad_values() -> None:
    agg = Aggregator()
    agg.set_supervisor(3, 2, 1, 0, 5)
    agg.set_supervisor("x", -1, None, True, 6)  # type: ignore[arg-type]
    f = families_of(agg)
    assert fam(f, "workers_alive").value() == 3
    assert fam(f, "worker_restarts_total").value() == 2
    assert fam(f, "reloads_total").value() == 1
    assert fam(f, "reloads_failed_total").value() == 0
    assert fam(f, "generation").value() == 6


# --------------------------------------------------------------------------
# LatencyHistogram (worker side)


def test_latency_histogram_buckets_by_le() -> None:
    h = LatencyHistogram()
    for seconds in (0.0, 0.0001, 0.00010001, 0.001, 1.0, 1.5, 100.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["bounds"] == list(LATENCY_BOUNDS)
    counts = snap["counts"]
    assert len(counts) == len(LATENCY_BOUNDS) + 1
    assert counts[0] == 2  # 0 and exactly 0.1 ms: le="0.0001"
    assert counts[1] == 1  # just above 0.1 ms
    assert counts[LATENCY_BOUNDS.index(0.001)] == 1
    assert counts[LATENCY_BOUNDS.index(1.0)] == 1
    assert counts[-1] == 2  # above the last bound
    assert sum(counts) == h.count == 7
    assert snap["sum"] == pytest.approx(102.50120001)


def test_latency_histogram_drops_impossible_values() -> None:
    h = LatencyHistogram()
    for bad in (-0.001, math.nan, math.inf, -math.inf):
        h.observe(bad)
    assert h.count == 0
    assert h.sum == 0.0


def test_latency_snapshot_is_a_copy_and_feeds_the_aggregator() -> None:
    h = LatencyHistogram()
    h.observe(0.003)
    snap = json.loads(json.dumps(h.snapshot()))  # as the control channel carries it
    h.observe(0.003)
    assert sum(snap["counts"]) == 1
    agg = Aggregator()
    agg.update("w", {"latency": snap})
    lat = fam(families_of(agg), "handler_latency_seconds")
    buckets = dict(check_histogram(lat))
    assert buckets[0.0025] == 0
    assert buckets[0.005] == 1
    assert lat.value("spoa_mp_handler_latency_seconds_sum") == 0.003


@pytest.mark.parametrize("bounds", [[], [1.0, 1.0], [2.0, 1.0], [0.1, math.inf], [math.nan]])
def test_latency_bounds_are_checked(bounds: list[float]) -> None:
    with pytest.raises(ValueError, match="bounds"):
        LatencyHistogram(bounds)
    with pytest.raises(ValueError, match="bounds"):
        Aggregator(bounds=bounds)


def test_custom_bounds_agree_between_worker_and_aggregator() -> None:
    h = LatencyHistogram([0.5, 1.0])
    h.observe(0.7)
    agg = Aggregator(bounds=[0.5, 1.0])
    agg.update("w", {"latency": h.snapshot()})
    assert agg.update("x", {"latency": LatencyHistogram().snapshot()})  # other bounds: ignored
    buckets = check_histogram(fam(families_of(agg), "handler_latency_seconds"))
    assert buckets == [(0.5, 0), (1.0, 1), (math.inf, 1)]


# --------------------------------------------------------------------------
# parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:0", ("::1", 0)),
        ("[::]:9100", ("::", 9100)),
        (":9100", ("0.0.0.0", 9100)),
        ("*:9100", ("0.0.0.0", 9100)),
        ("localhost:65535", ("localhost", 65535)),
        ("  127.0.0.1:80 ", ("127.0.0.1", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected HOST:PORT"),
        ("9100", "expected HOST:PORT"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:9100", "brackets"),
        ("[::1]9100", r"expected \[IPv6\]:PORT"),
        ("[::1:9100", "missing ']'"),
        ("[nope]:1", "not an IPv6 address"),
        ("[127.0.0.1]:1", "not an IPv6 address"),
        ("127.0.0.1:", "port must be"),
        ("127.0.0.1:-1", "port must be"),
        ("127.0.0.1:65536", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("127.0.0.1:٣", "port must be"),
        ("a b:1", "not a valid host"),
        ("-x:1", "not a valid host"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_address(text)
    assert "\n" not in str(info.value)


def test_format_address() -> None:
    assert metrics_http.format_address("::1", 9) == "[::1]:9"
    assert metrics_http.format_address("127.0.0.1", 9) == "127.0.0.1:9"


# --------------------------------------------------------------------------
# MetricsServer in a real selector loop

DEADLINE = 5.0


class Loop:
    """A stand-in for the supervisor's loop: one selector, other entries too."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.other_r, self.other_w = socket.socketpair()
        self.selector.register(self.other_r, selectors.EVENT_READ, None)  # like _wake_r
        server.register(self.selector)

    def turn(self, timeout: float = 0.02) -> None:
        for key, _ in self.selector.select(timeout):
            if isinstance(key.data, MetricsServer):
                key.data.handle(key)
        self.server.expire()

    def until(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.turn()

    def close(self) -> None:
        self.server.close()
        self.selector.close()
        self.other_r.close()
        self.other_w.close()


@pytest.fixture
def agg() -> Aggregator:
    a = Aggregator()
    a.update("1", snapshot(messages={"check": 42}), snapshot(connections=1))
    return a


@pytest.fixture
def make_loop() -> Iterator[Callable[..., Loop]]:
    loops: list[Loop] = []

    def make(text: Callable[[], str], **kw: Any) -> Loop:
        def encoded(accept: str) -> tuple[bytes, str]:
            return text().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8"

        server = MetricsServer("127.0.0.1:0", encoded, **kw)
        server.listen()
        loop = Loop(server)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


@pytest.fixture
def loop(make_loop: Callable[..., Loop], agg: Aggregator) -> Loop:
    return make_loop(lambda: render(agg))


class Client:
    def __init__(self, loop: Loop) -> None:
        port = loop.server.sockname[1]  # type: ignore[index]
        self.loop = loop
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.setblocking(False)
        self.data = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def poll(self) -> bool:
        """Read what is there; True once the server closed the connection."""
        while not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
            self.data += chunk
        return True

    def response(self) -> Response:
        self.loop.until(self.poll, "the response")
        return Response.parse(bytes(self.data))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Response:
        head, sep, body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {raw!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines:
            k, _, v = line.partition(": ")
            headers[k.lower()] = v
        assert int(headers["content-length"]) == len(body) or not body
        return cls(int(status), reason, headers, body)


def request(loop: Loop, raw: bytes) -> Response:
    client = Client(loop)
    try:
        client.send(raw)
        return client.response()
    finally:
        client.close()


def test_get_metrics(loop: Loop, agg: Aggregator) -> None:
    r = request(loop, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert r.headers["connection"] == "close"
    assert int(r.headers["content-length"]) == len(r.body)
    assert r.body.decode("utf-8") == render(agg)
    families = parse_exposition(r.body.decode("utf-8"))
    assert fam(families, "messages_total").value(message="check") == 42
    loop.until(lambda: loop.server.connections == 0, "the server to close")


def test_scrape_sees_new_data(loop: Loop, agg: Aggregator) -> None:
    request(loop, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    agg.update("1", snapshot(messages={"check": 43}))
    r = request(loop, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert r.status == 200
    assert fam(parse_exposition(r.body.decode()), "messages_total").value(message="check") == 43


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics?name[]=x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://x:9100/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\nHost: x\n\n",  # bare LF
        b"\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",  # a stray CRLF first
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
        + b"X-Pad: " + b"a" * 7000 + b"\r\n\r\n",  # large but under 8 KiB
    ],
)  # fmt: skip
def test_get_metrics_variants(loop: Loop, raw: bytes) -> None:
    r = request(loop, raw)
    assert r.status == 200
    assert r.body.startswith(b"# HELP spoa_mp_")


def test_head_metrics(loop: Loop, agg: Aggregator) -> None:
    r = request(loop, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200
    assert r.body == b""
    assert int(r.headers["content-length"]) == len(render(agg).encode())


def test_index_points_to_metrics(loop: Loop) -> None:
    r = request(loop, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    assert b'href="/metrics"' in r.body


@pytest.mark.parametrize("path", [b"/nope", b"/metrics/", b"/metricsx", b"*"])
def test_other_paths_are_404(loop: Loop, path: bytes) -> None:
    r = request(loop, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 404
    assert r.headers["connection"] == "close"


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"])
def test_other_methods_are_405(loop: Loop, method: bytes) -> None:
    r = request(loop, method + b" /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1 x\r\n\r\n", 400),
        (b"GET /metrics FTP/1.0\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS, of sorts
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    ],
)
def test_bad_requests(loop: Loop, raw: bytes, status: int) -> None:
    assert request(loop, raw).status == status


def test_request_in_two_sends(loop: Loop) -> None:
    client = Client(loop)
    try:
        client.send(b"GET /metrics HT")
        loop.until(lambda: loop.server.connections == 1, "the accept")
        for _ in range(5):  # the server has read the first part and waits for more
            loop.turn()
        assert not client.poll()
        assert client.data == b""
        client.send(b"TP/1.1\r\nHost: x\r\n")
        loop.turn()
        assert not client.poll()
        client.send(b"\r\n")
        r = client.response()
    finally:
        client.close()
    assert r.status == 200
    assert b"spoa_mp_messages_total" in r.body


def test_oversized_request_is_refused(loop: Loop) -> None:
    client = Client(loop)
    try:
        client.send(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000)
        loop.until(client.poll, "the server's answer")
    finally:
        client.close()
    loop.until(lambda: loop.server.connections == 0, "the server to close")
    if client.data:  # normally a 431; a bare close would do too
        assert Response.parse(bytes(client.data)).status == 431


def test_oversized_request_with_terminator_is_refused(loop: Loop) -> None:
    r = request(loop, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert r.status == 431


def test_expire_closes_idle_connections(loop: Loop) -> None:
    server = loop.server
    idle = Client(loop)
    try:
        idle.send(b"GET /met")  # never finished
        loop.until(lambda: server.connections == 1, "the accept")
        assert server.expire(time.monotonic()) == 0  # not yet stale
        assert server.connections == 1
        assert server.expire(time.monotonic() + server.timeout + 0.1) == 1
        assert server.connections == 0
        loop.until(idle.poll, "the close")
        assert idle.eof
        assert idle.data == b""
    finally:
        idle.close()
    # and the server still serves
    assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").status == 200


def test_client_that_goes_away_is_cleaned_up(loop: Loop) -> None:
    client = Client(loop)
    client.send(b"GET /metrics HTTP/1.1\r\n")
    loop.until(lambda: loop.server.connections == 1, "the accept")
    client.close()
    loop.until(lambda: loop.server.connections == 0, "the server to notice")
    assert len(loop.selector.get_map()) == 2  # listener + the loop's own socket


def test_pipelined_bytes_do_not_spoil_the_response(loop: Loop, agg: Aggregator) -> None:
    client = Client(loop)
    try:
        one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        client.send(one + one + b"x" * 3000)
        r = client.response()
    finally:
        client.close()
    assert r.status == 200
    assert r.body.decode() == render(agg)


def test_render_failure_is_500_and_the_server_lives(make_loop: Callable[..., Loop]) -> None:
    calls = []

    def render() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "# ok\n"

    loop = make_loop(render)
    assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").status == 500
    r = request(loop, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert r.status == 200
    assert r.body == b"# ok\n"


def test_large_body_is_written_across_writable_events(make_loop: Callable[..., Loop]) -> None:
    big = "# HELP x y\n# TYPE x gauge\n" + "".join(f'x{{i="{i}"}} {i}\n' for i in range(250_000))
    loop = make_loop(lambda: big)
    client = Client(loop)
    try:
        client.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        loop.until(lambda: loop.server.connections == 1, "the accept")
        for _ in range(3):  # the client reads nothing yet: the kernel cannot take it all
            loop.turn(0)
        states = {c.state for c in loop.server._clients.values()}
        assert states == {metrics_http.WRITING}
        r = client.response()
    finally:
        client.close()
    assert r.status == 200
    assert len(big) > 4_000_000
    assert r.body == big.encode()


def test_connections_over_the_limit_are_closed(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(lambda: "", max_connections=2)
    clients = [Client(loop) for _ in range(3)]
    try:
        loop.until(lambda: clients[2].poll() or loop.server.connections > 2, "the third")
        assert loop.server.connections == 2
        assert clients[2].eof
        clients[0].send(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert clients[0].response().status == 200
    finally:
        for c in clients:
            c.close()


def test_handle_never_raises_on_foreign_keys(loop: Loop) -> None:
    stray, other = socket.socketpair()
    try:
        key = selectors.SelectorKey(stray, stray.fileno(), selectors.EVENT_READ, loop.server)
        loop.server.handle(key)  # not one of its sockets: ignored
    finally:
        stray.close()
        other.close()
    assert request(loop, b"GET /metrics HTTP/1.1\r\n\r\n").status == 200


def test_close_is_complete_and_idempotent(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(lambda: "")
    client = Client(loop)
    try:
        loop.until(lambda: loop.server.connections == 1, "the accept")
        loop.server.close()
        loop.server.close()
        assert loop.server.connections == 0
        assert loop.server.sockname is None
        assert [k.data for k in loop.selector.get_map().values()] == [None]
        loop_deadline = time.monotonic() + DEADLINE
        while not client.poll():
            assert time.monotonic() < loop_deadline
            select_one(client.sock)
        assert client.eof
    finally:
        client.close()


def select_one(sock: socket.socket) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        sel.select(0.05)


def test_close_in_child_leaves_the_selector_alone(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(lambda: "")
    client = Client(loop)
    try:
        loop.until(lambda: loop.server.connections == 1, "the accept")
        before = {k.fd for k in loop.selector.get_map().values()}
        listener_fd = loop.server._sock.fileno()  # type: ignore[union-attr]
        loop.server.close_in_child()
        # a forked child shares the parent's epoll: it must not unregister
        assert {k.fd for k in loop.selector.get_map().values()} == before
        assert listener_fd in before
        assert loop.server.sockname is None
        assert loop.server.connections == 0
    finally:
        client.close()
        # drop the now-closed descriptors from this (test) selector by hand
        for key in list(loop.selector.get_map().values()):
            if key.data is loop.server:
                with contextlib.suppress(Exception):
                    loop.selector.unregister(key.fileobj)


def test_listen_reports_the_port_and_refuses_a_busy_one(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(lambda: "")
    port = loop.server.sockname[1]  # type: ignore[index]
    assert port > 0
    other = MetricsServer(f"127.0.0.1:{port}", lambda: "")
    with pytest.raises(OSError, match="in use"):
        other.listen()
    fresh = MetricsServer("127.0.0.1:0", lambda: "")
    try:
        bound = fresh.listen()
        host, got = parse_address(bound)
        assert host == "127.0.0.1"
        assert got == fresh.sockname[1] > 0  # type: ignore[index]
    finally:
        fresh.close()


def test_register_before_listen_is_an_error() -> None:
    with selectors.DefaultSelector() as sel, pytest.raises(RuntimeError, match="listen"):
        MetricsServer("127.0.0.1:0", lambda: "").register(sel)


def test_listen_rejects_a_bad_address() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        MetricsServer("nowhere", lambda: "").listen()


# --------------------------------------------------------------------------
# per-worker series, optional families, OpenMetrics


def test_messages_by_worker_slot_survive_a_replacement() -> None:
    agg = Aggregator()
    agg.update("100", snapshot(messages={"a": 3, "b": 1}), slot=1)
    agg.update("200", snapshot(messages={"a": 5}), slot=2)
    assert fam(families_of(agg), "worker_messages_total").by_label("worker") == {"1": 4, "2": 5}
    agg.retire("100")  # slot 1's worker died; its successor starts from 0
    agg.update("101", snapshot(messages={"a": 2}), slot=1)
    got = fam(families_of(agg), "worker_messages_total").by_label("worker")
    assert got == {"1": 6, "2": 5}
    assert sum(got.values()) == fam(families_of(agg), "messages_total").value(message="a") + 1


def test_handler_timeouts_and_backpressure_when_the_workers_send_them() -> None:
    agg = Aggregator()
    agg.update("1", snapshot(messages={"m": 1}))  # an older worker: neither key
    families = families_of(agg)
    assert fam(families, "handler_timeouts_total").samples == []
    assert fam(families, "backpressure_total").value() == 0
    agg.update("2", snapshot(handler_timeouts={"slow": 2, "slower": 1}, backpressure=7))
    families = families_of(agg)
    assert fam(families, "handler_timeouts_total").by_label("message") == {"slow": 2, "slower": 1}
    assert fam(families, "backpressure_total").value() == 7


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    agg = Aggregator()
    agg.update("1", snapshot(messages={"m": 4}), slot=1)
    body, content_type = exposition(
        registry_for(agg), "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["spoa_mp_messages"].samples
    assert (sample.name, sample.labels, sample.value) == (
        "spoa_mp_messages_total",
        {"message": "m"},
        4,
    )
    assert families["spoa_mp_handler_latency_seconds"].type == "histogram"


def test_the_server_passes_the_accept_header(make_loop: Callable[..., Loop]) -> None:
    seen: list[str] = []
    agg = Aggregator()
    registry = registry_for(agg)

    def render(accept: str) -> tuple[bytes, str]:
        seen.append(accept)
        return exposition(registry, accept)

    server = MetricsServer("127.0.0.1:0", render)
    server.listen()
    loop = Loop(server)
    try:
        r = request(loop, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        assert r.status == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.body.endswith(b"# EOF\n")
        r = request(loop, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert r.headers["content-type"].startswith("text/plain")
    finally:
        loop.close()
    assert seen == ["application/openmetrics-text", ""]


def test_exposition_starts_no_thread() -> None:
    """The supervisor forks: rendering must not leave a thread behind."""
    import threading

    before = threading.active_count()
    agg = Aggregator()
    agg.update("1", snapshot(messages={"m": 1}), slot=1)
    exposition(registry_for(agg), "application/openmetrics-text")
    assert threading.active_count() == before

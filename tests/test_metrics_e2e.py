"""Prometheus metrics end to end: `python -m spoa_mp -n 2 --metrics 127.0.0.1:0`
as a real process tree, SPOP traffic from the small client of
tests/support/server.py, and /metrics scraped over HTTP with urllib.

Workers send their counters in a heartbeat about once a second, so every
check polls /metrics until the expected values show up, bounded by a
deadline (`Metrics.wait`); nothing sleeps a fixed time. Each test asserts
that values *change* as traffic flows, from a baseline scraped first.

The exposition text is parsed (and its format checked) by the parser of
tests/test_metrics.py; the format itself is unit-tested there, not here.
Only 127.0.0.1 is used; every server is killed with its process group.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from support.apps import TEST_APP, slow_msg
from support.apps import Messages as Message
from support.processes import gone, owner_of
from support.server import Server
from support.spop_peer import ConnectionClosedError, Frame, SpopClient, handshaken, vector
from support.waits import HOST, wait_for
from test_metrics import EXPECTED, Family, Labels, counter_series, parse_exposition

from spoa_mp import __version__
from spoa_mp.codec import FrameType, Status

pytestmark = pytest.mark.e2e

APP_NAME = "testapp"  # support.apps.TEST_APP
BROKEN_APP = 'raise RuntimeError("testapp: the import fails on purpose")\n'

SET_VAR, TXN = 1, 2
WAIT = 10.0  # seconds: a condition carried by heartbeats (about 1 s apart)
METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
# urllib without proxies from the environment: 127.0.0.1 only
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

FAST: Message = [("fast", [])]
BOOM: Message = [("boom", [])]
SLOW: Message = slow_msg(1, 200)  # answers txn.slow = 1 after 0.2 s


# ------------------------------------------------------------------ scraping


class Scrape:
    """One /metrics response, parsed (and format-checked) by test_metrics."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Family] = parse_exposition(text)

    def family(self, short: str) -> Family:
        return self.families["spoa_mp_" + short]

    def __call__(self, short: str, suffix: str = "", **labels: str) -> float:
        """The sample of family `spoa_mp_<short>` (+ `suffix`, for a histogram)
        with exactly these labels; 0 when it is not there (yet)."""
        fam = self.family(short)
        want = tuple(sorted(labels.items()))
        found = [
            v for n, ls, v in fam.samples if n == fam.name + suffix and tuple(sorted(ls)) == want
        ]
        assert len(found) <= 1, (short, labels, fam.samples)
        return found[0] if found else 0.0

    def labeled(self, short: str) -> dict[Labels, float]:
        return {tuple(sorted(ls)): v for _, ls, v in self.family(short).samples}

    def counters(self) -> dict[tuple[str, Labels], float]:
        return counter_series(self.families)


def assert_not_down(before: Scrape, after: Scrape) -> None:
    """No counter (nor histogram part) went down or vanished."""
    old, new = before.counters(), after.counters()
    down = {k: (v, new.get(k)) for k, v in old.items() if new.get(k, -1.0) < v}
    assert not down, f"counters went down (before, after): {down}"


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are returned too."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with OPENER.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers.items()), e.read()


@dataclass
class Metrics:
    srv: Server
    port: int
    app: Path

    def scrape(self) -> Scrape:
        status, _, body = http_get(self.port, "/metrics")
        assert status == 200, (status, body)
        return Scrape(body.decode("utf-8"))

    def wait(
        self,
        cond: Callable[[Scrape], bool],
        what: str,
        timeout: float = WAIT,
        each: Callable[[Scrape], None] | None = None,
    ) -> Scrape:
        """Scrape until `cond` holds; `each` sees every scrape on the way."""
        last: list[Scrape] = []

        def check() -> Scrape | None:
            self.srv.check_alive()
            s = self.scrape()
            if each is not None:
                each(s)
            last[:] = [s]
            return s if cond(s) else None

        try:
            return wait_for(check, timeout, what, interval=0.05)
        except TimeoutError as e:
            text = last[0].text if last else "(no scrape)"
            raise TimeoutError(f"{e}\n--- last /metrics ---\n{text}") from None

    def wait_fast(self, n: int, what: str, timeout: float = WAIT) -> Scrape:
        """Scrape until exactly `n` "fast" messages are counted."""
        return self.wait(lambda s: s("messages_total", message="fast") == n, what, timeout)

    def client(self) -> SpopClient:
        """A connection whose HAProxy 2.6 handshake is done."""
        return handshaken(SpopClient(self.srv.port))

    def pids(self) -> set[int]:
        return set(self.srv.workers_by_index().values())


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[Metrics]:
    """A running spoa-mp: 2 workers, the test app, --metrics on a port the OS
    picks (read from its "metrics on" log line)."""
    app = tmp_path / f"{APP_NAME}.py"
    app.write_text(TEST_APP)
    srv = Server(tmp_path, "--app", f"{APP_NAME}:agent", "--metrics", f"{HOST}:0", workers=2)
    with srv:
        m = METRICS_LINE.search(srv.log())
        assert m, f"no 'metrics on' line:\n{srv.log()}"
        mx = Metrics(srv, int(m[1]), app)
        mx.wait(lambda s: s("workers_alive") == 2, "2 workers alive")
        yield mx
    print(f"----- {srv.name} stderr -----\n{srv.log()}")


def open_client(mx: Metrics, clients: list[SpopClient]) -> SpopClient:
    c = mx.client()
    clients.append(c)
    return c


def fast_traffic(mx: Metrics, clients: list[SpopClient], n: int) -> SpopClient:
    """A new connection (closed at teardown) that sent n "fast" NOTIFYs, all ACKed."""
    c = open_client(mx, clients)
    send_fast(c, n)
    return c


def send_fast(c: SpopClient, n: int, first_sid: int = 1) -> None:
    """n pipelined NOTIFYs of "fast" in one write; every ACK checked."""
    c.send(b"".join(c.notify_bytes(first_sid + i, 1, FAST) for i in range(n)))
    acks = c.read_frames(n)
    assert [(a.type, a.sid, a.fid) for a in acks] == [
        (FrameType.ACK, first_sid + i, 1) for i in range(n)
    ]
    assert all(a.actions == [(SET_VAR, TXN, "fast", 1)] for a in acks), acks


def disconnect_status(frames: list[Frame]) -> int:
    assert [f.type for f in frames] == [FrameType.AGENT_DISCONNECT], frames
    status = frames[0].kv["status-code"]
    assert isinstance(status, int)
    return status


def reload_and_wait(mx: Metrics, generation: int, each: Callable[[Scrape], None]) -> Scrape:
    """SIGHUP; until /metrics shows the new generation serving with 2 workers
    and the old workers have exited (so that their counters were retired)."""
    old = mx.pids()
    procs = [psutil.Process(p) for p in old]
    reloads = mx.scrape()("reloads_total")
    mx.srv.signal(signal.SIGHUP)
    mx.wait(
        lambda s: (
            s("generation") == generation
            and s("reloads_total") == reloads + 1
            and s("workers_alive") == 2
        ),
        f"generation {generation} serving",
        each=each,
    )
    wait_for(lambda: all(gone(p) for p in procs), WAIT, "the old workers to exit, reaped")
    return mx.scrape()


# ------------------------------------------------------------------ 1. the families


def test_every_family_is_served_and_changes_with_traffic(
    metrics: Metrics, clients: list[SpopClient]
) -> None:
    s = metrics.scrape()
    assert {n.removeprefix("spoa_mp_"): f.type for n, f in s.families.items()} == EXPECTED
    assert all(f.help for f in s.families.values())
    assert s.labeled("build_info") == {(("version", __version__),): 1}
    assert s("workers_alive") == 2
    assert s("generation") == 1
    assert s("worker_restarts_total") == 0
    assert s("reloads_total") == 0
    assert s("reloads_failed_total") == 0
    assert s.family("messages_total").samples == []
    assert s("handler_latency_seconds", "_count") == 0
    assert s.labeled("frames_in_total") == {
        (("type", t),): 0 for t in ("haproxy-disconnect", "haproxy-hello", "notify")
    }

    fast_traffic(metrics, clients, 1)
    after = metrics.wait_fast(1, "the first message")
    assert after.families.keys() == s.families.keys()
    assert {n: (f.help, f.type) for n, f in after.families.items()} == {
        n: (f.help, f.type) for n, f in s.families.items()
    }
    assert after("frames_in_total", type="haproxy-hello") == 1
    assert after("handler_latency_seconds", "_count") == 1
    assert_not_down(s, after)


# ------------------------------------------------------------------ 2. one connection


def test_hello_and_notifies_are_counted(metrics: Metrics, clients: list[SpopClient]) -> None:
    n = 25
    # quiet: the connection of Server's readiness probe counted, and closed
    before = metrics.wait(
        lambda s: s("connections_accepted_total") >= 1 and s("connections_open") == 0,
        "the readiness probe counted",
    )
    accepted = before("connections_accepted_total")
    c = open_client(metrics, clients)
    for i in range(n):  # one at a time: n reads, n handler calls, n ACKs
        c.notify(i + 1, 1, FAST)
        ack = c.read_frame()
        assert (ack.type, ack.sid, ack.fid) == (FrameType.ACK, i + 1, 1)
        assert ack.actions == [(SET_VAR, TXN, "fast", 1)]

    s = metrics.wait(
        lambda s: s("messages_total", message="fast") == n and s("connections_open") == 1,
        f"{n} messages and 1 open connection",
    )
    assert s("frames_in_total", type="notify") == n
    assert s("frames_out_total", type="ack") == n
    assert s("frames_in_total", type="haproxy-hello") == 1
    assert s("frames_out_total", type="agent-hello") == 1
    assert s("frames_in_total", type="haproxy-disconnect") == 0
    assert s("frames_out_total", type="agent-disconnect") == 0
    assert s("handler_latency_seconds", "_count") == n
    assert s("handler_latency_seconds", "_bucket", le="+Inf") == n
    assert s("handler_latency_seconds", "_sum") > 0
    assert s("handler_errors_total", message="fast") == 0
    assert s("connections_accepted_total") == accepted + 1
    assert s.labeled("negotiated_max_frame_size_connections") == {(("size", "16380"),): 1}
    assert s.labeled("negotiated_capabilities_connections") == {
        (("capabilities", "pipelining,fragmentation"),): 1
    }
    assert s("messages_in_flight") == 0
    assert_not_down(before, s)

    c.close()
    closed = metrics.wait(lambda s: s("connections_open") == 0, "the connection closed")
    assert sum(closed.labeled("negotiated_max_frame_size_connections").values()) == 0
    assert sum(closed.labeled("negotiated_capabilities_connections").values()) == 0
    assert closed("messages_total", message="fast") == n
    assert closed("connections_accepted_total") == accepted + 1
    assert_not_down(s, closed)


# ------------------------------------------------------------------ 3. a failing handler


def test_handler_errors_are_counted_and_acked(metrics: Metrics, clients: list[SpopClient]) -> None:
    before = metrics.scrape()
    assert before("handler_errors_total", message="boom") == 0
    c = open_client(metrics, clients)
    c.notify(1, 7, BOOM)
    ack = c.read_frame()
    assert (ack.type, ack.sid, ack.fid, ack.actions) == (FrameType.ACK, 1, 7, [])
    s = metrics.wait(lambda s: s("handler_errors_total", message="boom") == 1, "an error")
    assert s("messages_total", message="boom") == 1
    assert s("frames_out_total", type="ack") == 1
    assert s("protocol_errors_total") == 0

    # the connection carries on: another error, then a message that works
    c.send(c.notify_bytes(2, 7, BOOM) + c.notify_bytes(3, 7, FAST))
    acks = c.read_frames(2)
    assert [(a.sid, a.actions) for a in acks] == [(2, []), (3, [(SET_VAR, TXN, "fast", 1)])]
    s2 = metrics.wait(
        lambda s: (
            s("handler_errors_total", message="boom") == 2
            and s("messages_total", message="fast") == 1
        ),
        "a second error and a fast one",
    )
    assert s2("messages_total", message="boom") == 2
    assert s2("handler_errors_total", message="fast") == 0
    assert s2("handler_latency_seconds", "_count") == 3
    assert s2("frames_out_total", type="ack") == 3
    assert_not_down(before, s)
    assert_not_down(s, s2)


# ------------------------------------------------------------------ 4. in flight


class SlowTraffic(threading.Thread):
    """Keeps `depth` "slow" NOTIFYs in flight on one connection until stopped."""

    def __init__(self, c: SpopClient, depth: int) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.depth = depth
        self.stop = threading.Event()
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sid = 0
            deadline = time.monotonic() + 30
            while not self.stop.is_set() and time.monotonic() < deadline:
                sids = range(sid + 1, sid + 1 + self.depth)
                self.c.send(b"".join(self.c.notify_bytes(i, 1, SLOW) for i in sids))
                acks = self.c.read_frames(self.depth)
                assert sorted(a.sid for a in acks) == list(sids), acks
                assert all(a.actions == [(SET_VAR, TXN, "slow", 1)] for a in acks), acks
                self.acked += self.depth
                sid += self.depth
        except BaseException as e:  # reported by the test
            self.error = e


def test_messages_in_flight_rise_and_fall(metrics: Metrics, clients: list[SpopClient]) -> None:
    depth = 4
    before = metrics.scrape()
    assert before("messages_in_flight") == 0
    traffic = SlowTraffic(open_client(metrics, clients), depth)
    traffic.start()
    try:
        busy = metrics.wait(
            lambda s: s("messages_in_flight") > 0 or traffic.error is not None,
            "messages in flight",
        )
    finally:
        traffic.stop.set()
        traffic.join(WAIT)
    assert not traffic.is_alive()
    assert traffic.error is None, traffic.error
    assert 0 < busy("messages_in_flight") <= depth
    assert traffic.acked > 0

    n = traffic.acked
    s = metrics.wait(
        lambda s: s("messages_in_flight") == 0 and s("messages_total", message="slow") == n,
        f"nothing in flight and {n} slow messages",
    )
    assert s("frames_out_total", type="ack") == n
    assert s("handler_latency_seconds", "_count") == n
    assert s("handler_latency_seconds", "_sum") >= 0.19 * n  # each sleeps 0.2 s
    assert s("handler_latency_seconds", "_bucket", le="0.1") == 0
    assert_not_down(busy, s)


# ------------------------------------------------------------------ 5. disconnects


def test_protocol_errors_and_disconnects(metrics: Metrics, clients: list[SpopClient]) -> None:
    before = metrics.scrape()
    assert before.labeled("disconnects_total") == {}
    assert before("protocol_errors_total") == 0

    bad = open_client(metrics, clients)
    bad.send((16381).to_bytes(4, "big"))  # LENGTH above the max-frame-size: refused at once
    assert disconnect_status(bad.wait_closed(5)) == Status.TOO_BIG
    s = metrics.wait(lambda s: s("protocol_errors_total") == 1, "a protocol error")
    assert s("disconnects_total", direction="out", status="3") == 1
    assert s("frames_out_total", type="agent-disconnect") == 1
    assert s("disconnects_total", direction="in", status="0") == 0

    c = open_client(metrics, clients)
    c.send(vector("haproxy-disconnect 0 normal"))
    assert disconnect_status(c.wait_closed(5)) == Status.NORMAL
    s2 = metrics.wait(
        lambda s: s("disconnects_total", direction="in", status="0") == 1,
        "HAPROXY-DISCONNECT counted",
    )
    assert s2("disconnects_total", direction="out", status="0") == 1
    assert s2("disconnects_total", direction="out", status="3") == 1
    assert s2("frames_in_total", type="haproxy-disconnect") == 1
    assert s2("frames_out_total", type="agent-disconnect") == 2
    assert s2("protocol_errors_total") == 1  # a goodbye is no error
    assert set(s2.labeled("disconnects_total")) == {
        (("direction", "in"), ("status", "0")),
        (("direction", "out"), ("status", "0")),
        (("direction", "out"), ("status", "3")),
    }
    s3 = metrics.wait(lambda s: s("connections_open") == 0, "both connections closed")
    assert_not_down(before, s2)
    assert_not_down(s2, s3)


# ------------------------------------------------------------------ 6. a worker killed


def test_counters_survive_a_killed_worker(metrics: Metrics, clients: list[SpopClient]) -> None:
    c1, c2 = open_client(metrics, clients), open_client(metrics, clients)
    send_fast(c1, 30)
    send_fast(c2, 12)
    n = 42
    before = metrics.wait(
        lambda s: s("messages_total", message="fast") == n and s("connections_open") == 2,
        f"{n} messages",
    )
    pids = metrics.pids()
    victim = owner_of(c1.sock, pids)
    assert victim is not None, pids
    survivors = [c for c in (c1, c2) if owner_of(c.sock, pids) != victim]
    psutil.Process(victim).kill()

    seen = [before]

    def monotonic(s: Scrape) -> None:
        assert_not_down(seen[-1], s)
        assert s("messages_total", message="fast") == n  # never lower, nothing new
        seen.append(s)

    s = metrics.wait(
        lambda s: (
            s("worker_restarts_total") == 1
            and s("workers_alive") == 2
            and s("connections_open") == len(survivors)
        ),
        "a replacement worker",
        each=monotonic,
    )
    assert len(seen) >= 2
    new_pids = metrics.pids()
    assert victim not in new_pids
    assert len(new_pids) == 2
    with pytest.raises(ConnectionClosedError):
        c1.read_frame(5)

    fast_traffic(metrics, clients, 5)
    after = metrics.wait_fast(n + 5, "new traffic")
    assert after("frames_in_total", type="notify") == n + 5
    assert after("handler_latency_seconds", "_count") == n + 5
    assert after("worker_restarts_total") == 1
    assert_not_down(s, after)


# ------------------------------------------------------------------ 7. reloads


def test_counters_survive_reloads_and_failed_reloads(
    metrics: Metrics, clients: list[SpopClient]
) -> None:
    c = fast_traffic(metrics, clients, 20)
    c.close()
    before = metrics.wait(
        lambda s: s("messages_total", message="fast") == 20 and s("connections_open") == 0,
        "20 messages, connection closed",
    )
    seen = [before]

    def monotonic(s: Scrape) -> None:
        assert_not_down(seen[-1], s)
        seen.append(s)

    s = reload_and_wait(metrics, 2, monotonic)
    assert_not_down(seen[-1], s)
    assert s("reloads_total") == 1
    assert s("reloads_failed_total") == 0
    assert s("generation") == 2
    assert s("messages_total", message="fast") == 20
    assert s("worker_restarts_total") == 0

    c = fast_traffic(metrics, clients, 7)
    s = metrics.wait_fast(27, "new traffic on top")
    assert s("frames_in_total", type="haproxy-hello") == 2
    assert s("handler_latency_seconds", "_count") == 27
    assert_not_down(seen[-1], s)

    # a failed reload: the module no longer imports
    pids = metrics.pids()
    metrics.app.write_text(BROKEN_APP)
    metrics.srv.signal(signal.SIGHUP)
    failed = metrics.wait(lambda s: s("reloads_failed_total") == 1, "a failed reload")
    assert failed("generation") == 2
    assert failed("reloads_total") == 1
    assert failed("workers_alive") == 2
    assert metrics.pids() == pids
    send_fast(c, 3, first_sid=100)  # the running workers keep serving and counting
    s2 = metrics.wait_fast(30, "traffic after it")
    assert s2("reloads_failed_total") == 1
    assert s2("generation") == 2
    assert_not_down(s, s2)


# ------------------------------------------------------------------ 8. handover


def open_three(mx: Metrics, clients: list[SpopClient]) -> list[SpopClient]:
    conns = [open_client(mx, clients) for _ in range(3)]
    for i, c in enumerate(conns):
        send_fast(c, i + 1)
    mx.wait(
        lambda s: s("connections_open") == 3 and s("messages_total", message="fast") == 6,
        "3 open connections",
    )
    return conns


def still_serving(mx: Metrics, conns: list[SpopClient]) -> None:
    for c in conns:
        send_fast(c, 2, first_sid=50)
    mx.wait_fast(6 + 2 * len(conns), "more traffic")


def test_connections_adopted_across_a_reload(metrics: Metrics, clients: list[SpopClient]) -> None:
    conns = open_three(metrics, clients)
    before = metrics.scrape()
    assert before("connections_adopted_total") == 0
    reload_and_wait(metrics, 2, lambda s: None)
    s = metrics.wait(
        lambda s: s("connections_adopted_total") == 3 and s("connections_open") == 3,
        "3 connections adopted",
    )
    assert s.labeled("negotiated_max_frame_size_connections") == {(("size", "16380"),): 3}
    assert_not_down(before, s)
    still_serving(metrics, conns)
    new_pids = metrics.pids()
    assert all(owner_of(c.sock, new_pids) in new_pids for c in conns)


def test_connections_handed_over_across_a_reload(
    metrics: Metrics, clients: list[SpopClient]
) -> None:
    open_three(metrics, clients)
    before = metrics.scrape()
    assert before("connections_handed_over_total") == 0
    reload_and_wait(metrics, 2, lambda s: None)
    metrics.wait(lambda s: s("connections_adopted_total") == 3, "3 connections adopted")
    # the old workers are reaped: their counts are final (a short grace all the same)
    s = metrics.wait(
        lambda s: s("connections_handed_over_total") == 3, "3 connections handed over", 1.5
    )
    assert_not_down(before, s)


def test_messages_just_before_a_reload_are_counted(
    metrics: Metrics, clients: list[SpopClient]
) -> None:
    c = fast_traffic(metrics, clients, 1)
    # polled fast: the scrape that first shows it follows that worker's heartbeat
    # closely, and the next one is about a second away
    metrics.wait_fast(1, "the first message")
    send_fast(c, 20, first_sid=2)
    reload_and_wait(metrics, 2, lambda s: None)  # the old workers are reaped
    metrics.wait_fast(21, "all 21 messages counted", 1.5)


# ------------------------------------------------------------------ 9. HTTP


def test_http_through_the_real_server(metrics: Metrics, clients: list[SpopClient]) -> None:
    status, headers, body = http_get(metrics.port, "/nope")
    assert status == 404
    assert body == b"not found: try /metrics\n"
    assert headers["Connection"] == "close"

    status, headers, body = http_get(metrics.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert int(headers["Content-Length"]) == len(body)
    first = Scrape(body.decode())

    status, headers, body = http_get(metrics.port, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"].startswith("text/plain; version=")

    # the answers follow the traffic; a 404 in between changes nothing
    fast_traffic(metrics, clients, 3)
    assert http_get(metrics.port, "/nope")[0] == 404
    s = metrics.wait_fast(3, "3 messages")
    assert s.text != first.text
    assert_not_down(first, s)

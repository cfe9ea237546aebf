"""Scale out: two spoa-mp instances behind one HAProxy agents backend (each
HAProxy binary found: 2.6, 3.2...).

HAProxy balances the SPOE connections over the servers of the agents backend
like any other backend (`balance roundrobin`), and `option spop-check` takes
a stopped agent out of the rotation; `option redispatch` with `retries 1`
sends a connection refused by a stopped agent to another one at once (HAProxy
3.x needs it, see the window below). The test:

1. two spoa-mp instances (`-n 1 -d`, the same reputation file) on two ports;
   one backend with `agent1` and `agent2` (`check inter 500ms fall 1 rise 1`);
2. once both are UP (L7OK), N requests from varied 127.x sources: every one
   is scored correctly, and each agent's debug log shows some of the NOTIFYs
   (they add up to N);
3. agent1 gets SIGTERM and exits 0 while clients keep sending requests, until
   HAProxy's check has marked it DOWN: what those requests got is measured
   and printed; only fail-open (a 200 with the score or an error, within the
   processing timeout) is asserted for them;
4. with agent1 DOWN, N more requests, several at a time: every one is scored
   correctly, agent2's log shows exactly N more NOTIFYs and HAProxy opened no
   connection to agent1.

The SPOE event is on-frontend-http-request, so every request sends a NOTIFY.
HAProxy 2.6 keeps SPOE connections (applets) per thread and reuses an idle
one: it balances connections, not messages. With one thread and one client
at a time every NOTIFY would go down the same connection, to one agent; the
config therefore pins `nbthread 2` (see PHASE1_CONCURRENCY).

Run with `-rP` (or `-s`) to see the measurements.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.haproxy import (
    AGENT_BACKEND,
    CHECK_TIMEOUT,
    HAProxy,
    HAProxyBinary,
    HAProxyConfig,
    HttpResponse,
    SpoeForm,
    agent_backend_mode,
    http_get,
    render_common_cfg,
    render_spoe_cfg,
    start_haproxy,
)
from support.processes import Process
from support.server import SpoaProcess
from support.waits import HOST, IO_TIMEOUT, wait_for

from .conftest import REPUTATION_LINES, SpoaFactory

pytestmark = pytest.mark.e2e

SERVERS = ("agent1", "agent2")
N = 120  # requests per phase
# Phase 1 sends one request at a time: HAProxy 2.6 hands client connections to
# its two threads in turn, each thread opens one SPOE connection and
# roundrobin sends them to agent1 and agent2, so the NOTIFYs split about
# evenly (several at a time, more connections are opened, and which of them
# the queued NOTIFYs go down depends on timing: splits from 60/60 to 111/9
# were seen). Phase 2 sends several at a time: new connections too must all
# go to agent2.
PHASE1_CONCURRENCY = 1
PHASE2_CONCURRENCY = 8
WINDOW_CLIENTS = 4  # clients sending back to back while agent1 stops
PROCESSING_MS = 3000  # SPOE `timeout processing`: generous on a loaded machine
FAST = 2.0  # s: at most one 1 s connect turn-around, no processing timeout
CHECK_INTER_MS = 500  # with fall 1: DOWN at most ~0.5 s after the port closes
UP = ("UP", "L7OK")  # (status, last check) in `show stat`; a server starts UP/INI
DOWN = ("DOWN", "L4CON")  # nothing listens any more
NOTIFY_LINE = re.compile(r": NOTIFY sid=\d+ fid=\d+ ")  # spoa-mp -d, one per NOTIFY
STAT_FIELDS = ("stot", "econ", "wretr", "wredis", "chkfail", "chkdown")


# ------------------------------------------------------------------ expected scores


def _reputation_table() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]:
    table = []
    for line in REPUTATION_LINES.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            table.append((ipaddress.ip_network(fields[0]), int(fields[1])))
    return table


REPUTATION = _reputation_table()


def expected_score(source: str) -> int:
    """Longest prefix match in the e2e reputation file (not spoa-mp's code)."""
    ip = ipaddress.ip_address(source)
    matches = [(net.prefixlen, score) for net, score in REPUTATION if ip in net]
    assert matches, f"{source} is not covered by the e2e reputation file"
    return max(matches)[1]


def sources() -> Iterator[str]:
    """Varied 127.x client addresses: the two listed /32s (5 and 95), hosts in
    127.1/16 (10) and hosts elsewhere in 127/8 (50), in turn."""
    for i in itertools.count():
        host = i % 200 + 1
        yield (
            "127.0.0.10",
            "127.0.0.20",
            f"127.1.{i % 250}.{host}",
            f"127.{2 + i % 250}.0.{host}",
        )[i % 4]


# ------------------------------------------------------------------ HAProxy with two agents


@dataclass
class ScaleOutConfig(HAProxyConfig):
    """The harness's config (same SPOE file, stats socket, `score` frontend)
    with several servers in the agents backend; `agent_port` is unused."""

    agent_ports: tuple[int, ...] = ()
    fall: int = 1
    rise: int = 1
    nbthread: int = 2

    def write(self) -> None:
        self.spoe_path.write_text(render_spoe_cfg(self))
        self.cfg_path.write_text(render_scale_out_cfg(self))


def render_scale_out_cfg(c: ScaleOutConfig) -> str:
    servers = "\n".join(
        f"    server {name} {HOST}:{port} check inter {c.check_inter_ms}ms"
        f" fall {c.fall} rise {c.rise}"
        for name, port in zip(SERVERS, c.agent_ports, strict=True)
    )
    return (
        render_common_cfg(c, f"    nbthread {c.nbthread}\n")
        + f"""
backend {AGENT_BACKEND}
    {agent_backend_mode(c.haproxy)}
    balance roundrobin
    option redispatch
    retries 1
    timeout connect 5s
    timeout server  3m
    option spop-check
{servers}
"""
    )


class ScaleOutHAProxy(HAProxy):
    """HAProxy on a ScaleOutConfig: one frontend, the servers' states by name."""

    FRONTENDS = ("score",)

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of agent1 and agent2."""
        return {
            r["svname"]: r
            for r in self.show_stat()
            if r["pxname"] == AGENT_BACKEND and r["svname"] in SERVERS
        }

    def wait_states(
        self, want: dict[str, tuple[str, str]], timeout: float = CHECK_TIMEOUT
    ) -> dict[str, dict[str, str]]:
        """Until every server named in `want` shows that (status, check_status)."""

        def matches() -> dict[str, dict[str, str]] | None:
            self.check_alive()
            rows = self.servers()
            got = {name: (rows[name]["status"], rows[name]["check_status"]) for name in want}
            return rows if got == want else None

        return wait_for(matches, timeout, f"agent servers {want}")

    def counters(self) -> str:
        """Per server: connections (stot), connection errors, retries,
        redispatches, failed checks, UP->DOWN transitions."""
        rows = self.servers()
        return "; ".join(
            f"{name} " + " ".join(f"{f}={rows[name][f] or 0}" for f in STAT_FIELDS)
            for name in SERVERS
        )


ScaleOutFactory = Callable[[tuple[int, ...]], ScaleOutHAProxy]


@pytest.fixture
def scale_out_haproxy(
    processes: list[Process], tmp_path: Path, socket_dir: Path, haproxy_bin: HAProxyBinary
) -> ScaleOutFactory:
    """Like conftest's haproxy_factory, for a backend of several agents."""

    def start(agent_ports: tuple[int, ...]) -> ScaleOutHAProxy:
        workdir = tmp_path / "haproxy-scale-out"
        workdir.mkdir()
        config = ScaleOutConfig(
            0,
            SpoeForm.HTTP_NAMED,  # `args ip=src`, on-frontend-http-request
            workdir,
            socket_dir,
            processing_timeout_ms=PROCESSING_MS,
            check_inter_ms=CHECK_INTER_MS,
            haproxy=haproxy_bin,
            agent_ports=agent_ports,
        )
        return start_haproxy(config, tmp_path, processes, ScaleOutHAProxy)

    return start


# ------------------------------------------------------------------ clients


def notifies(agent: SpoaProcess) -> int:
    """NOTIFY frames the agent's worker logged (`-d`: logged before the ACK
    is sent, so complete once the responses are in)."""
    return len(NOTIFY_LINE.findall(agent.stderr_path.read_text(errors="replace")))


@dataclass(frozen=True)
class Outcome:
    source: str
    sent: float  # time.monotonic() when the request started
    response: HttpResponse | None
    error: str = ""

    def _body(self) -> tuple[str, str] | None:
        if self.response is None or self.response.status != 200:
            return None
        try:
            return self.response.score()
        except AssertionError:
            return None

    @property
    def scored(self) -> bool:
        """A 200 with the right score and no error."""
        return self._body() == (str(expected_score(self.source)), "")

    @property
    def failed_open(self) -> bool:
        """A 200 without a score, `txn.iprep.error` set."""
        body = self._body()
        return body is not None and body[0] == "" and body[1].isdigit()

    def describe(self) -> str:
        if self.response is None:
            return f"no response ({self.error})"
        if self.scored:
            return "scored"
        body = self._body()
        if body is None:
            return f"status {self.response.status} body {self.response.body!r}"
        return f"score={body[0]!r} err={body[1]!r}"


def request(port: int, source: str) -> Outcome:
    sent = time.monotonic()
    try:
        return Outcome(source, sent, http_get(port, source))
    except (OSError, AssertionError) as e:
        return Outcome(source, sent, None, f"{type(e).__name__}: {e}")


def burst(port: int, count: int, concurrency: int) -> list[Outcome]:
    """`count` requests from varied sources, `concurrency` at a time."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda s: request(port, s), itertools.islice(sources(), count)))


def summarize(outcomes: list[Outcome]) -> str:
    kinds = Counter(o.describe() for o in outcomes)
    slowest = max((o.response.elapsed for o in outcomes if o.response), default=0.0)
    return f"{len(outcomes)} requests {dict(kinds)}, slowest {slowest * 1000:.0f} ms"


def assert_all_scored(outcomes: list[Outcome]) -> None:
    bad = [(o.source, o.describe()) for o in outcomes if not o.scored]
    assert not bad, f"{len(bad)} of {len(outcomes)} requests not scored correctly: {bad[:5]}"


class Background:
    """Clients sending requests back to back, from the `with` until its end."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sources = sources()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                source = next(self._sources)
            outcome = request(self.port, source)  # bounded by http_get's timeout
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Background:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=IO_TIMEOUT * 2)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"


# ------------------------------------------------------------------ the test


def test_two_agents_roundrobin_and_one_stops(
    spoa_factory: SpoaFactory, reputation_file: Path, scale_out_haproxy: ScaleOutFactory
) -> None:
    agent1 = spoa_factory(workers=1, reputation_file=reputation_file, debug=True)
    agent2 = spoa_factory(workers=1, reputation_file=reputation_file, debug=True)
    assert agent1.port != agent2.port
    haproxy = scale_out_haproxy((agent1.port, agent2.port))
    port = haproxy.config.score_port
    t0 = time.monotonic()
    haproxy.wait_states(dict.fromkeys(SERVERS, UP))
    report = [f"both UP (L7OK) {time.monotonic() - t0:.2f}s after HAProxy's socket answered"]

    # -- phase 1: both agents UP, both score
    t0 = time.monotonic()
    outcomes = burst(port, N, PHASE1_CONCURRENCY)
    elapsed = time.monotonic() - t0
    assert_all_scored(outcomes)
    served = {"agent1": notifies(agent1), "agent2": notifies(agent2)}
    report.append(
        f"phase 1: {N} requests ({PHASE1_CONCURRENCY} at a time) in {elapsed:.2f}s, all scored;"
        f" NOTIFYs agent1={served['agent1']} agent2={served['agent2']}"
    )
    report.append(f"  show stat: {haproxy.counters()}")
    assert served["agent1"] + served["agent2"] == N, served
    assert served["agent1"] > 0, served
    assert served["agent2"] > 0, served
    rows = haproxy.servers()
    assert int(rows["agent1"]["stot"]) > 0, rows["agent1"]  # roundrobin: a connection each
    assert int(rows["agent2"]["stot"]) > 0, rows["agent2"]

    # -- the window: agent1 stops while clients keep sending
    with Background(port, WINDOW_CLIENTS) as window:
        wait_for(lambda: len(window.outcomes) >= 50, IO_TIMEOUT, "traffic before the stop")
        t_term = time.monotonic()
        assert agent1.stop() == 0
        t_exit = time.monotonic()
        haproxy.wait_states({"agent1": DOWN, "agent2": UP})
        t_down = time.monotonic()
        count = len(window.outcomes)
        wait_for(lambda: len(window.outcomes) >= count + 50, IO_TIMEOUT, "traffic after DOWN")
    report.append(
        f"agent1: SIGTERM -> exit 0 in {(t_exit - t_term) * 1000:.0f} ms;"
        f" DOWN (L4CON) seen {(t_down - t_term) * 1000:.0f} ms after SIGTERM"
    )
    segments = {
        "before SIGTERM": (float("-inf"), t_term),
        "SIGTERM..exit": (t_term, t_exit),
        "exit..DOWN": (t_exit, t_down),
        "after DOWN": (t_down, float("inf")),
    }
    for label, (start, end) in segments.items():
        sent = [o for o in window.outcomes if start <= o.sent < end]
        report.append(f"  sent {label}: {summarize(sent)}")
    report.append(f"  show stat: {haproxy.counters()}")
    # fail-open at least: every request got a 200 with the score or an error,
    # within the processing timeout (the stopped agent never held one up)
    bad = [(o.source, o.describe()) for o in window.outcomes if not (o.scored or o.failed_open)]
    assert not bad, f"{len(bad)} of {len(window.outcomes)} requests not answered: {bad[:5]}"
    # and none waited for the processing timeout: HAProxy 3.x sends each
    # NOTIFY down a connection of its own stream, and a connect refused by the
    # stopped agent is retried on the same agent after a 1 s turn-around each
    # time (retries 3) until `timeout processing` fails the event; with
    # `option redispatch` and `retries 1` the one retry goes to the other
    # agent (after one turn-around: 1.0 s seen)
    slow = [
        (o.describe(), round(o.response.elapsed, 3))
        for o in window.outcomes
        if o.response and o.response.elapsed >= FAST
    ]
    assert not slow, slow

    # -- phase 2: agent1 DOWN, agent2 scores every request
    agent1_before = notifies(agent1)
    agent2_before = notifies(agent2)
    agent1_conns = haproxy.servers()["agent1"]["stot"]
    t0 = time.monotonic()
    outcomes = burst(port, N, PHASE2_CONCURRENCY)
    elapsed = time.monotonic() - t0
    assert_all_scored(outcomes)
    agent2_added = notifies(agent2) - agent2_before
    agent1_added = notifies(agent1) - agent1_before
    report.append(
        f"phase 2 (agent1 DOWN): {N} requests ({PHASE2_CONCURRENCY} at a time)"
        f" in {elapsed:.2f}s, all scored; NOTIFYs agent2 +{agent2_added}, agent1 +{agent1_added}"
    )
    report.append(f"  show stat: {haproxy.counters()}")
    assert agent2_added == N
    assert agent1_added == 0
    rows = haproxy.servers()
    assert rows["agent1"]["status"] == "DOWN"
    assert rows["agent1"]["stot"] == agent1_conns  # no new connection to agent1
    haproxy.check_alive()
    agent2.check_alive()
    print("\n".join(["", "scale-out measurements:", *report]))

"""The worker's plain-read path (Worker._dispatch_plain) end to end, and the
latency stamps it records (LatencyHistogram.observe_stamps).

A worker takes that path when every NOTIFY of a read carries one message, no
handler is `async def` and debug is off: the test app below has only plain
functions (one of them returns a coroutine, which the worker must notice). A
twin app with one `async def` handler more makes the same worker take the
general path (_dispatch); its ACKs are the reference.

Servers run as real process trees (tests/support/server.py) on 127.0.0.1;
every wait is bounded and polls a condition; nothing sleeps a fixed time.
The coroutine of the "late" handler waits for an asyncio.Event that a later
"open" message sets, so the tests decide when it completes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.server import Server
from support.spop_peer import Frame, SpopClient
from support.waits import HOST
from test_metrics_e2e import METRICS_LINE, Metrics, Scrape

from spoa_mp.codec import FrameType
from spoa_mp.metrics import LatencyHistogram
from spoa_mp.model import String

PLAIN_APP = """
import asyncio

from spoa_mp.agent import Agent
from spoa_mp.model import set_var, unset_var

agent = Agent("plainapp")
PREBUILT = set_var("txn", "prebuilt", 1)
_gates = {}


def _gate(key):
    return _gates.setdefault(key, asyncio.Event())


@agent.on_message("action")
def action(msg):
    return PREBUILT


@agent.on_message("fresh")
def fresh(msg):
    return set_var("txn", "fresh", msg[0])


@agent.on_message("pair")
def pair(msg):
    return (set_var("sess", "a", msg[0]), unset_var("txn", "b"))


@agent.on_message("listed")
def listed(msg):
    return [set_var("req", "s", msg["s"]), set_var("res", "n", -1)]


@agent.on_message("nothing")
def nothing(msg):
    return None


@agent.on_message("boom")
def boom(msg):
    raise ValueError("boom: the plain-path test handler fails on purpose")


@agent.on_message("text")
def text(msg):
    return "not an action"


async def _after_gate(key):
    await asyncio.wait_for(_gate(key).wait(), 30)
    return set_var("txn", "late", key)


async def _fail_soon():
    raise RuntimeError("late-boom: the awaitable fails on purpose")


@agent.on_message("late")
def late(msg):
    return _after_gate(msg[0])  # a plain function returning a coroutine


@agent.on_message("late-boom")
def late_boom(msg):
    return _fail_soon()


@agent.on_message("open")
def open_gate(msg):
    _gate(msg[0]).set()
    return set_var("txn", "opened", msg[0])
"""

# The same handlers and one coroutine handler: the worker takes _dispatch.
REFERENCE_APP = (
    PLAIN_APP
    + """

@agent.on_message("async-probe")
async def async_probe(msg):
    return None
"""
)

e2e = pytest.mark.e2e  # the server tests; the latency-stamp ones are plain unit tests

SET, UNSET = 1, 2
PROC, SESS, TXN, REQ, RES = range(5)
Msg = tuple[str, list[tuple[str, Any]]]

# name -> (message, the actions its ACK carries) for the synchronous handlers
SYNC_CASES: dict[str, tuple[Msg, list[tuple[int, int, str, Any]]]] = {
    "action": (("action", []), [(SET, TXN, "prebuilt", 1)]),
    "fresh": (("fresh", [("", 5)]), [(SET, TXN, "fresh", 5)]),
    "pair": (("pair", [("", 9)]), [(SET, SESS, "a", 9), (UNSET, TXN, "b", None)]),
    "listed": (("listed", [("s", "x")]), [(SET, REQ, "s", String(b"x")), (SET, RES, "n", -1)]),
    "nothing": (("nothing", []), []),
    "boom": (("boom", []), []),  # the handler raised: the stream still gets its ACK
    "text": (("text", []), []),  # not an Action: a handler failure
    "nobody": (("nobody", [("", 1)]), []),  # no handler: an empty ACK
}


def start_server(directory: Path, app: str, *args: str) -> Server:
    (directory / "plainapp.py").write_text(app)
    return Server(directory, "--app", "plainapp:agent", *args, workers=1)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("plain"), PLAIN_APP) as srv:
        yield srv
    print(f"----- {srv.name} stderr -----\n{srv.log()}")


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("reference"), REFERENCE_APP) as srv:
        yield srv
    print(f"----- {srv.name} stderr -----\n{srv.log()}")


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[Metrics]:
    """A plain-app server with --metrics on a port the OS picks."""
    srv = start_server(tmp_path, PLAIN_APP, "--metrics", f"{HOST}:0")
    with srv:
        m = METRICS_LINE.search(srv.log())
        assert m, f"no 'metrics on' line:\n{srv.log()}"
        mx = Metrics(srv, int(m[1]), tmp_path / "plainapp.py")
        mx.wait(lambda s: s("workers_alive") == 1, "1 worker alive")
        yield mx
    print(f"----- {srv.name} stderr -----\n{srv.log()}")


@pytest.fixture
def connect() -> Iterator[Any]:
    """connect(server): a client past its HAProxy 2.6 handshake, closed at teardown."""
    opened: list[SpopClient] = []

    def _connect(srv: Server) -> SpopClient:
        c = SpopClient(srv.port)
        opened.append(c)
        assert c.hello("haproxy-hello 2.6").type == FrameType.AGENT_HELLO
        return c

    yield _connect
    for c in opened:
        c.close()


def send_pipelined(c: SpopClient, notifies: list[tuple[int, int, Msg]]) -> None:
    """Every NOTIFY in one write (one read for the worker, as a rule)."""
    c.send(b"".join(c.notify_bytes(sid, fid, [msg]) for sid, fid, msg in notifies))


def ack_view(frames: list[Frame]) -> list[tuple[int, int, int, list[Any]]]:
    return [(f.type, f.sid, f.fid, f.actions) for f in frames]


# ------------------------------------------------------------------ latency stamps

BOUNDS = (1.0, 2.0, 5.0)  # seconds: whole numbers, so that intervals land on a bound exactly


def observed_one_by_one(stamps: list[float]) -> LatencyHistogram:
    h = LatencyHistogram(BOUNDS)
    for a, b in pairwise(stamps):
        h.observe(b - a)
    return h


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0, 1e6, allow_nan=False),
    st.lists(st.floats(0, 10, allow_nan=False), max_size=40),
)
def test_observe_stamps_counts_like_observe_of_each_interval(
    start: float, steps: list[float]
) -> None:
    stamps = [start]
    for step in steps:
        stamps.append(stamps[-1] + step)  # a clock that never goes back
    h = LatencyHistogram(BOUNDS)
    h.observe_stamps(stamps)
    want = observed_one_by_one(stamps)
    assert h.counts == want.counts
    assert math.isclose(h.sum, want.sum, rel_tol=1e-9, abs_tol=1e-6)


def test_observe_stamps_on_bounds_and_on_top_of_earlier_values() -> None:
    h = LatencyHistogram(BOUNDS)
    h.observe(3.0)
    h.observe_stamps([10.0, 11.0, 13.0, 18.0, 18.0, 30.0])  # 1, 2, 5, 0, 12
    assert h.counts == [2, 1, 2, 1]  # le=1 (1 and 0), le=2, le=5 (3 and 5), +Inf (12)
    assert h.sum == 23.0
    assert h.count == 6


@pytest.mark.parametrize(
    "stamps",
    [
        [],
        [4.0],
        [5.0, 4.0],
        [1.0, 3.0, 0.5],
        [0.0, 2.0, 1.0, 3.0],
        [0.0, math.inf],
        [0.0, math.nan],
        [math.nan, 1.0],
    ],
    ids=[
        "none", "one", "backwards", "backwards-overall", "back-in-the-middle",
        "infinite", "nan", "nan-first",
    ],
)  # fmt: skip
def test_observe_stamps_with_odd_clocks_matches_observe(stamps: list[float]) -> None:
    """Whatever the clock did, the batch counts what observe() would count
    interval by interval (it drops negative, infinite and NaN intervals)."""
    h = LatencyHistogram(BOUNDS)
    h.observe(1.5)
    h.observe_stamps(stamps)
    want = observed_one_by_one(stamps)
    want.observe(1.5)
    assert h.counts == want.counts
    assert math.isclose(h.sum, want.sum, rel_tol=1e-9)


# ------------------------------------------------------------------ ACKs of a plain read


def mixed_read(first_sid: int) -> list[tuple[int, int, Msg]]:
    """Every synchronous case twice, interleaved, with varied ids."""
    names = list(SYNC_CASES) * 2
    ids = [first_sid + 2 * i for i in range(len(names) - 1)] + [2**64 - 1]
    return [
        (sid, i % 7 + 1, SYNC_CASES[name][0])
        for i, (sid, name) in enumerate(zip(ids, names, strict=True))
    ]


def expected_acks(notifies: list[tuple[int, int, Msg]]) -> list[tuple[int, int, int, list[Any]]]:
    return [(FrameType.ACK, sid, fid, SYNC_CASES[msg[0]][1]) for sid, fid, msg in notifies]


@e2e
@pytest.mark.parametrize("name", list(SYNC_CASES))
def test_one_notify_per_read(plain_server: Server, connect: Any, name: str) -> None:
    c = connect(plain_server)
    for sid in (1, 3, 2**40):
        c.notify(sid, 2, [SYNC_CASES[name][0]])
        assert ack_view([c.read_frame()]) == [(FrameType.ACK, sid, 2, SYNC_CASES[name][1])]


@e2e
def test_mixed_names_in_one_pipelined_read(plain_server: Server, connect: Any) -> None:
    c = connect(plain_server)
    notifies = mixed_read(first_sid=1)
    send_pipelined(c, notifies)
    assert ack_view(c.read_frames(len(notifies))) == expected_acks(notifies)
    # the connection goes on, and the prebuilt Action encodes the same every time
    send_pipelined(c, notifies[:3])
    assert ack_view(c.read_frames(3)) == expected_acks(notifies[:3])


@e2e
def test_plain_path_acks_like_the_general_path(
    plain_server: Server, reference_server: Server, connect: Any
) -> None:
    notifies = mixed_read(first_sid=100)
    seen = []
    for srv in (plain_server, reference_server):
        c = connect(srv)
        send_pipelined(c, notifies)
        seen.append(ack_view(c.read_frames(len(notifies))))
    assert seen[0] == seen[1] == expected_acks(notifies)


@e2e
def test_a_coroutine_from_a_plain_function_is_awaited_without_holding_up_the_read(
    plain_server: Server, connect: Any
) -> None:
    c = connect(plain_server)
    send_pipelined(
        c,
        [
            (1, 1, ("late", [("", 1001)])),
            (2, 1, SYNC_CASES["action"][0]),
            (3, 1, SYNC_CASES["fresh"][0]),
            (4, 1, ("late", [("", 1002)])),
            (5, 1, ("late-boom", [])),
            (6, 1, SYNC_CASES["boom"][0]),
        ],
    )
    # the synchronous ones at once, in order; the failed awaitable's ACK (empty)
    # after those of its read (6 may come after it if the write was split)
    first = c.read_frames(4)
    assert ack_view(first[:2]) == [
        (FrameType.ACK, 2, 1, SYNC_CASES["action"][1]),
        (FrameType.ACK, 3, 1, SYNC_CASES["fresh"][1]),
    ]
    assert sorted(ack_view(first[2:])) == [(FrameType.ACK, 5, 1, []), (FrameType.ACK, 6, 1, [])]
    # each late ACK comes once its awaitable completes: after the ACK of the
    # message that lets it complete (an earlier ACK would come first)
    c.notify(7, 1, [("open", [("", 1002)])])
    assert ack_view(c.read_frames(2)) == [
        (FrameType.ACK, 7, 1, [(SET, TXN, "opened", 1002)]),
        (FrameType.ACK, 4, 1, [(SET, TXN, "late", 1002)]),
    ]
    c.notify(8, 1, [("open", [("", 1001)])])
    assert ack_view(c.read_frames(2)) == [
        (FrameType.ACK, 8, 1, [(SET, TXN, "opened", 1001)]),
        (FrameType.ACK, 1, 1, [(SET, TXN, "late", 1001)]),
    ]


# ------------------------------------------------------------------ metrics


def counted(s: Scrape, names: list[str]) -> dict[str, float]:
    return {name: s("messages_total", message=name) for name in names}


@e2e
def test_metrics_count_plain_reads(metrics: Metrics, connect: Any) -> None:
    handled = ["action"] * 3 + ["fresh"] * 2 + ["pair", "listed", "nothing", "boom", "text"]
    notifies = [(2 * i + 1, 1, SYNC_CASES[name][0]) for i, name in enumerate(handled)]
    c = connect(metrics.srv)
    send_pipelined(c, notifies)
    assert ack_view(c.read_frames(len(notifies))) == expected_acks(notifies)
    c.notify(99, 1, [SYNC_CASES["action"][0]])  # a read of one NOTIFY, too
    assert ack_view([c.read_frame()]) == expected_acks([(99, 1, SYNC_CASES["action"][0])])

    n = len(handled) + 1
    s = metrics.wait(lambda s: s("frames_out_total", type="ack") == n, f"{n} ACKs counted")
    assert counted(s, sorted(set(handled))) == {
        "action": 4,
        "boom": 1,
        "fresh": 2,
        "listed": 1,
        "nothing": 1,
        "pair": 1,
        "text": 1,
    }
    assert s("handler_errors_total", message="boom") == 1
    assert s("handler_errors_total", message="text") == 1
    assert s("handler_errors_total", message="action") == 0
    assert s("frames_in_total", type="notify") == n
    assert s("handler_latency_seconds", "_count") == n
    assert s("handler_latency_seconds", "_bucket", le="+Inf") == n
    assert s("handler_latency_seconds", "_sum") > 0


@e2e
def test_unhandled_messages_add_no_handler_latency(metrics: Metrics, connect: Any) -> None:
    notifies = [(1, 1, SYNC_CASES["action"][0]), (3, 1, SYNC_CASES["nobody"][0])]
    c = connect(metrics.srv)
    send_pipelined(c, notifies)
    assert ack_view(c.read_frames(2)) == expected_acks(notifies)
    c.notify(5, 1, [SYNC_CASES["nobody"][0]])  # and alone in its read
    assert ack_view([c.read_frame()]) == expected_acks([(5, 1, SYNC_CASES["nobody"][0])])
    s = metrics.wait(lambda s: s("frames_out_total", type="ack") == 3, "3 ACKs counted")
    assert s.labeled("messages_total") == {(("message", "action"),): 1}  # nobody: not counted
    assert s("handler_latency_seconds", "_count") == 1


@e2e
def test_a_late_handler_is_observed_once(metrics: Metrics, connect: Any) -> None:
    c = connect(metrics.srv)
    c.notify(1, 1, [("late", [("", 7)])])
    c.notify(2, 1, [("open", [("", 7)])])
    assert ack_view(c.read_frames(2)) == [
        (FrameType.ACK, 2, 1, [(SET, TXN, "opened", 7)]),
        (FrameType.ACK, 1, 1, [(SET, TXN, "late", 7)]),
    ]
    s = metrics.wait(lambda s: s("frames_out_total", type="ack") == 2, "2 ACKs counted")
    assert counted(s, ["late", "open"]) == {"late": 1, "open": 1}
    assert s("handler_latency_seconds", "_count") == 2

"""The load generator (`spoa-mp bench`, csrc/loadgen.c) against small in-test agents.

Each agent is a thread on 127.0.0.1 (or a unix socket) that runs the real
protocol core (`AgentConnection`) with `selectors`, and can misbehave on
purpose: wrong ids in its ACKs, closing after a few NOTIFYs, sending
AGENT-DISCONNECT, refusing pipelining. Every run is bounded (about a second).
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from spoa_mp import bench
from spoa_mp.model import set_var
from spoa_mp.protocol import AgentConnection, AgentSettings, HandshakeDone

SCORE = [set_var("sess", "ip_score", 42)]
ffi, lib = bench.ffi, bench.lib  # the cffi module that holds the generator


@dataclass
class AgentStats:
    notifies: int = 0
    sids: list[list[int]] = field(default_factory=list)  # per connection, in arrival order
    fids: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # "ipv4" / "ipv6" / "other"
    names: Counter[str] = field(default_factory=Counter)
    max_outstanding: int = 0  # NOTIFYs received but not yet answered, per connection
    handshakes: list[Any] = field(default_factory=list)
    connections: int = 0


class MiniAgent(threading.Thread):
    """A one-thread SPOP agent; `mode` picks its behaviour:

    ok          answer every NOTIFY with set-var(sess.ip_score, 42)
    wrong_ids   answer with the stream-id + 1000 (never issued)
    close       close the connection after `after` NOTIFYs, without answering
    disconnect  send AGENT-DISCONNECT(status 99) after `after` NOTIFYs
    """

    def __init__(
        self,
        mode: str = "ok",
        after: int = 3,
        unix: Path | None = None,
        settings: AgentSettings | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(daemon=True)
        self.mode, self.after, self.settings = mode, after, settings
        if unix:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(unix))
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.bind((host, 0))
            self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.stats = AgentStats()
        self._halt = threading.Event()

    def __enter__(self) -> MiniAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(5)
        assert not self.is_alive()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        try:
            while not self._halt.is_set():
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        self._accept(sel)
                    else:
                        self._serve(sel, key.fileobj, key.data)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        sock.settimeout(2)
        conn = AgentConnection(self.settings)
        self.stats.sids.append([])
        self.stats.connections += 1
        sel.register(sock, selectors.EVENT_READ, [conn, len(self.stats.sids) - 1, 0])

    def _close(self, sel: selectors.BaseSelector, sock: Any) -> None:
        sel.unregister(sock)
        sock.close()

    def _serve(self, sel: selectors.BaseSelector, sock: Any, data: list[Any]) -> None:
        conn, index, seen = data
        try:
            chunk = sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._close(sel, sock)
            return
        notes = conn.receive(chunk)
        for ev in conn.take_events():
            if isinstance(ev, HandshakeDone):
                self.stats.handshakes.append(ev.handshake)
        st = self.stats
        st.max_outstanding = max(st.max_outstanding, len(notes))
        replies = []
        for sid, fid, msgs in notes:
            st.notifies += 1
            st.sids[index].append(sid)
            st.fids[fid] += 1
            for m in msgs:
                st.names[m.name] += 1
                ip = m[0]
                st.kinds["ipv4" if isinstance(ip, IPv4Address) else
                         "ipv6" if isinstance(ip, IPv6Address) else "other"] += 1  # fmt: skip
            seen += 1
            if self.mode == "wrong_ids":
                replies.append((sid + 1000, fid, SCORE))
            else:
                replies.append((sid, fid, SCORE))
        data[2] = seen
        if self.mode == "close" and seen >= self.after:
            self._close(sel, sock)
            return
        if self.mode == "disconnect" and seen >= self.after:
            conn.disconnect(99, "going away")
        else:
            conn.ack(replies)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if conn.closing:
            self._close(sel, sock)


def bench_args(agent: MiniAgent, *extra: str) -> list[str]:
    return ["-p", str(agent.port), "--warmup", "0", "--drain", "0.3", "--seed", "7", *extra]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = bench.main([*argv, "--json"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)


def quick(agent: MiniAgent, **kw: Any) -> bench.BenchResult:
    settings = {"port": agent.port, "warmup": 0.0, "drain": 0.3, "seed": 1, "duration": 0.5}
    settings.update(kw)
    return bench.run(bench.BenchConfig(**settings))


# ------------------------------------------------------------------ happy path


def test_against_agent_json(capsys: pytest.CaptureFixture[str]) -> None:
    with MiniAgent() as agent:
        code, r = run_json(capsys, bench_args(agent, "-d", "1", "-c", "2", "-P", "4"))
    assert code == 0
    assert r["messages"] > 0
    assert r["errors"] == 0
    assert not any(r["errors_by_kind"].values())
    lat = r["latency_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert 0.9 < r["duration"] < 1.5
    assert r["msg_per_s"] == pytest.approx(r["messages"] / r["duration"])
    assert r["sent"] == r["acked"]  # every NOTIFY was answered (the drain took the rest)
    assert r["connections_ready"] == 2
    assert r["max_frame_size"] == 16380
    assert 0 <= r["cpu_percent"] < 400
    # what the agent saw: HAProxy's HELLO and one message per NOTIFY
    hs = agent.stats.handshakes
    assert len(hs) == 2
    assert all(h.haproxy_capabilities == ("pipelining", "async") for h in hs)
    assert all(len(h.engine_id) == 36 for h in hs)
    assert hs[0].engine_id == hs[1].engine_id  # one engine per run
    assert agent.stats.names == Counter({"check-client-ip": agent.stats.notifies})
    assert agent.stats.notifies == r["sent"]
    assert r["config"]["seed"] == 7
    assert r["config"]["in_flight"] == 4


def test_table_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    with MiniAgent() as agent:
        code = bench.main(bench_args(agent, "-d", "1.2"))
    out, err = capsys.readouterr()
    assert code == 0
    for label in ("messages", "throughput", "latency p50", "latency p99", "latency p99.9",
                  "latency max", "errors", "generator CPU"):  # fmt: skip
        assert label in out
    assert "% of a core" in out
    assert "msg/s" in err  # at least one progress line on stderr
    assert "errors" in err


def test_quiet_has_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    with MiniAgent() as agent:
        code = bench.main(bench_args(agent, "-d", "1.2", "-q"))
    out, err = capsys.readouterr()
    assert code == 0
    assert "throughput" in out
    assert err == ""


def test_unix_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.sock"
    with MiniAgent(unix=path):
        code, r = run_json(capsys, ["--unix", str(path), "-d", "0.5", "--warmup", "0"])
    assert code == 0
    assert r["target"] == f"unix:{path}"
    assert r["messages"] > 0
    assert r["errors"] == 0


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        agent = MiniAgent(host="::1")
    except OSError:
        pytest.skip("::1 is not configured")
    with agent:
        code, r = run_json(capsys, ["--host", "::1", *bench_args(agent, "-d", "0.3")])
    assert code == 0
    assert r["target"] == f"[::1]:{agent.port}"
    assert r["messages"] > 0


def test_sids_3x_per_connection_odd() -> None:
    with MiniAgent() as agent:
        r = quick(agent, connections=3, in_flight=1, duration=0.3)
    assert r.errors == 0
    assert agent.stats.fids.keys() == {1}
    for sids in agent.stats.sids:
        assert sids == list(range(1, 2 * len(sids), 2))  # 1, 3, 5... on every connection


def test_sids_26_one_counter() -> None:
    with MiniAgent() as agent:
        r = quick(agent, connections=3, in_flight=2, duration=0.3, sids="2.6")
    assert r.errors == 0
    assert agent.stats.fids.keys() == {1}
    every = sorted(s for sids in agent.stats.sids for s in sids)
    assert every == list(range(len(every)))  # 0, 1, 2... shared, no duplicate
    for sids in agent.stats.sids:
        assert sids == sorted(sids)


@pytest.mark.parametrize(("percent", "low", "high"), [(0, 0, 0), (100, 1, 1), (30, 0.2, 0.4)])
def test_ipv6_percent(percent: int, low: float, high: float) -> None:
    with MiniAgent() as agent:
        r = quick(agent, duration=0.3, ipv6_percent=percent, in_flight=4)
    assert r.errors == 0
    kinds = agent.stats.kinds
    assert kinds["other"] == 0
    total = kinds["ipv4"] + kinds["ipv6"]
    assert total > 0
    assert low <= kinds["ipv6"] / total <= high


def test_in_flight_is_respected() -> None:
    with MiniAgent() as agent:
        r = quick(agent, connections=1, in_flight=1, duration=0.3)
    assert r.errors == 0
    assert agent.stats.max_outstanding == 1  # strictly request/response
    with MiniAgent() as agent:
        r = quick(agent, connections=1, in_flight=8, duration=0.3)
    assert r.errors == 0
    assert 1 <= agent.stats.max_outstanding <= 8


def test_agent_without_pipelining_gets_one_in_flight() -> None:
    with MiniAgent(settings=AgentSettings(pipelining=False)) as agent:
        r = quick(agent, connections=2, in_flight=8, duration=0.3)
    assert r.errors == 0
    assert r.no_pipelining == 2
    assert agent.stats.max_outstanding == 1


def test_message_count_stops_the_run() -> None:
    with MiniAgent() as agent:
        r = quick(agent, duration=30.0, messages=500, in_flight=4)
    assert r.errors == 0
    assert r.messages == 500
    assert r.sent == 500
    assert r.duration < 10


# ------------------------------------------------------------------ errors


def test_wrong_ids_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with MiniAgent(mode="wrong_ids") as agent:
        code, r = run_json(capsys, bench_args(agent, "-d", "0.5", "-c", "2", "-P", "2"))
    assert code == 1
    assert r["messages"] == 0
    assert r["errors_by_kind"]["ack_unknown"] == agent.stats.notifies == 4
    assert r["errors_by_kind"]["unanswered"] == 4  # nothing matched: all left after the drain
    assert r["errors"] == 8


def test_closing_agent_is_an_error_without_hang(capsys: pytest.CaptureFixture[str]) -> None:
    with MiniAgent(mode="close", after=3) as agent:
        t0 = time.monotonic()
        code, r = run_json(capsys, bench_args(agent, "-d", "5", "-c", "2", "-P", "1"))
        elapsed = time.monotonic() - t0
    assert code == 1
    assert r["errors_by_kind"]["closed"] == 2
    assert r["errors_by_kind"]["unanswered"] == 2  # the NOTIFY each connection was waiting on
    assert elapsed < 3  # every connection gone: the run ends early


def test_agent_disconnect_is_recorded() -> None:
    with MiniAgent(mode="disconnect", after=2) as agent:
        r = quick(agent, connections=1, duration=2.0)
    assert r.errors_by_kind["disconnect"] == 1
    assert r.last_status == 99
    assert r.last_message == "going away"
    assert r.duration < 1.5


def test_connection_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = bench.run(bench.BenchConfig(port=port, warmup=0, duration=1.0, connections=2))
    assert r.errors_by_kind["connect"] == 2
    assert r.messages == 0
    assert r.last_errno is not None
    assert r.wall < 1.0


def test_silent_agent_hello_timeout() -> None:
    with socket.socket() as s:  # accepts (backlog) but never answers the HELLO
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        r = bench.run(
            bench.BenchConfig(port=s.getsockname()[1], warmup=0, duration=0.3, connections=2)
        )
    assert r.errors_by_kind["hello"] == 2
    assert r.messages == 0


AGENT_HELLO = bytes.fromhex(  # spop.md vector 4: version 2.0, max-frame-size 16380, no caps
    "00000036650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a65"
    "03fcf0060c6361706162696c69746965730800"
)


class RawAgent(threading.Thread):
    """Answers the first bytes of each connection with `reply`, then stays silent."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(daemon=True)
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self._halt = threading.Event()
        self.received: list[bytes] = []

    def __enter__(self) -> RawAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(5)

    def run(self) -> None:
        socks = []
        while not self._halt.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(2)
            self.received.append(sock.recv(65536))
            sock.sendall(self.reply)
            socks.append(sock)
        for sock in socks:
            sock.close()
        self.listener.close()


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (AGENT_HELLO.replace(b"2.0", b"1.0"), 8),  # unsupported version
        (AGENT_HELLO.replace(bytes.fromhex("fcf006"), bytes.fromhex("f0f106")), 9),  # 16384
        (AGENT_HELLO.replace(b"version", b"vers1on"), 5),  # no version
        (AGENT_HELLO[:9] + b"\x05" + AGENT_HELLO[10:], 4),  # stream-id 5
    ],
    ids=["version-1.0", "max-frame-size-16384", "no-version", "stream-id-5"],
)
def test_bad_agent_hello(reply: bytes, status: int) -> None:
    with RawAgent(reply) as agent:
        r = quick(agent, connections=2, duration=2.0)
    assert r.errors_by_kind["hello"] == 2
    assert r.errors == 2
    assert r.last_status == status
    assert r.messages == 0
    assert r.duration < 1.5  # both connections gone: no need to wait
    hello = agent.received[0]  # what HAProxy 2.6 sends, engine-id aside
    assert hello[4] == 1  # HAPROXY-HELLO
    assert b"supported-versions\x08\x032.0" in hello
    assert b"max-frame-size\x03\xfc\xf0\x06" in hello
    assert b"capabilities\x08\x10pipelining,async" in hello


def test_frame_too_big_is_malformed() -> None:
    too_big = (16381).to_bytes(4, "big") + b"\x67" + b"\x00" * 16380
    with RawAgent(AGENT_HELLO + too_big) as agent:
        r = quick(agent, connections=1, duration=2.0)
    assert r.errors_by_kind["malformed"] == 1
    assert r.last_status == 3  # frame too big
    # a NOTIFY sent between the HELLO and the bad frame is lost with the connection
    assert r.errors_by_kind["unanswered"] == r.sent <= 1


def test_unexpected_frame_types_are_counted() -> None:
    notify = bytes.fromhex("0000001e030000000101010f636865636b2d636c69656e742d69700100067f000001")
    with RawAgent(AGENT_HELLO + notify) as agent:
        r = quick(agent, connections=1, duration=0.3)
    assert r.errors_by_kind["unexpected"] == 1  # a NOTIFY from the agent, skipped
    assert r.errors_by_kind["unanswered"] == 1  # RawAgent never answers


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", "10.0.0.1"],
        ["--host", "192.168.1.1"],
        ["--host", "example.com"],
        ["--host", "127.0.0.2"],
        ["--host", "::2"],
        ["-c", "0"],
        ["-P", "0"],
        ["-P", "5000"],
        ["--ipv6-percent", "101"],
        ["-d", "0"],
        ["-p", "70000"],
        ["--sids", "4.0"],
        ["--seed", "-1"],
        ["--warmup", "-1"],
        ["--bogus"],
        ["-c", "many"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1  # one line
    assert err.startswith("spoa-mp bench: error:")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--help"]) == 0
    assert "--in-flight" in capsys.readouterr().out


def test_localhost_names() -> None:
    assert bench.loopback_host("localhost") == "127.0.0.1"
    assert bench.loopback_host("::1") == "::1"
    with pytest.raises(ValueError, match="refusing"):
        bench.loopback_host("8.8.8.8")


# ------------------------------------------------------------------ the C API itself


def _open(**fields: Any) -> tuple[int, Any, Any]:
    cfg = ffi.new("spop_lg_config *")
    keep = []
    defaults = {"port": 9, "connections": 1, "in_flight": 1, "duration_ns": 10**6}
    for name, value in {**defaults, **fields}.items():
        if isinstance(value, str):
            keep.append(ffi.new("char[]", value.encode()))
        setattr(cfg, name, keep[-1] if isinstance(value, str) else value)
    res = ffi.new("spop_lg_result *")
    mem = ffi.new("char[]", lib.spop_lg_state_size())
    st = ffi.cast("spop_lg_state *", mem)
    rc = lib.spop_lg_open(st, cfg, res)
    lib.spop_lg_close(st)
    lib.spop_lg_close(st)  # idempotent
    return rc, res, mem


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "0.0.0.0", "127.0.0.2", "::", "::2", "fe80::1", "localhost", ""]
)
def test_c_refuses_non_loopback(host: str) -> None:
    rc, _, _ = _open(host=host)
    assert rc == lib.SPOP_LG_E_ADDR


@pytest.mark.parametrize(
    "fields",
    [
        {"connections": 0},
        {"in_flight": 0},
        {"in_flight": 1025},
        {"ipv6_percent": 101},
        {"duration_ns": 0},
        {"port": 0},
        {"max_frame_size": 100},
        {"sid_style": 7},
    ],
)
def test_c_refuses_bad_config(fields: dict[str, Any]) -> None:
    rc, _, _ = _open(host="127.0.0.1", **fields)
    assert rc == lib.SPOP_LG_E_ARG


def test_c_run_before_open() -> None:
    mem = ffi.new("char[]", lib.spop_lg_state_size())
    st = ffi.cast("spop_lg_state *", mem)
    assert lib.spop_lg_run(st, 1000) == lib.SPOP_LG_E_STATE
    lib.spop_lg_close(st)


def test_histogram_buckets_within_half_a_percent() -> None:
    previous = -1
    for i in range(lib.SPOP_LG_HIST_BUCKETS):
        value = lib.spop_lg_hist_value(i)
        assert value > previous  # increasing
        previous = value
        assert lib.spop_lg_hist_index(value) == i  # the midpoint is in its own bucket
    for ns in (1, 127, 128, 999, 1000, 12345, 10**6, 987654321, 10**10, 3 * 10**10):
        mid = lib.spop_lg_hist_value(lib.spop_lg_hist_index(ns))
        assert abs(mid - ns) <= ns * 0.004 + 0.5
    assert lib.spop_lg_hist_index(2**62) == lib.SPOP_LG_HIST_BUCKETS - 1


def test_percentiles_exact_to_one_percent() -> None:
    res = ffi.new("spop_lg_result *")
    values = [1000 + 37 * i for i in range(100_000)]  # 1 us .. 3.7 ms, uniform
    for v in values:
        res.hist[lib.spop_lg_hist_index(v)] += 1
    res.lat_count, res.lat_min_ns, res.lat_max_ns = len(values), values[0], values[-1]
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = values[int(q * len(values)) - 1]
        assert lib.spop_lg_percentile(res, q) == pytest.approx(exact, rel=0.01)
    assert lib.spop_lg_percentile(res, 1.0) == values[-1]
    assert lib.spop_lg_percentile(res, 0.0) == values[0]
    assert lib.spop_lg_percentile(ffi.new("spop_lg_result *"), 0.5) == 0

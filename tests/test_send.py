"""spoa-mp send: argument typing, and real exchanges with spoa-mp, HAProxy's example
agent and a scripted peer that refuses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from support.processes import Process
from support.server import Server
from support.waits import free_port, wait_for

from spoa_mp import send
from spoa_mp.codec import Encoder, FrameType, Status
from spoa_mp.model import Int64, String, UInt32, UInt64

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_AGENT = ROOT.parent / "shared" / "bin" / "spoa-example"


def run_send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa_mp", "send", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# ---------------------------------------------------------------- typing


@pytest.mark.parametrize(
    ("token", "name", "value"),
    [
        ("ip=10.0.0.1", "ip", IPv4Address("10.0.0.1")),
        ("10.0.0.1", "", IPv4Address("10.0.0.1")),
        ("=2001:db8::1", "", IPv6Address("2001:db8::1")),
        ("n=42", "n", 42),
        ("n=-7", "n", -7),
        ("flag=true", "flag", True),
        ("flag=false", "flag", False),
        ("x=null", "x", None),
        ("s=hello world", "s", String(b"hello world")),
        ("s=1.2.3", "s", String(b"1.2.3")),
        ("s=a=b", "s", String(b"a=b")),
        ("s:str=42", "s", String(b"42")),
        ("n:int64=5", "n", Int64(5)),
        ("n:uint64=0x10", "n", UInt64(16)),
        ("n:uint32=7", "n", UInt32(7)),
        ("b:bin=00ff", "b", b"\x00\xff"),
        ("a:ipv4=192.0.2.1", "a", IPv4Address("192.0.2.1")),
        ("x:bool=TRUE", "x", True),
        ("x:null=", "x", None),
    ],
)
def test_argument_types(token: str, name: str, value: object) -> None:
    got_name, got = send.parse_argument(token)
    assert (got_name, got, type(got)) == (name, value, type(value))


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("x:wat=1", "unknown type 'wat'"),
        ("x:int32=99999999999", "bad int32 value"),
        ("x:ipv4=::1", "bad ipv4 value"),
        ("x:bin=zz", "bad bin value"),
        ("x:bool=yes", "bad bool value"),
    ],
)
def test_bad_arguments(token: str, reason: str) -> None:
    with pytest.raises(send.UsageError, match=reason):
        send.parse_argument(token)


def test_usage_errors_exit_2() -> None:
    for argv in (["--healthcheck", "msg"], [], ["msg", "x:wat=1"], ["--port", "70000", "m"]):
        r = run_send(*argv)
        assert r.returncode == 2, argv
        assert r.stderr.startswith("spoa-mp send: error: "), r.stderr
        assert len(r.stderr.splitlines()) == 1


def test_refused_exits_1() -> None:
    port = free_port()
    r = run_send("-p", str(port), "--json", "check-client-ip", "10.0.0.1")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert "cannot connect" in out["error"]


# ---------------------------------------------------------------- against spoa-mp


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    rep = tmp_path_factory.mktemp("send") / "rep.txt"
    rep.write_text("192.0.2.0/24 42\n2001:db8::/32 77\n")
    with Server(rep.parent, "--reputation-file", str(rep), workers=1) as srv:
        yield srv


@pytest.mark.e2e
def test_ack_from_spoa_mp_text(server: Server) -> None:
    r = run_send("-p", str(server.port), "check-client-ip", "192.0.2.9")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "ack stream 1 frame 1: 1 action(s)",
        "  set-var(sess.ip_score) = 42 (uint32)",
    ]


@pytest.mark.e2e
def test_ack_from_spoa_mp_json(server: Server) -> None:
    r = run_send("-p", str(server.port), "--json", "check-client-ip", "ip=2001:db8::5", "n=1")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert out["hello"]["frame"] == "agent-hello"
    assert out["hello"]["kv"]["version"] == "2.0"
    assert out["answer"]["frame"] == "ack"
    assert (out["answer"]["stream_id"], out["answer"]["frame_id"]) == (1, 1)
    assert out["answer"]["actions"] == [
        {"action": "set-var", "scope": "sess", "name": "ip_score", "type": "uint32", "value": 77}
    ]
    assert out["elapsed_ms"] > 0


@pytest.mark.e2e
def test_unknown_message_gets_an_empty_ack(server: Server) -> None:
    r = run_send("-p", str(server.port), "--json", "no-such-message", "x=1")
    assert r.returncode == 0
    assert json.loads(r.stdout)["answer"]["actions"] == []


@pytest.mark.e2e
def test_healthcheck_against_spoa_mp(server: Server) -> None:
    r = run_send("-p", str(server.port), "--healthcheck")
    assert (r.returncode, r.stdout.strip()) == (0, "SPOA server is ok")


@pytest.mark.e2e
def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "spoa.sock"
    with Server(tmp_path, "--unix", str(path), workers=1, wait=False) as srv:

        def ready() -> bool:
            srv.check_alive()
            return bool(srv.ready_lines())

        wait_for(ready, 15.0, "the worker to be ready")
        r = run_send("--unix", str(path), "--json", "check-client-ip", "10.0.0.1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["answer"]["actions"][0]["name"] == "ip_score"


# ---------------------------------------------------------------- HAProxy's example agent


@pytest.fixture
def example_agent(tmp_path: Path) -> Iterator[int]:
    if not os.access(EXAMPLE_AGENT, os.X_OK):
        pytest.skip(f"HAProxy's example agent is not at {EXAMPLE_AGENT}")
    port = free_port()
    proc = Process("spoa-example", [str(EXAMPLE_AGENT), "-p", str(port), "-n", "1"], tmp_path)
    try:
        proc.wait_accepting(port, 10.0)
        yield port
    finally:
        proc.kill()


@pytest.mark.e2e
def test_ack_from_example_agent(example_agent: int) -> None:
    r = run_send("-p", str(example_agent), "--json", "check-client-ip", "ip=10.0.0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    (action,) = json.loads(r.stdout)["answer"]["actions"]
    assert action["name"] == "ip_score"
    assert action["type"] == "uint32"
    assert 0 <= action["value"] <= 100


@pytest.mark.e2e
def test_healthcheck_against_example_agent(example_agent: int) -> None:
    r = run_send("-p", str(example_agent), "--healthcheck", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["check"] == "SPOA server is ok"


# ---------------------------------------------------------------- a peer that refuses


@pytest.fixture
def refusing_peer() -> Iterator[int]:
    """Answers any HELLO with AGENT-DISCONNECT status 8 (bad version), then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    frame = Encoder().kv_frame(
        FrameType.AGENT_DISCONNECT, 0, 0,
        kv=[("status-code", UInt32(Status.BAD_VERSION)), ("message", "unsupported version")],
    )  # fmt: skip

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(frame)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=10)


def test_agent_disconnect_is_printed_and_exits_1(refusing_peer: int) -> None:
    r = run_send("-p", str(refusing_peer), "check-client-ip", "10.0.0.1")
    assert r.returncode == 1
    assert r.stdout.strip() == "agent-disconnect: status 8: unsupported version"
    r = run_send("-p", str(refusing_peer), "--healthcheck")
    assert r.returncode == 1
    assert "status 8" in r.stdout

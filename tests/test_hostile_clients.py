"""Hostile clients against a real spoa-mp: connections that never say HELLO
are closed after --hello-timeout, and beyond --max-connections a new one is
closed at accept, while a client doing real work beside them sees no error."""

from __future__ import annotations

import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import Server
from support.spop_peer import SpopClient
from support.waits import HOST, wait_for
from test_server import assert_ip_score_ack, ip_msg

from spoa_mp.codec import FrameType

IDLE = 3000  # idle connections (the target)


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed it: readable, and a read gives EOF (or a reset).
    (poll, not select: descriptors past 1024 are fine)"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    with Server(tmp_path, *request.param, workers=1) as srv:
        yield srv
        print(srv.log())


def working_client(port: int) -> SpopClient:
    c = SpopClient(port)
    assert c.hello("haproxy-hello 2.6").type == FrameType.AGENT_HELLO
    return c


def exchange(c: SpopClient, sid: int) -> None:
    c.notify(sid, 1, ip_msg(sid))
    assert_ip_score_ack(c.read_frame())


@pytest.mark.parametrize("server", [("--hello-timeout", "1")], indirect=True)
def test_silent_connections_are_closed_after_the_hello_timeout(server: Server) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 64:  # this process holds one descriptor per idle connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * IDLE), hard))
    real = working_client(server.port)
    idle: list[socket.socket] = []
    try:
        idle.extend(socket.create_connection((HOST, server.port), timeout=5) for _ in range(IDLE))
        half = socket.create_connection((HOST, server.port), timeout=5)
        half.sendall(b"\x00\x00\x00\x20\x01")  # the start of a HELLO, never finished
        idle.append(half)
        opened = time.monotonic()  # the last one's hello deadline is 1 s from about now
        sid = 1
        while time.monotonic() - opened < 0.5:  # real work while they sit there
            exchange(real, sid)
            sid += 2
        wait_for(lambda: all(closed_by_peer(s) for s in idle), 1.0 + 1.0 + 5.0, "idle closed")
        elapsed = time.monotonic() - opened
        assert elapsed <= 1.0 + 1.0, elapsed  # the bound: hello timeout + 1 s
        exchange(real, sid)  # the worker and the real client are untouched
    finally:
        for s in idle:
            s.close()
        real.close()
    assert "no HELLO within 1 s: closed" in server.log()


@pytest.mark.parametrize("server", [("--max-connections", "3")], indirect=True)
def test_beyond_max_connections_a_new_one_is_closed_at_once(server: Server) -> None:
    served = [working_client(server.port) for _ in range(3)]
    try:
        extra = socket.create_connection((HOST, server.port), timeout=5)
        wait_for(lambda: closed_by_peer(extra), 5.0, "the 4th connection closed")
        extra.close()
        for k, c in enumerate(served):
            exchange(c, 2 * k + 1)  # the ones already served are untouched
        served.pop().close()  # room for one again
        wait_for(lambda: "refused a connection" in server.log(), 5.0, "the refusal logged")

        def admitted() -> bool:
            c = SpopClient(server.port)
            try:
                ok = c.hello("haproxy-hello 2.6").type == FrameType.AGENT_HELLO
            except (ConnectionError, OSError, TimeoutError):
                ok = False
            c.close()
            return ok

        wait_for(admitted, 5.0, "a new connection admitted once one closed")
    finally:
        for c in served:
            c.close()

"""spoa_mp.relay with real sockets and real TLS: a TLS client (HAProxy's
side) on one end of a TCP loopback connection, the relay holding the server
side and one end of a socketpair, and the test playing the new worker on the
other end. Each test runs the relay in its own asyncio loop, bounded."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from support.tls_certs import PKI, make_pki
from support.waits import HOST, IO_TIMEOUT

from spoa_mp.relay import HIGH_WATER, Relay
from spoa_mp.tls import TLSFiles, build_server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Ends:
    client: ssl.SSLSocket  # HAProxy's side, blocking with a timeout
    server: ssl.SSLSocket  # what the relay gets: handshake done, non-blocking
    worker: socket.socket  # the new worker's end of the socketpair
    mine: socket.socket  # the relay's end


@pytest.fixture
def ends(pki: PKI) -> Iterator[Ends]:
    server_ctx = build_server_context(
        TLSFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    )
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    client_ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with socket.create_server((HOST, 0)) as listener:
        raw_client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        raw_server, _ = listener.accept()
    raw_server.settimeout(IO_TIMEOUT)
    wrapped: list[ssl.SSLSocket] = []
    t = threading.Thread(
        target=lambda: wrapped.append(server_ctx.wrap_socket(raw_server, server_side=True))
    )
    t.start()
    client = client_ctx.wrap_socket(raw_client, server_hostname=HOST)
    t.join(IO_TIMEOUT)
    (server,) = wrapped
    server.setblocking(False)
    worker, mine = socket.socketpair()
    worker.settimeout(IO_TIMEOUT)
    yield Ends(client, server, worker, mine)
    for s in (client, server, worker, mine):
        s.close()


def run_relay(ends: Ends, drive: Callable[[], None]) -> list[Relay]:
    """Run a relay in a fresh loop while `drive` (in a thread) plays both
    peers; returns the relays that reported themselves closed."""
    closed: list[Relay] = []
    failure: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_closed(relay: Relay) -> None:
            closed.append(relay)
            done.set_result(None)

        Relay(loop, ends.server, ends.mine, on_closed).start()

        def peers() -> None:
            try:
                drive()
            except BaseException as e:  # reported by the test below
                failure.append(e)

        thread = threading.Thread(target=peers, daemon=True)
        thread.start()
        await asyncio.wait_for(done, 3 * IO_TIMEOUT)
        await asyncio.to_thread(thread.join, IO_TIMEOUT)

    asyncio.run(main())
    if failure:
        raise failure[0]
    return closed


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"closed after {len(got)} of {n} bytes"
        got += chunk
    return got


def test_bytes_go_both_ways_and_the_worker_closing_ends_it(ends: Ends) -> None:
    """What HAProxy sends reaches the worker and back; when the worker closes
    after its last bytes (an AGENT-DISCONNECT), they reach HAProxy, then the
    TLS connection closes."""

    def drive() -> None:
        for size in (1, 100, 70_000):
            data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            ends.client.sendall(data)
            assert recv_exactly(ends.worker, len(data)) == data
            ends.worker.sendall(data[::-1])
            assert recv_exactly(ends.client, len(data)) == data[::-1]
        ends.worker.sendall(b"goodbye")
        ends.worker.close()
        assert recv_exactly(ends.client, 7) == b"goodbye"
        assert ends.client.recv(1) == b""  # closed after them

    (relay,) = run_relay(ends, drive)
    assert relay.closed


def test_haproxy_closing_closes_the_worker_end(ends: Ends) -> None:
    def drive() -> None:
        ends.client.sendall(b"last words")
        ends.client.close()
        assert recv_exactly(ends.worker, 10) == b"last words"
        assert ends.worker.recv(1) == b""

    run_relay(ends, drive)


def test_a_slow_worker_pauses_the_tls_side_and_loses_nothing(ends: Ends) -> None:
    """More than HIGH_WATER from HAProxy while the worker reads nothing: the
    relay stops reading TLS at the mark (OpenSSL and the kernel hold the
    rest), and everything arrives once the worker reads."""
    total = 3 * HIGH_WATER
    data = bytes(i % 251 for i in range(total))

    def drive() -> None:
        sender = threading.Thread(target=ends.client.sendall, args=(data,), daemon=True)
        sender.start()
        assert recv_exactly(ends.worker, total) == data
        sender.join(IO_TIMEOUT)
        ends.worker.close()

    run_relay(ends, drive)


def test_data_decrypted_before_the_relay_starts_is_relayed(ends: Ends) -> None:
    """The handover stops reading at a frame boundary, with more already in
    OpenSSL's buffer: the relay passes that on without waiting for readiness."""
    ends.client.sendall(b"frame-one|frame-two")
    ends.server.settimeout(IO_TIMEOUT)
    assert ends.server.recv(10) == b"frame-one|"  # the worker's last read
    ends.server.setblocking(False)
    assert ends.server.pending() == 9  # left in OpenSSL, nothing in the kernel

    def drive() -> None:
        assert recv_exactly(ends.worker, 9) == b"frame-two"
        ends.worker.close()

    run_relay(ends, drive)

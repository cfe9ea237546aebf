"""spoa-mp with TLS and an allow-list behind real HAProxy (2.6, 3.2...).

The agent runs with --tls-cert/--tls-key/--tls-client-ca (certificates made
by tests/tls_certs.py with the openssl command); HAProxy's server line gets
`ssl verify required ca-file CA crt CLIENT.pem` and `check-ssl`, with
`option spop-check`. Refused clients (no certificate, another CA's
certificate, plain SPOP on the TLS port, an address outside --allow) run
beside a real HAProxy client whose every request must succeed with its
score; the `score` frontend turns any SPOE error into a 503 (reload_helpers).
Only 127.0.0.1/127.0.0.2 and Unix sockets; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from reload_helpers import ReloadHAProxyConfig
from support.haproxy import (
    AGENT_SERVER,
    HAProxy,
    HAProxyBinary,
    HAProxyConfig,
    SpoeForm,
    check_config,
    http_get,
)
from support.load import assert_every_request_served, parse_wrk, start_wrk
from support.processes import Process, gone, title
from support.server import WORKER_TITLE, SpoaProcess, spoa_command
from support.spop_peer import TLSSpopClient
from support.tls_certs import PKI, make_pki
from support.waits import HOST, IO_TIMEOUT, free_port, wait_for

from spoa_mp.codec import FrameType

from .conftest import HAProxyFactory, SpoaFactory

pytestmark = pytest.mark.e2e

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "spop-vectors.json").read_text())
HELLO = bytes.fromhex(next(f["hex"] for f in VECTORS["frames"] if f["name"] == "haproxy-hello 2.6"))
AGENT_HELLO_TYPE = 101  # spop.md §3: the byte after the 4-byte length


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_flags(pki: PKI, client_ca: bool = True) -> tuple[str, ...]:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    return (*flags, "--tls-client-ca", str(pki.ca)) if client_ca else flags


def with_server_line(base: type[HAProxyConfig], words: str, address: str | None = None) -> type:
    """`base` whose agents' server line gets `words` (and another address)."""

    class Config(base):  # type: ignore[misc, valid-type]  # a class made per test
        def write(self) -> None:
            super().write()
            cfg = self.cfg_path.read_text()
            old = f"server {AGENT_SERVER} {HOST}:{self.agent_port} check"
            assert old in cfg, cfg
            where = address or f"{HOST}:{self.agent_port}"
            cfg = cfg.replace(old, f"server {AGENT_SERVER} {where} {words} check")
            self.cfg_path.write_text(cfg)

    return Config


def mutual_tls_words(pki: PKI) -> str:
    return f"ssl verify required ca-file {pki.ca} crt {pki.haproxy_pem} check-ssl"


def metrics(port: int) -> dict[str, float]:
    """The agent's /metrics samples without labels, by name."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=IO_TIMEOUT) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(spoa_mp_[a-z_]+) ([0-9.e+]+)$", line)
        if m:
            out[m[1]] = float(m[2])
    return out


def counter_reaches(port: int, name: str, at_least: int) -> float:
    def reached() -> float | None:
        value = metrics(port).get(name, 0.0)
        return value if value >= at_least else None

    return wait_for(reached, 15.0, f"{name} >= {at_least}")


def refused(client: socket.socket, context: ssl.SSLContext | None) -> bytes:
    """Speak SPOP (over TLS with `context`) and return what came back before
    the agent closed: nothing or a TLS alert, never an AGENT-HELLO."""
    client.settimeout(IO_TIMEOUT)
    got = b""
    try:
        sock = client if context is None else context.wrap_socket(client, server_hostname=HOST)
        sock.sendall(HELLO)
        while chunk := sock.recv(4096):
            got += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # the handshake failed or the agent reset: refused either way
    finally:
        client.close()
    return got


def assert_refused(got: bytes) -> None:
    assert len(got) < 5 or got[4] != AGENT_HELLO_TYPE, got[:40]


class ScoreLoop:
    """A real HAProxy client beside the refused ones: GETs in a loop, every
    status counted (a SPOE error is a 503 in ReloadHAProxyConfig)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: Counter[object] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = http_get(self.port, HOST)
                self.statuses[(r.status, r.score())] += 1
            except (OSError, AssertionError) as e:
                self.statuses[type(e).__name__] += 1

    def __enter__(self) -> ScoreLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT * 2)


def tls_pair(
    pki: PKI, spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation: Path
) -> tuple[SpoaProcess, HAProxy, int]:
    """spoa-mp with mutual TLS (and --metrics), HAProxy in front, check UP."""
    metrics_port = free_port()
    spoa = spoa_factory(
        workers=2,
        reputation_file=reputation,
        extra=(*tls_flags(pki), "--metrics", f"{HOST}:{metrics_port}"),
    )
    config = with_server_line(ReloadHAProxyConfig, mutual_tls_words(pki))
    haproxy = haproxy_factory(spoa.port, SpoeForm.HTTP_NAMED, config_class=config)
    haproxy.wait_server("UP", "L7OK")
    return spoa, haproxy, metrics_port


# ------------------------------------------------------------------ scores over TLS


def test_scores_reach_haproxy_over_mutual_tls(
    pki: PKI, spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation_file: Path
) -> None:
    spoa, haproxy, metrics_port = tls_pair(pki, spoa_factory, haproxy_factory, reputation_file)
    for source, score in (("127.0.0.10", "5"), ("127.0.0.20", "95"), ("127.1.2.3", "10")):
        r = http_get(haproxy.config.score_port, source)
        assert (r.status, r.score()) == (200, (score, "")), r
    assert "TLS on every listener" in spoa.logs()
    assert "spoa_mp_tls_handshake_failures_total" in metrics(metrics_port)


def test_refused_clients_beside_a_real_client(
    pki: PKI, spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation_file: Path
) -> None:
    """No certificate, another CA's certificate, plain SPOP: each refused
    (and counted), while HAProxy's requests all get their score."""
    spoa, haproxy, metrics_port = tls_pair(pki, spoa_factory, haproxy_factory, reputation_file)
    no_cert = ssl.create_default_context(cafile=str(pki.ca))
    intruder = ssl.create_default_context(cafile=str(pki.ca))
    intruder.load_cert_chain(str(pki.other_client_cert), str(pki.other_client_key))
    with ScoreLoop(haproxy.config.score_port) as loop:
        for context in (no_cert, intruder, None) * 5:
            client = socket.create_connection((HOST, spoa.port), timeout=IO_TIMEOUT)
            assert_refused(refused(client, context))
        counter_reaches(metrics_port, "spoa_mp_tls_handshake_failures_total", 15)
        wait_for(lambda: sum(loop.statuses.values()) >= 20, 15.0, "20 requests beside")
    assert set(loop.statuses) == {(200, ("50", ""))}, loop.statuses
    assert "TLS handshake failed" in spoa.logs()


def test_thousand_failed_handshakes_leave_the_real_client_alone(
    pki: PKI, spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation_file: Path
) -> None:
    spoa, haproxy, metrics_port = tls_pair(pki, spoa_factory, haproxy_factory, reputation_file)
    before = metrics(metrics_port).get("spoa_mp_tls_handshake_failures_total", 0)
    with ScoreLoop(haproxy.config.score_port) as loop:
        for _ in range(1000):
            client = socket.create_connection((HOST, spoa.port), timeout=IO_TIMEOUT)
            assert_refused(refused(client, None))
        counter_reaches(metrics_port, "spoa_mp_tls_handshake_failures_total", int(before) + 1000)
    assert sum(loop.statuses.values()) > 0
    assert set(loop.statuses) == {(200, ("50", ""))}, loop.statuses
    # rate-limited: not one log line per refused client
    assert spoa.logs().count("TLS handshake failed") < 20


def test_tls_over_a_unix_socket(
    pki: PKI,
    processes: list[Process],
    haproxy_factory: HAProxyFactory,
    socket_dir: Path,
    tmp_path: Path,
) -> None:
    path = socket_dir / "agent.sock"
    port = free_port()  # not listened on: --unix wins
    argv = [*spoa_command(port, 1), *tls_flags(pki), "--unix", str(path)]
    spoa = SpoaProcess("spoa-mp-unix", port, 1, argv, tmp_path)
    processes.append(spoa)

    def listening() -> bool:
        spoa.check_alive()
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(path)) == 0

    wait_for(listening, 15.0, f"spoa-mp on {path}")
    config = with_server_line(ReloadHAProxyConfig, mutual_tls_words(pki), f"unix@{path}")
    haproxy = haproxy_factory(port, SpoeForm.HTTP_NAMED, config_class=config)
    haproxy.wait_server("UP", "L7OK")
    r = http_get(haproxy.config.score_port, HOST)
    assert r.status == 200, r
    assert r.score()[1] == "", r  # scored, no SPOE error
    with socket.socket(socket.AF_UNIX) as plain:  # plain SPOP on the TLS socket
        plain.connect(str(path))
        assert_refused(refused(plain, None))


# ------------------------------------------------------------------ allow-list


def test_address_outside_allow_is_refused(
    spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation_file: Path
) -> None:
    """--allow 127.0.0.2/32: HAProxy connecting from 127.0.0.2 is served; a
    client from 127.0.0.1 is closed at accept, counted and logged."""
    metrics_port = free_port()
    spoa = spoa_factory(
        workers=2,
        reputation_file=reputation_file,
        extra=("--allow", "127.0.0.2/32", "--metrics", f"{HOST}:{metrics_port}"),
    )
    config = with_server_line(ReloadHAProxyConfig, "source 127.0.0.2")
    haproxy = haproxy_factory(spoa.port, SpoeForm.HTTP_NAMED, config_class=config)
    haproxy.wait_server("UP", "L7OK")
    with ScoreLoop(haproxy.config.score_port) as loop:
        before = metrics(metrics_port).get("spoa_mp_connections_not_allowed_total", 0)
        for _ in range(5):
            client = socket.create_connection((HOST, spoa.port), timeout=IO_TIMEOUT)
            assert_refused(refused(client, None))
        allowed = socket.create_connection(
            (HOST, spoa.port), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        )
        with allowed:
            allowed.sendall(HELLO)
            head = allowed.recv(5)
        assert len(head) == 5, head
        assert head[4] == AGENT_HELLO_TYPE, head
        counter_reaches(metrics_port, "spoa_mp_connections_not_allowed_total", int(before) + 5)
        wait_for(lambda: sum(loop.statuses.values()) >= 10, 15.0, "10 requests beside")
    assert set(loop.statuses) == {(200, ("50", ""))}, loop.statuses
    assert "not in --allow" in spoa.logs()


def test_exposed_without_tls_or_allow_warns(spoa_factory: SpoaFactory) -> None:
    """Only 127.0.0.1 is bound; the warning's wording is checked by binding
    nothing beyond loopback and by the unit tests of access.exposure_warning."""
    spoa = spoa_factory(workers=1)
    assert "beyond loopback" not in spoa.logs()


# ------------------------------------------------------------------ reload


def relaying(spoa: SpoaProcess) -> dict[int, int]:
    """Old workers relaying TLS connections (relay.py), from their process
    titles: pid -> how many connections."""
    out = {}
    for proc in spoa.descendants():
        m = RELAY_TITLE.match(title(proc))
        if m:
            out[proc.pid] = int(m[1])
    return out


RELAY_TITLE = re.compile(r"^spoa-mp: worker \d+ relaying (\d+) connection")
HANDED = re.compile(r"\) handed \d+ connection\(s\) over")  # the supervisor's, per worker


def test_sighup_twice_under_wrk_over_tls(
    pki: PKI,
    spoa_factory: SpoaFactory,
    haproxy_factory: HAProxyFactory,
    tmp_path: Path,
    reputation_file: Path,
) -> None:
    """wrk -c20 through HAProxy (one SPOE message per request, pipelining,
    a SPOE error is a 503) to spoa-mp over mutual TLS, and two SIGHUPs. Each
    old worker passes its TLS connections on between two frames as the ends
    of socketpairs and relays them (relay.py), so HAProxy sees no close and
    no AGENT-DISCONNECT: 0 failed requests and 0 socket errors, with 2.6 and
    with 3.x. SIGTERM then stops every process, relays included, cleanly."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (make deps installs it)")
    spoa, haproxy, _ = tls_pair(pki, spoa_factory, haproxy_factory, reputation_file)
    url = f"http://{HOST}:{haproxy.config.score_port}/"
    wrk = start_wrk(url, tmp_path, "-t1", "-c20", "-d6s")
    try:
        time.sleep(1.0)  # let the load run (not a synchronisation)
        for generation in (2, 3):
            spoa.send_signal(signal.SIGHUP)
            wait_for(
                lambda g=generation: f"reload: generation {g} serving" in spoa.logs(),
                15.0,
                f"generation {generation} serving",
            )
            wait_for(
                lambda g=generation: len(HANDED.findall(spoa.logs())) >= 2 * (g - 1),
                10.0,
                f"generation {generation - 1} to hand its connections over",
            )
            time.sleep(1.0)  # load on the new generation
        relays = relaying(spoa)
        assert wrk.wait(20.0) == 0, wrk.stderr()
    finally:
        wrk.kill()
    result = parse_wrk(wrk.stdout())
    relayed = sum(int(n) for n in re.findall(r"relaying (\d+) TLS connection", spoa.logs()))
    print(
        f"{haproxy.config.haproxy.id}: wrk {result.requests} requests, {result.rate:.0f} req/s, "
        f"socket errors {result.socket_errors}, 503 (SPOE errors) {result.non_2xx}; "
        f"TLS connections relayed {relayed}, relaying after the reloads {relays}"
    )
    assert_every_request_served(result)
    assert relayed > 0
    assert http_get(haproxy.config.score_port, HOST).score() == ("50", "")
    known = spoa.known()
    assert spoa.stop() == 0, spoa.logs()
    wait_for(lambda: all(gone(p) for p in known), 10.0, "every process of spoa-mp to exit")


def test_a_relayed_connection_makes_one_hop(
    pki: PKI, spoa_factory: SpoaFactory, reputation_file: Path
) -> None:
    """One TLS client, one worker, two SIGHUPs. The first worker relays the
    connection; the second adopts the plain end, and at the next reload hands
    it on like a clear connection and exits: one relay, however many reloads.
    Every NOTIFY is answered on the same TLS connection; when the client
    closes, the relay exits."""
    spoa = spoa_factory(workers=1, reputation_file=reputation_file, extra=tls_flags(pki))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    client = TLSSpopClient(spoa.port, context)
    sid = 0

    def ask() -> None:
        nonlocal sid
        sid += 1
        client.notify(sid, 1, [("check-client-ip", [("", IPv4Address("127.0.0.10"))])])
        ack = client.read_frame()
        assert (ack.type, ack.sid, ack.fid) == (FrameType.ACK, sid, 1), ack
        assert ack.actions == [(1, 1, "ip_score", 5)], ack

    try:
        assert client.hello().type == FrameType.AGENT_HELLO
        ask()
        (first,) = (p.pid for p in spoa.wait_workers())
        spoa.send_signal(signal.SIGHUP)
        wait_for(lambda: relaying(spoa) == {first: 1}, 15.0, "the first worker relaying")
        ask()
        (second,) = (p.pid for p in spoa.descendants() if WORKER_TITLE.match(title(p)))
        spoa.send_signal(signal.SIGHUP)
        wait_for(lambda: "generation 3 serving" in spoa.logs(), 15.0, "generation 3 serving")
        wait_for(lambda: second not in {p.pid for p in spoa.descendants()}, 10.0, "exit")
        assert relaying(spoa) == {first: 1}  # still that one relay: no second hop
        ask()
    finally:
        client.close()
    wait_for(lambda: first not in {p.pid for p in spoa.descendants()}, 10.0, "the relay exits")
    assert "relaying 1 TLS connection(s)" in spoa.logs()
    assert spoa.stop() == 0, spoa.logs()


def test_a_burst_beyond_the_read_buffer_is_answered_in_full(
    pki: PKI, spoa_factory: SpoaFactory, reputation_file: Path
) -> None:
    """20000 NOTIFYs (about 700 KiB) in one write over TLS: many records,
    more than one read buffer, reads paused and resumed by --max-in-flight;
    every NOTIFY gets its ACK, in order. (Bytes OpenSSL decrypted beyond a
    full buffer are read without waiting for readiness, worker._read_decrypted;
    this burst does not reliably leave the kernel empty at that moment, so it
    exercises the path rather than proving the stall it prevents.)"""
    spoa = spoa_factory(workers=1, reputation_file=reputation_file, extra=tls_flags(pki))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    n = 20000
    with TLSSpopClient(spoa.port, context, timeout=30.0) as client:
        assert client.hello().type == FrameType.AGENT_HELLO
        message = [("check-client-ip", [("", IPv4Address("127.0.0.10"))])]
        burst = b"".join(client.notify_bytes(sid, 1, message) for sid in range(1, n + 1))
        assert len(burst) > 512 * 1024
        acks = client.send_while_reading(burst, n, timeout=30.0)
    assert [a.sid for a in acks] == list(range(1, n + 1))
    assert {tuple(a.actions) for a in acks} == {((1, 1, "ip_score", 5),)}


def test_reload_with_a_bad_key_keeps_serving(
    pki: PKI,
    spoa_factory: SpoaFactory,
    haproxy_factory: HAProxyFactory,
    tmp_path: Path,
    reputation_file: Path,
) -> None:
    """SIGHUP with a key that no longer matches: the reload fails, says why,
    and the running workers go on serving over TLS."""
    key = tmp_path / "agent.key"
    shutil.copy(pki.server_key, key)
    metrics_port = free_port()
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(key), "--tls-client-ca")
    spoa = spoa_factory(
        workers=1,
        reputation_file=reputation_file,
        extra=(*flags, str(pki.ca), "--metrics", f"{HOST}:{metrics_port}"),
    )
    config = with_server_line(ReloadHAProxyConfig, mutual_tls_words(pki))
    haproxy = haproxy_factory(spoa.port, SpoeForm.HTTP_NAMED, config_class=config)
    haproxy.wait_server("UP", "L7OK")
    shutil.copy(pki.client_key, key)
    spoa.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in spoa.logs(), 15.0, "the reload to fail")
    assert "does not match the certificate" in spoa.logs()
    r = http_get(haproxy.config.score_port, HOST)
    assert (r.status, r.score()) == (200, ("50", "")), r


# ------------------------------------------------------------------ haproxy-config


def test_generated_tls_config_is_valid(
    pki: PKI, tmp_path: Path, haproxy_bin: HAProxyBinary
) -> None:
    """`spoa-mp haproxy-config` with TLS, for this binary's version: `haproxy -c`
    accepts it."""
    from spoa_mp.haproxy_config import main

    out = tmp_path / "out"
    version = haproxy_bin.generator_version
    argv = ["--haproxy", version, "-p", "12345", *tls_flags(pki), "--ca-file", str(pki.ca)]
    assert main([*argv, "--crt", str(pki.haproxy_pem), "--output-dir", str(out)]) == 0
    cfg = (out / "haproxy.cfg").read_text()
    assert f"check-ssl ssl verify required ca-file {pki.ca} crt {pki.haproxy_pem}" in cfg
    checked = check_config(out / "haproxy.cfg", haproxy_bin)
    assert checked.returncode == 0, checked.stdout + checked.stderr

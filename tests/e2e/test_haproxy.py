"""spoa-mp behind a real HAProxy (every binary found: 2.6, 3.2...), both SPOE forms.

HAProxy gets two frontends: `score` returns `score=<sess.iprep.ip_score>
err=<txn.iprep.error>` and `guard` denies scores below 20 (spop.md §9.5).
Clients connect from chosen 127.x source addresses, so `src` (and thus the
score) is known for every request.
"""

from __future__ import annotations

import signal

import psutil
import pytest
from support.haproxy import HAProxy, SpoeForm, http_get
from support.server import SpoaProcess
from support.waits import HOST, STOP_TIMEOUT, accepting, free_port, wait_for

from .conftest import DENY_BELOW, EXPECTED_SCORES, HAProxyFactory, SpoaFactory

pytestmark = pytest.mark.e2e


def started_pair(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, form: SpoeForm, **settings: int
) -> HAProxy:
    """HAProxy for `spoa`, once its health check has passed."""
    haproxy = haproxy_factory(spoa.port, form, **settings)
    haproxy.wait_server("UP", "L7OK")
    return haproxy


def test_score_reaches_haproxy(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, form: SpoeForm
) -> None:
    haproxy = started_pair(spoa, haproxy_factory, form)
    got = {}
    for source in EXPECTED_SCORES:
        response = http_get(haproxy.config.score_port, source)
        assert response.status == 200, response
        got[source] = response.score()
    assert got == {source: (str(score), "") for source, score in EXPECTED_SCORES.items()}


def test_deny_rule_uses_the_score(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, form: SpoeForm
) -> None:
    haproxy = started_pair(spoa, haproxy_factory, form)
    for source, score in EXPECTED_SCORES.items():
        response = http_get(haproxy.config.deny_port, source)
        if score < DENY_BELOW:
            assert response.status == 403, (source, response)
        else:
            assert response.status == 200, (source, response)
            assert response.body == f"allowed score={score}\n"
    denied = {s for s in EXPECTED_SCORES if http_get(haproxy.config.deny_port, s).status == 403}
    assert denied == {"127.0.0.10", "127.1.2.3"}


def test_spop_check_marks_agent_up(
    spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory, reputation_file: object
) -> None:
    """DOWN while nothing listens, UP (L7OK, via option spop-check) once
    spoa-mp serves the port, DOWN again after it stopped."""
    port = free_port()
    assert not accepting(port)
    haproxy = haproxy_factory(port, SpoeForm.SESSION_POSITIONAL)
    down = haproxy.wait_server("DOWN", "L4CON")
    assert down["check_desc"] == "Layer4 connection problem"

    spoa = spoa_factory(workers=2, reputation_file=reputation_file, port=port)
    up = haproxy.wait_server("UP", "L7OK")
    assert up["check_desc"] == "Layer7 check passed"
    assert int(up["chkfail"]) >= 1  # the failures counted while it was down

    assert spoa.stop() == 0
    haproxy.wait_server("DOWN", "L4CON")


def test_fail_open_when_agent_stopped(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, form: SpoeForm
) -> None:
    """spoa-mp stops gracefully (SIGTERM, exit 0, no worker left); HAProxy
    keeps answering within the processing timeout, without a score and with
    `txn.iprep.error` set, both before and after the check marks it DOWN."""
    processing_ms = 500
    haproxy = started_pair(spoa, haproxy_factory, form, processing_timeout_ms=processing_ms)
    assert http_get(haproxy.config.score_port, "127.0.0.10").score() == ("5", "")
    assert http_get(haproxy.config.deny_port, "127.0.0.10").status == 403

    workers = spoa.wait_workers()
    assert spoa.stop() == 0
    _gone, alive = psutil.wait_procs(workers, timeout=STOP_TIMEOUT)
    assert not alive, f"workers left after the supervisor exited: {alive}"
    assert not accepting(spoa.port)

    bound = processing_ms / 1000 + 1.0  # the timeout plus scheduling slack

    def assert_fail_open() -> None:
        response = http_get(haproxy.config.score_port, "127.0.0.10")
        assert response.status == 200, response
        score, err = response.score()
        assert score == ""
        assert err.isdigit(), response
        assert int(err) > 0, response  # 1 timeout, 2 resources...
        assert response.elapsed < bound, response
        # the deny rule lets everyone through without a score (fail-open)
        guarded = http_get(haproxy.config.deny_port, "127.0.0.10")
        assert guarded.status == 200, guarded
        assert guarded.body == "allowed score=\n"
        assert guarded.elapsed < bound, guarded

    assert_fail_open()
    haproxy.wait_server("DOWN", "L4CON")
    assert_fail_open()
    haproxy.check_alive()


def test_random_scores_without_reputation_file(
    spoa_factory: SpoaFactory, haproxy_factory: HAProxyFactory
) -> None:
    spoa = spoa_factory(workers=2)
    haproxy = started_pair(spoa, haproxy_factory, SpoeForm.SESSION_POSITIONAL)
    scores = []
    for i in range(1, 21):
        response = http_get(haproxy.config.score_port, f"127.0.3.{i}")
        assert response.status == 200, response
        score, err = response.score()
        assert err == "", response
        assert score.isdigit(), response
        scores.append(int(score))
    assert all(0 <= s <= 100 for s in scores), scores
    assert len(set(scores)) > 1, f"20 random scores, all equal: {scores}"


def test_haproxy_listens_on_loopback_only(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory
) -> None:
    """Sanity check of the harness itself: everything binds 127.0.0.1."""
    haproxy = haproxy_factory(spoa.port, SpoeForm.SESSION_POSITIONAL)
    ports = {spoa.port, haproxy.config.score_port, haproxy.config.deny_port}
    for proc in (spoa, haproxy):
        for p in [psutil.Process(proc.pid), *proc.descendants()]:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                    assert conn.laddr.ip == HOST, conn


def test_haproxy_soft_stop_closes_the_agent_connections_quietly(
    spoa: SpoaProcess, haproxy_factory: HAProxyFactory, form: SpoeForm
) -> None:
    """HAProxy's soft stop (SIGUSR1) ends its SPOE connections: 2.6 with a
    HAPROXY-DISCONNECT, 3.x with a TCP reset and no DISCONNECT (spop.md
    §8.2). The agent closes every one without a warning and keeps serving."""
    haproxy = started_pair(spoa, haproxy_factory, form)
    for i in range(1, 41):
        assert http_get(haproxy.config.score_port, f"127.1.0.{i}").score() == ("10", "")
    workers = spoa.wait_workers()

    def agent_connections() -> int:
        return sum(
            c.status == psutil.CONN_ESTABLISHED and c.laddr.port == spoa.port
            for w in workers
            for c in w.net_connections(kind="tcp")
        )

    assert agent_connections() > 0
    haproxy.send_signal(signal.SIGUSR1)
    assert haproxy.popen.wait(timeout=STOP_TIMEOUT) == 0
    wait_for(lambda: agent_connections() == 0, STOP_TIMEOUT, "the agent to close them all")
    noisy = [ln for ln in spoa.logs().splitlines() if " WARNING " in ln or " ERROR " in ln]
    assert not noisy, noisy
    spoa.check_alive()
    assert accepting(spoa.port)

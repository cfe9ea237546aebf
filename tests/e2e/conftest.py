"""Fixtures of the end-to-end tests: real spoa-mp and HAProxy processes.

Every process a test starts is registered on the test item; when the test
fails (setup, call or teardown), the stderr/stdout files of those processes
are appended to the report, and at teardown every process group is killed.
`python -m spoa_mp` is run with the interpreter running pytest; set
SPOA_MP_E2E_COMMAND to run another command with the same CLI.

Every test that uses `haproxy_bin` (directly or through `haproxy_factory`)
runs once per HAProxy binary found (haproxy.haproxy_params: Debian's 2.6,
../shared/bin/haproxy-3.2.0, HAPROXY_BINS); a missing one is a skip that
names its path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.haproxy import (
    HAProxy,
    HAProxyBinary,
    HAProxyConfig,
    SpoeForm,
    haproxy_params,
    start_haproxy,
)
from support.processes import Process, ProcessExitedError
from support.server import SpoaProcess, spoa_command
from support.waits import free_port

# The reputation file of the e2e tests and what each source address scores.
REPUTATION_LINES = """\
# e2e reputation table: longest prefix wins
127.0.0.0/8      50
127.0.0.10/32     5
127.0.0.20/32    95   # a trusted host
127.1.0.0/16     10
::1/128          80
"""
DEFAULT_SCORE = 100  # unlisted addresses (spoa-mp's default --default-score)
EXPECTED_SCORES = {
    "127.0.0.10": 5,
    "127.0.0.20": 95,
    "127.1.2.3": 10,
    "127.0.0.30": 50,
}
DENY_BELOW = 20  # haproxy.cfg: http-request deny if { var(sess.iprep.ip_score) -m int lt 20 }


@pytest.fixture
def reputation_file(tmp_path: Path) -> Path:
    path = tmp_path / "reputation.txt"
    path.write_text(REPUTATION_LINES)
    return path


SpoaFactory = Callable[..., SpoaProcess]


@pytest.fixture
def spoa_factory(processes: list[Process], tmp_path: Path) -> SpoaFactory:
    """Start `python -m spoa_mp` and wait until its port accepts connections.

    The port comes from the OS (bind to 0, close, hand it over) unless given;
    if another process takes it in between, the start is retried on a new port.
    """
    counter = iter(range(1000))

    def start(
        workers: int = 2,
        reputation_file: Path | None = None,
        default_score: int | None = None,
        debug: bool = False,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> SpoaProcess:
        fixed = port is not None
        for attempt in range(3):
            port = port if fixed else free_port()
            assert port is not None
            argv = [*spoa_command(port, workers, reputation_file, default_score, debug), *extra]
            proc = SpoaProcess(f"spoa-mp-{next(counter)}", port, workers, argv, tmp_path)
            processes.append(proc)
            try:
                proc.wait_accepting(port)
            except ProcessExitedError:
                if not fixed and attempt < 2 and "in use" in proc.logs().lower():
                    continue  # lost the port race
                raise
            return proc
        raise AssertionError("unreachable")

    return start


@pytest.fixture
def spoa(spoa_factory: SpoaFactory, reputation_file: Path) -> SpoaProcess:
    """spoa-mp, 2 workers, scoring from the reputation file."""
    return spoa_factory(workers=2, reputation_file=reputation_file)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (tmp_path can exceed sun_path)."""
    path = Path(tempfile.mkdtemp(prefix="spoa-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=haproxy_params())
def haproxy_bin(request: pytest.FixtureRequest) -> HAProxyBinary:
    """Each HAProxy binary found, in turn (ids haproxy2.6, haproxy3.2, ...)."""
    return request.param  # type: ignore[no-any-return]


HAProxyFactory = Callable[..., HAProxy]


@pytest.fixture
def haproxy_factory(
    processes: list[Process], tmp_path: Path, socket_dir: Path, haproxy_bin: HAProxyBinary
) -> HAProxyFactory:
    """Write haproxy.cfg + the SPOE file for `haproxy_bin`'s version, check
    them (`haproxy -c`), start HAProxy in the foreground and wait for its
    stats socket and listeners."""

    def start(
        agent_port: int,
        form: SpoeForm,
        config_class: type[HAProxyConfig] = HAProxyConfig,
        **settings: int,
    ) -> HAProxy:
        workdir = tmp_path / f"haproxy-{form.name.lower()}"
        workdir.mkdir(exist_ok=True)
        config = config_class(
            agent_port, form, workdir, socket_dir, **settings, haproxy=haproxy_bin
        )
        return start_haproxy(config, tmp_path, processes, HAProxy)

    return start


@pytest.fixture(params=list(SpoeForm), ids=lambda f: f.name.lower())
def form(request: pytest.FixtureRequest) -> SpoeForm:
    """Both SPOE configurations: `args src` on-client-session, and
    `args ip=src` on-frontend-http-request."""
    return request.param  # type: ignore[no-any-return]

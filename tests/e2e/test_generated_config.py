"""The configuration `spoa-mp haproxy-config` generates, run by each real
HAProxy found (`--haproxy 2.6` for 2.6 to 3.0, `--haproxy 3.x` for 3.1+).

spoa-mp serves the e2e reputation file; `haproxy-config` gets the very same
serve options (plus its own: the frontend's port, the application server)
and writes haproxy.cfg and the SPOE file with --output-dir; the only change
made to them here is a stats socket appended to haproxy.cfg (a second
`global` section) so that the agent server's state can be read. Requests
from 127.x source addresses then show the generated deny rule at work:
scores below 20 get a 403, the others reach the application (200).
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.haproxy import HAProxy, HAProxyBinary, HAProxyConfig, SpoeForm, check_config, http_get
from support.processes import Process
from support.server import SpoaProcess, spoa_command
from support.waits import HOST, IO_TIMEOUT, START_TIMEOUT, free_port, wait_for

from .conftest import DENY_BELOW, EXPECTED_SCORES

pytestmark = pytest.mark.e2e

APP_BODY = b"hello from the application\n"
FRONTEND = "www"


class _AppHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(APP_BODY)))
        self.end_headers()
        self.wfile.write(APP_BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def app_server() -> Iterator[int]:
    """The application behind the generated frontend: 200 for every GET."""
    server = http.server.ThreadingHTTPServer((HOST, 0), _AppHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=IO_TIMEOUT)


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command prefix, the serve options) of a spoa_command() argv: the
    prefix is `python -m spoa_mp` or SPOA_MP_E2E_COMMAND."""
    i = argv.index("-p")
    return argv[:i], argv[i:]


def unix_accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def generate(
    prefix: list[str], serve_argv: list[str], out_dir: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """`spoa-mp haproxy-config <serve options> <options> --output-dir out_dir`."""
    proc = subprocess.run(
        [*prefix, "haproxy-config", *serve_argv, *options, "--output-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def generator_options(haproxy_bin: HAProxyBinary, port: int, app_server: int) -> list[str]:
    """The `haproxy-config` options of every test here: the syntax of
    `haproxy_bin`, the frontend on `port`, the application on `app_server`."""
    return [
        "--haproxy", haproxy_bin.generator_version,
        "--frontend-bind", f"{HOST}:{port}",
        "--upstream", f"{HOST}:{app_server}",
        "--processing-timeout", "1s",  # a loaded test machine; the rest is as generated
    ]  # fmt: skip


def start_haproxy(
    out_dir: Path,
    socket_dir: Path,
    tmp_path: Path,
    processes: list[Process],
    haproxy_bin: HAProxyBinary,
) -> HAProxy:
    """HAProxy on the generated files (plus a stats socket), once its frontend is open."""
    # The harness's HAProxy needs only cfg_path (out_dir/haproxy.cfg), the
    # stats socket path and the binary from this; the files are the generated ones.
    harness = HAProxyConfig(
        0, SpoeForm.SESSION_POSITIONAL, out_dir, socket_dir, haproxy=haproxy_bin
    )
    assert harness.cfg_path == out_dir / "haproxy.cfg"
    with harness.cfg_path.open("a") as f:
        f.write(f"\nglobal\n    stats socket {harness.stats_socket} mode 600 level admin\n")
    checked = check_config(harness.cfg_path, haproxy_bin)
    assert checked.returncode == 0, (
        f"haproxy -c failed:\n{checked.stdout}{checked.stderr}\n{harness.cfg_path.read_text()}"
    )
    haproxy = HAProxy(harness, tmp_path)
    processes.append(haproxy)

    haproxy.wait_ready(frontends=(FRONTEND,))
    return haproxy


def assert_deny_rule_works(haproxy: HAProxy, port: int) -> None:
    row = haproxy.wait_server("UP", "L7OK")
    assert row["check_desc"] == "Layer7 check passed"
    for source, score in EXPECTED_SCORES.items():
        response = http_get(port, source)
        if score < DENY_BELOW:
            assert response.status == 403, (source, score, response)
        else:
            assert response.status == 200, (source, score, response)
            assert response.body == APP_BODY.decode()


@pytest.mark.parametrize(
    "options",
    [(), ("--arg-name", "ip", "--event", "on-frontend-http-request")],
    ids=["args-src-session", "args-ip-http-request"],
)
def test_generated_config_denies_low_scores(
    haproxy_bin: HAProxyBinary,
    spoa: SpoaProcess,
    app_server: int,
    socket_dir: Path,
    tmp_path: Path,
    processes: list[Process],
    options: tuple[str, ...],
) -> None:
    prefix, serve_argv = split_command(spoa.argv)
    assert "--reputation-file" in serve_argv
    port = free_port()
    out_dir = tmp_path / "generated"
    proc = generate(
        prefix,
        serve_argv,
        out_dir,
        *generator_options(haproxy_bin, port, app_server),
        *options,
    )
    assert f"wrote {out_dir}/haproxy.cfg" in proc.stdout
    cfg = (out_dir / "haproxy.cfg").read_text()
    assert f"server agent1 {HOST}:{spoa.port} check inter 5s" in cfg
    assert f"config {out_dir}/spoe-iprep.conf" in cfg
    assert ("    mode spop\n" in cfg) == haproxy_bin.spop, cfg

    haproxy = start_haproxy(out_dir, socket_dir, tmp_path, processes, haproxy_bin)
    assert_deny_rule_works(haproxy, port)


def test_generated_config_over_a_unix_socket(
    haproxy_bin: HAProxyBinary,
    reputation_file: Path,
    app_server: int,
    socket_dir: Path,
    tmp_path: Path,
    processes: list[Process],
) -> None:
    """The `server agent1 unix@PATH` line: spoa-mp started with --unix."""
    prefix, _ = split_command(spoa_command(1))
    agent_socket = socket_dir / "agent.sock"
    serve_argv = ["--unix", str(agent_socket), "-n", "2", "--reputation-file", str(reputation_file)]
    spoa = Process("spoa-mp-unix", [*prefix, *serve_argv], tmp_path)
    processes.append(spoa)

    def accepting_unix() -> bool:
        spoa.check_alive()
        return unix_accepting(agent_socket)

    wait_for(accepting_unix, START_TIMEOUT, "spoa-mp's unix socket")

    port = free_port()
    out_dir = tmp_path / "generated-unix"
    generate(
        prefix,
        serve_argv,
        out_dir,
        *generator_options(haproxy_bin, port, app_server),
    )
    assert (
        f"server agent1 unix@{agent_socket} check inter 5s" in (out_dir / "haproxy.cfg").read_text()
    )

    haproxy = start_haproxy(out_dir, socket_dir, tmp_path, processes, haproxy_bin)
    assert_deny_rule_works(haproxy, port)

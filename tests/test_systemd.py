"""spoa_mp.systemd (socket activation, sd_notify) and the unit files in systemd/.

- listen_fds() runs in a forked child that has the test's sockets at fds 3..
  and LISTEN_PID set to its own pid, as systemd would start it; the child
  reports what it saw as JSON through a pipe. Cases that return before
  touching any fd run in the test process with a patched environment.
- Notifier talks to a SOCK_DGRAM Unix socket of the test (a path and an
  abstract name) standing in for systemd's NOTIFY_SOCKET.
- The unit files are linted by `systemd-analyze verify` (copies with ExecStart
  pointing at this venv's spoa-mp, which must exist at verify time).
- The real `systemd-socket-activate` passes a listening socket to a child that
  calls listen_fds() (marked e2e: it starts processes).

Every wait has a deadline; only 127.0.0.1, ::1 and Unix sockets are used.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.processes import Process
from support.waits import free_port

from spoa_mp import systemd
from spoa_mp.config import ServerConfig
from spoa_mp.systemd import InheritedSocket, Notifier, listen_fds, prepare_listener

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
CHILD_TIMEOUT = 10.0
IO_TIMEOUT = 5.0
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
SYSTEMD_HINT = "it is in Debian's `systemd` package: apt-get install systemd"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees (or leaves behind) the variables of the runner's own systemd."""
    for name in LISTEN_VARS + NOTIFY_VARS:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------- listen_fds in a forked child


def in_child(
    fds: list[int], env: dict[str, str], body: Callable[[], Any], *, pid: str = "self"
) -> Any:
    """Run `body` in a forked child whose fds 3.. are copies of `fds`, with `env`
    and LISTEN_PID set (to the child's own pid for "self"); return its JSON-able
    result, or {"error": "Type: message"} if it raised."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            out = fcntl.fcntl(write_end, fcntl.F_DUPFD, 200)  # out of the way of 3..
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, systemd.SD_LISTEN_FDS_START + i)
                os.close(fd)
            os.environ.update(env)
            os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
            try:
                result = body()
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {e}"}
            os.write(out, json.dumps(result).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        data = b""
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(child, signal.SIGKILL)  # stuck: _reap() collects it
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        _reap(child)
    assert data, "the child reported nothing"
    return json.loads(data)


def _reap(pid: int) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def describe(inherited: list[InheritedSocket]) -> dict[str, Any]:
    """What a child reports about listen_fds()'s result (JSON-able)."""
    return {
        "sockets": [
            {
                "name": s.name,
                "fd": s.sock.fileno(),
                "family": s.sock.family.name,
                "type": s.sock.type.name,
                "already_listening": s.already_listening,
                "address": s.sock.getsockname(),
                "blocking": s.sock.getblocking(),
                "inheritable": os.get_inheritable(s.sock.fileno()),
            }
            for s in inherited
        ],
        "env": {name: os.environ.get(name) for name in LISTEN_VARS},
    }


@pytest.fixture
def stream_sockets(sockdir: Path) -> Iterator[list[socket.socket]]:
    """TCP 127.0.0.1 listening, TCP ::1 bound but not listening, Unix listening."""
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.bind(("127.0.0.1", 0))
    v4.listen(8)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        v6.bind(("::1", 0))
    except OSError as e:
        v4.close()
        v6.close()
        pytest.skip(f"no IPv6 loopback here: {e}")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sockdir / "spop.sock"))
    unix.listen(8)
    socks = [v4, v6, unix]
    yield socks
    for s in socks:
        s.close()


def test_listen_fds_names_families_and_listening_state(
    stream_sockets: list[socket.socket],
) -> None:
    v4, v6, unix = stream_sockets
    env = {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "spop:spop6:admin"}

    def body() -> dict[str, Any]:
        got = listen_fds()
        report = describe(got)
        # the v6 socket was only bound: prepare_listener() makes it listen, once
        report["prepared"] = [prepare_listener(s.sock, 16) for s in got]
        report["listening_after"] = [systemd.is_listening(s.sock) for s in got]
        return report

    report = in_child([v4.fileno(), v6.fileno(), unix.fileno()], env, body)
    assert "error" not in report, report
    assert report["sockets"] == [
        {
            "name": "spop",
            "fd": 3,
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "already_listening": True,
            "address": list(v4.getsockname()),
            "blocking": False,
            "inheritable": False,
        },
        {
            "name": "spop6",
            "fd": 4,
            "family": "AF_INET6",
            "type": "SOCK_STREAM",
            "already_listening": False,
            "address": list(v6.getsockname()),
            "blocking": False,
            "inheritable": False,
        },
        {
            "name": "admin",
            "fd": 5,
            "family": "AF_UNIX",
            "type": "SOCK_STREAM",
            "already_listening": True,
            "address": unix.getsockname(),
            "blocking": False,
            "inheritable": False,
        },
    ]
    assert report["env"] == dict.fromkeys(LISTEN_VARS)  # unset for the workers
    assert report["prepared"] == [False, True, False]
    assert report["listening_after"] == [True, True, True]


def test_listen_fds_names_default_to_unknown(stream_sockets: list[socket.socket]) -> None:
    v4, _, unix = stream_sockets

    def body() -> list[str]:
        return [s.name for s in listen_fds()]

    assert in_child([v4.fileno(), unix.fileno()], {"LISTEN_FDS": "2"}, body) == [
        "unknown",
        "unknown",
    ]
    names = in_child(
        [v4.fileno(), unix.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": ":b"}, body
    )
    assert names == ["unknown", "b"]


def test_listen_fds_can_keep_the_environment(stream_sockets: list[socket.socket]) -> None:
    v4 = stream_sockets[0]

    def body() -> dict[str, Any]:
        return describe(listen_fds(unset_environment=False))

    report = in_child([v4.fileno()], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "spop"}, body)
    assert [s["name"] for s in report["sockets"]] == ["spop"]
    assert report["env"]["LISTEN_FDS"] == "1"
    assert report["env"]["LISTEN_FDNAMES"] == "spop"
    assert report["env"]["LISTEN_PID"] is not None


def test_listen_fds_for_another_pid_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork of the process systemd started (LISTEN_PID is the parent's)."""
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "spop")
    assert listen_fds() == []
    assert not any(name in os.environ for name in LISTEN_VARS)


def test_listen_fds_without_systemd_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert listen_fds() == []


@pytest.mark.parametrize(
    ("pid", "fds", "message"),
    [
        ("abc", "1", "LISTEN_PID='abc' from systemd is not a number"),
        ("self", "one", "LISTEN_FDS='one' from systemd is not a number"),
    ],
)
def test_listen_fds_malformed_environment(
    monkeypatch: pytest.MonkeyPatch, pid: str, fds: str, message: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    monkeypatch.setenv("LISTEN_FDS", fds)
    with pytest.raises(ValueError, match="^" + message + "$"):
        listen_fds()


def test_listen_fds_names_must_match_the_count(stream_sockets: list[socket.socket]) -> None:
    v4, _, unix = stream_sockets

    def body() -> list[str]:
        return [s.name for s in listen_fds()]

    report = in_child(
        [v4.fileno(), unix.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, body
    )
    assert report == {
        "error": "ValueError: LISTEN_FDNAMES from systemd names 1 sockets but LISTEN_FDS=2"
    }


def test_datagram_socket_is_refused_and_left_alone(stream_sockets: list[socket.socket]) -> None:
    v4 = stream_sockets[0]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))

    def body() -> dict[str, Any]:
        try:
            listen_fds()
        except ValueError as e:
            # the error leaves every passed fd open (nothing was wrapped and closed)
            return {"message": str(e), "open": [_is_open(3), _is_open(4)]}
        return {"message": None}

    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "spop:stats"}
    with udp:
        report = in_child([v4.fileno(), udp.fileno()], env, body)
    assert report == {
        "message": "fd 4 (stats) passed by systemd is a SOCK_DGRAM socket, not a stream "
        "(use ListenStream= in the .socket unit)",
        "open": [True, True],
    }


def test_non_socket_fd_is_refused() -> None:
    read_end, write_end = os.pipe()

    def body() -> list[str]:
        return [s.name for s in listen_fds()]

    try:
        report = in_child([read_end], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "spop"}, body)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report == {"error": "ValueError: fd 3 (spop) passed by systemd is not a socket"}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_prepare_listener_listens_only_once() -> None:
    calls: list[int] = []

    class Recording(socket.socket):
        def listen(self, backlog: int = 0, /) -> None:
            calls.append(backlog)
            super().listen(backlog)

    with Recording(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert not systemd.is_listening(sock)
        assert prepare_listener(sock, 64) is True
        assert systemd.is_listening(sock)
        assert prepare_listener(sock, 128) is False  # no second listen() (SELinux)
    assert calls == [64]


# ------------------------------------------------------------------- Notifier


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value, the bound SOCK_DGRAM socket standing in for systemd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(IO_TIMEOUT)
    if request.param == "path":
        path = str(sockdir / "notify")
        sock.bind(path)
        address = path
    else:
        name = f"spoa-mp-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        sock.bind("\0" + name)
        address = "@" + name
    with sock:
        yield address, sock


Notified = tuple[Notifier, str, socket.socket]


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch, receiver: tuple[str, socket.socket]) -> Notified:
    """(Notifier.from_environment() with NOTIFY_SOCKET naming the receiver,
    that address, the receiver's socket)."""
    address, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    return Notifier.from_environment(), address, sock


def _no_datagram(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0.05)[0]


def test_notifier_sends_one_datagram_per_call(notified: Notified) -> None:
    notifier, address, sock = notified
    assert notifier.enabled
    assert notifier.address == address
    assert "NOTIFY_SOCKET" not in os.environ  # workers must not notify

    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"
    assert notifier.ready("4 workers on 127.0.0.1:12345")
    assert sock.recv(4096) == b"READY=1\nSTATUS=4 workers on 127.0.0.1:12345"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    assert notifier.status("reloading\nconfig")  # a newline would start a new field
    assert sock.recv(4096) == b"STATUS=reloading config"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.send(status="x", errno=None, ready=True)  # upper-cased, None dropped
    assert sock.recv(4096) == b"STATUS=x\nREADY=1"
    assert notifier.send() is False
    assert notifier.send(STATUS=None) is False
    assert _no_datagram(sock)


def test_notifier_reloading_carries_the_monotonic_clock(notified: Notified) -> None:
    notifier, _, sock = notified
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after

    assert notifier.reloading("new generation")
    fields = sock.recv(4096).decode().split("\n")
    assert [f.partition("=")[0] for f in fields] == ["RELOADING", "MONOTONIC_USEC", "STATUS"]
    assert fields[2] == "STATUS=new generation"


def test_notifier_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # without NOTIFY_SOCKET: nobody to ping
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert "WATCHDOG_USEC" not in os.environ


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("500000", None, 0.25),
        ("30000000", "other", None),  # meant for another process
        ("30000000", "junk", None),
        ("junk", None, None),
        ("0", None, None),
        ("-5", None, None),
        (None, None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch,
    receiver: tuple[str, socket.socket],
    usec: str | None,
    pid: str | None,
    interval: float | None,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver[0])
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        other = str(os.getppid())
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": other}.get(pid, pid))
    notifier = Notifier.from_environment()
    assert notifier.watchdog_interval == interval
    assert not any(name in os.environ for name in NOTIFY_VARS)


def test_notifier_can_keep_the_environment(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[str, socket.socket]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver[0])
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier.from_environment(unset_environment=False)
    assert notifier.watchdog_interval == 1.0
    assert os.environ["NOTIFY_SOCKET"] == receiver[0]
    assert os.environ["WATCHDOG_USEC"] == "2000000"


def test_vanished_notify_socket_never_raises(
    monkeypatch: pytest.MonkeyPatch, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    caplog.set_level("DEBUG", logger="spoa_mp.systemd")
    for address in (str(path), f"@spoa-mp-test-nobody-{uuid.uuid4().hex}"):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        notifier = Notifier.from_environment()
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 6
    assert all(r.levelname == "DEBUG" for r in failures)


def test_closed_receiver_never_raises(notified: Notified) -> None:
    notifier, _, sock = notified
    sock.close()  # the manager went away (abstract name released, path left dangling)
    assert notifier.ready() is False


def test_unsupported_notify_socket_is_disabled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    with caplog.at_level("WARNING", logger="spoa_mp.systemd"):
        notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False
    assert "notifications disabled" in caplog.text


# ----------------------------------------------------------------- unit files


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed ({SYSTEMD_HINT})")
    return path


def _spoa_mp_script() -> Path:
    script = Path(sys.executable).parent / "spoa-mp"
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project with `pip install -e .`")
    return script


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """systemd/*.{socket,service} copied with ExecStart at this venv's spoa-mp
    (systemd-analyze verify checks that the binary exists)."""
    service = (UNITS / "spoa-mp.service").read_text()
    assert "ExecStart=/usr/local/bin/spoa-mp " in service
    service = service.replace(
        "ExecStart=/usr/local/bin/spoa-mp ", f"ExecStart={_spoa_mp_script()} "
    )
    (tmp_path / "spoa-mp.service").write_text(service)
    shutil.copy(UNITS / "spoa-mp.socket", tmp_path / "spoa-mp.socket")
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_copies: Path) -> None:
    analyze = _tool("systemd-analyze")
    units = [str(unit_copies / "spoa-mp.socket"), str(unit_copies / "spoa-mp.service")]
    done = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit_copies,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # unknown keys and unparsable values are only warnings (exit 0): refuse them too
    about_us = [line for line in output.splitlines() if "spoa-mp" in line]
    assert about_us == [], output


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Section.Key -> the values of every assignment (units allow repeats)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_unit_settings_match_the_server() -> None:
    service = _unit_settings(UNITS / "spoa-mp.service")
    sock = _unit_settings(UNITS / "spoa-mp.socket")
    defaults = ServerConfig()

    assert service["Service.Type"] == ["notify"]  # notify-reload needs systemd >= 253
    assert service["Service.NotifyAccess"] == ["main"]
    assert service["Service.KillMode"] == ["mixed"]  # TERM to the supervisor = graceful
    assert service["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (stop_timeout,) = service["Service.TimeoutStopSec"]
    assert float(stop_timeout) > defaults.graceful_timeout
    assert service["Service.Restart"] == ["on-failure"]
    assert "spoa-mp.socket" in service["Unit.Requires"][0].split()
    assert "spoa-mp.socket" in service["Unit.After"][0].split()
    assert service["Service.ExecStart"] == ["/usr/local/bin/spoa-mp $SPOA_MP_ARGS"]
    assert service["Service.EnvironmentFile"] == ["-/etc/default/spoa-mp"]
    assert service["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]

    assert sock["Socket.ListenStream"] == [f"{defaults.host}:{defaults.port}"]
    assert sock["Socket.FileDescriptorName"] == ["spop"]
    assert sock["Socket.Backlog"] == [str(defaults.backlog)]
    assert sock["Socket.NoDelay"] == ["true"]


# ----------------------------------------------------- systemd-socket-activate

CHILD_SCRIPT = textwrap.dedent(
    """
    import json, os, socket
    from spoa_mp import systemd

    seen = {name: os.environ.get(name) for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    got = systemd.listen_fds()
    report = {
        "pid": os.getpid(),
        "seen": seen,
        "left": {name: os.environ.get(name) for name in seen},
        "sockets": [
            {
                "name": s.name,
                "fd": s.sock.fileno(),
                "family": s.sock.family.name,
                "already_listening": s.already_listening,
                "address": s.sock.getsockname(),
            }
            for s in got
        ],
    }
    # a forked "worker" answers on the connection that woke systemd-socket-activate
    # up: the fd is the real listening socket, and close-on-exec does not keep
    # it from forked children
    spop = next(s.sock for s in got if s.name == "spop")
    report["listen_called"] = systemd.prepare_listener(spop, 16)
    worker = os.fork()
    if worker == 0:
        try:
            report["accepted_by"] = os.getpid()
            spop.settimeout(10)
            conn, _ = spop.accept()
            with conn:
                conn.sendall(json.dumps(report).encode())
        finally:
            os._exit(0)
    _, status = os.waitpid(worker, 0)
    raise SystemExit(os.waitstatus_to_exitcode(status))
    """
)


def _connect_until(port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read_all(conn: socket.socket, deadline: float) -> bytes:
    data = b""
    while time.monotonic() < deadline:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.e2e
def test_systemd_socket_activate_passes_a_listening_socket(sockdir: Path, tmp_path: Path) -> None:
    tool = _tool("systemd-socket-activate")
    port = free_port()
    unix_path = sockdir / "admin.sock"
    cmd = [
        tool,
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        str(unix_path),
        "--fdname=spop:admin",
        "--",
        sys.executable,
        "-c",
        CHILD_SCRIPT,
    ]
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS + NOTIFY_VARS}
    proc = Process("socket-activate", cmd, tmp_path, env=env)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        # it listens, waits for a first connection, then execs the child (same pid)
        with _connect_until(port, deadline) as conn:
            conn.settimeout(IO_TIMEOUT)
            data = _read_all(conn, deadline)
        proc.wait(CHILD_TIMEOUT)
    finally:
        proc.kill()
    err = proc.stderr()
    assert data, err
    report = json.loads(data)
    assert proc.returncode == 0, err

    assert report["pid"] == proc.pid  # exec'd in place: LISTEN_PID is right
    assert report["accepted_by"] != proc.pid
    assert report["listen_called"] is False
    assert report["seen"] == {
        "LISTEN_PID": str(proc.pid),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "spop:admin",
    }
    assert report["left"] == dict.fromkeys(LISTEN_VARS)
    assert report["sockets"] == [
        {
            "name": "spop",
            "fd": 3,
            "family": "AF_INET",
            "already_listening": True,
            "address": ["127.0.0.1", port],
        },
        {
            "name": "admin",
            "fd": 4,
            "family": "AF_UNIX",
            "already_listening": True,
            "address": str(unix_path),
        },
    ]

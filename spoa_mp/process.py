"""What the server does to its own process and the host around it: the
listening socket, the pidfile, the privilege drop, process titles, signals
sent to children and how their exit status reads.

Nothing here knows about workers' insides or the protocol; the supervisor
and the worker's after-fork setup both use it.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import signal
import socket
import stat

import psutil

from spoa_mp.config import ServerConfig

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_BOOT_ERROR = 3  # a worker that cannot start: the supervisor stops instead of respawning
SUPERVISOR_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU,
)  # fmt: skip


def open_listener(config: ServerConfig) -> socket.socket:
    """Bind the one listening socket the workers will share."""
    if config.unix:
        path = config.unix
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode) and not _in_use(path):
                os.unlink(path)  # a stale socket left by a crash
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        info = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, addr = info[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    sock.listen(config.backlog)
    sock.setblocking(False)
    return sock


def _in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def describe(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if isinstance(addr, tuple):
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"{host}:{addr[1]}"
    return f"unix:{addr}"


def write_pidfile(path: str) -> None:
    """Write our pid; refuse when the file names a spoa-mp that still runs
    (a pid reused by another program does not count)."""
    other = 0
    with contextlib.suppress(FileNotFoundError, ValueError), open(path) as f:
        other = int(f.read().strip() or 0)
    if other and other != os.getpid() and _is_spoa_mp(other):
        raise ValueError(f"{path}: spoa-mp already runs as pid {other}")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # never a half-written pidfile


def remove_pidfile(path: str) -> None:
    """Remove our pidfile; after --user the directory may not let us, so at
    least empty it: an empty pidfile names nobody."""
    try:
        os.unlink(path)
    except PermissionError:
        with contextlib.suppress(OSError), open(path, "w"):
            pass
    except OSError:
        pass


def _is_spoa_mp(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return any("spoa" in part for part in [proc.name(), *proc.cmdline()])
    except psutil.Error:
        return False


def drop_privileges(
    user: str | None,
    group: str | None,
    listener: socket.socket | None,
    pidfile: str | None = None,
) -> None:
    """Switch to --user/--group once the socket is bound (workers inherit it)."""
    if not user and not group:
        return
    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getgid())
    uid = pw.pw_uid if pw else os.getuid()
    if (uid, gid) == (os.getuid(), os.getgid()):
        return
    if os.geteuid() != 0:
        raise PermissionError("--user/--group need the server to start as root")
    if listener is not None and listener.family == socket.AF_UNIX:
        # the socket file stays usable by (and removable for) the new identity
        os.chown(listener.getsockname(), uid, gid)
    if pidfile:
        os.chown(pidfile, uid, gid)  # so that we can at least empty it on exit
    os.setgroups([])
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
    os.setgid(gid)
    os.setuid(uid)
    log.info("running as uid %d gid %d", uid, gid)


def set_title(title: str) -> None:
    try:
        import setproctitle  # noqa: PLC0415 - optional at import time for tooling

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - a declared dependency
        pass


def kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone)."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def describe_status(status: int) -> str:
    """A child's wait status as the end of a log line."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        extra = " (perhaps out of memory)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{extra}"
    code = os.WEXITSTATUS(status)
    if code == EXIT_BOOT_ERROR:
        return "failed to boot"
    return f"exited with code {code}"

"""systemd integration without libsystemd: socket activation and sd_notify.

Two small pieces, both stdlib only:

- :func:`listen_fds` takes the listening sockets systemd passed to the process
  it started (``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``, fds from 3),
  and :func:`prepare_listener` calls ``listen()`` only on those that are not
  listening yet (a second ``listen()`` on an inherited socket trips SELinux in
  some setups, gunicorn issue 3747).
- :class:`Notifier` sends the ``sd_notify`` datagrams of a ``Type=notify``
  service (READY, RELOADING + MONOTONIC_USEC, STOPPING, STATUS, WATCHDOG), and
  is a silent no-op outside systemd.

Both read the environment once, in the process systemd started (never after
a fork: gunicorn issue 875), and then remove what they read so that workers
and anything they exec do not mistake the variables for their own.

Ordering for the caller: set the process title *before* calling either of
them. setproctitle takes over the memory of the original argv and environ on
its first call; if a variable was unset before that, it silently stops
changing the title (gunicorn issue 3430; reproduced with setproctitle 1.3.8
when the unset variable is the first one of the environment)::

    setproctitle.setproctitle("spoa-mp: supervisor")   # 1. title first
    inherited = systemd.listen_fds()                     # 2. then the environment
    notifier = systemd.Notifier.from_environment()
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from typing import NamedTuple

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedSocket",
    "Notifier",
    "is_listening",
    "listen_fds",
    "prepare_listener",
]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # the first passed fd, as in sd-daemon.h
DEFAULT_FD_NAME = "unknown"  # what systemd calls a socket without FileDescriptorName=
NOTIFY_SEND_TIMEOUT = 1.0  # seconds; a stuck manager must not stall the supervisor loop

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class InheritedSocket(NamedTuple):
    """A socket received from systemd, with its FileDescriptorName=."""

    sock: socket.socket
    name: str
    already_listening: bool  # SO_ACCEPTCONN: listen() was done by systemd


# ------------------------------------------------------------ socket activation


def listen_fds(unset_environment: bool = True) -> list[InheritedSocket]:
    """The stream sockets systemd passed to this process, in fd order (3, 4, ...).

    Returns ``[]`` when there are none or when they are meant for another
    process (``LISTEN_PID`` is not ours, e.g. we are a fork of the process
    systemd started). Each fd is wrapped with ``socket.socket(fileno=fd)``, so
    family and type come from the kernel; the returned objects own the fds.
    They are made non-blocking and close-on-exec (like sd_listen_fds() does):
    forked workers still inherit them, since fork() keeps every fd.

    With ``unset_environment`` (the default) LISTEN_PID, LISTEN_FDS and
    LISTEN_FDNAMES are removed from ``os.environ`` in every case.

    Raises ValueError (one line, fit for ``spoa-mp: error: ...``) on a
    malformed variable, a passed fd that is not a socket, or a socket that is
    not SOCK_STREAM (a datagram ListenDatagram= socket cannot serve SPOP). The
    fds are then left open and untouched.
    """
    env = {name: os.environ.get(name) for name in _LISTEN_VARS}
    if unset_environment:
        for name in _LISTEN_VARS:
            os.environ.pop(name, None)

    pid_text, count_text = env["LISTEN_PID"], env["LISTEN_FDS"]
    if not pid_text or not count_text:
        return []
    pid = _parse_int("LISTEN_PID", pid_text)
    if pid != os.getpid():
        log.debug("LISTEN_FDS is for pid %d, not for us (%d): ignored", pid, os.getpid())
        return []
    count = _parse_int("LISTEN_FDS", count_text)
    if count <= 0:
        return []
    names = _fd_names(env["LISTEN_FDNAMES"], count)

    # check every fd before wrapping any, so that an error leaves them all as they were
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd, name in zip(fds, names, strict=True):
        _check_stream_socket(fd, name)

    inherited = []
    for fd, name in zip(fds, names, strict=True):
        sock = socket.socket(fileno=fd)  # family, type and protocol read from the fd
        sock.setblocking(False)
        os.set_inheritable(fd, False)  # FD_CLOEXEC: kept across fork, not across exec
        inherited.append(InheritedSocket(sock, name, is_listening(sock)))
    return inherited


def is_listening(sock: socket.socket) -> bool:
    """Whether listen() was already called on this socket (SO_ACCEPTCONN)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0


def prepare_listener(sock: socket.socket, backlog: int) -> bool:
    """Call ``sock.listen(backlog)`` unless the socket is already listening.

    Returns True when listen() was called. A socket from a systemd .socket
    unit is already listening with the unit's Backlog=, which then wins over
    ``backlog``.
    """
    if is_listening(sock):
        return False
    sock.listen(backlog)
    return True


def _parse_int(variable: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"{variable}={text!r} from systemd is not a number") from None


def _fd_names(text: str | None, count: int) -> list[str]:
    """FileDescriptorName= of each fd: LISTEN_FDNAMES is colon-separated."""
    if text is None:
        return [DEFAULT_FD_NAME] * count
    names = text.split(":")
    if len(names) != count:
        raise ValueError(
            f"LISTEN_FDNAMES from systemd names {len(names)} sockets but LISTEN_FDS={count}"
        )
    return [name or DEFAULT_FD_NAME for name in names]


def _check_stream_socket(fd: int, name: str) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ValueError(f"fd {fd} ({name}) passed by systemd: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"fd {fd} ({name}) passed by systemd is not a socket")
    # SO_TYPE through a socket object that gives the fd back instead of closing it
    probe = socket.socket(fileno=fd)
    kind = probe.type
    probe.detach()
    if kind != socket.SOCK_STREAM:
        raise ValueError(
            f"fd {fd} ({name}) passed by systemd is a {kind.name} socket, not a stream "
            "(use ListenStream= in the .socket unit)"
        )


# ------------------------------------------------------------------- sd_notify


class Notifier:
    """Sends sd_notify datagrams to the service manager; a no-op outside systemd.

    Build it once with :meth:`from_environment` in the process systemd started
    (the main pid: the units say ``NotifyAccess=main``). Every method sends one
    datagram on a fresh AF_UNIX/SOCK_DGRAM close-on-exec socket and returns
    whether it was sent; errors are logged at debug level and never raised,
    so notifications can be sent from anywhere in the supervisor loop.

    Typical use by the supervisor: ``ready()`` once the first generation of
    workers is ready; ``reloading()`` at the start of a reload and ``ready()``
    at its end; ``stopping()`` when a stop begins; ``status(text)`` for
    ``systemctl status``; ``watchdog()`` every ``watchdog_interval`` seconds
    when that is not None (WatchdogSec= set in the unit).
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        """``address`` as in NOTIFY_SOCKET: an absolute path, or ``@name`` for
        the abstract namespace; None disables the notifier."""
        self.address = address
        self.watchdog_interval = watchdog_interval if address else None

    @classmethod
    def from_environment(cls, unset_environment: bool = True) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, then (by default)
        remove them from ``os.environ`` so that workers never notify.

        ``watchdog_interval`` is half of WatchdogSec= (what sd_watchdog_enabled()
        recommends), or None without a watchdog, when WATCHDOG_PID names another
        process, or when notifications are disabled.
        """
        env = {name: os.environ.get(name) for name in _NOTIFY_VARS}
        if unset_environment:
            for name in _NOTIFY_VARS:
                os.environ.pop(name, None)

        address = env["NOTIFY_SOCKET"] or None
        if address is not None and not address.startswith(("/", "@")):
            # systemd >= 254 can also pass vsock:...; not something to serve here
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket: notifications disabled", address)
            address = None
        return cls(address, _watchdog_interval(env["WATCHDOG_USEC"], env["WATCHDOG_PID"]))

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) is complete."""
        return self.send(READY=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC: a reload starts; send ready() when done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=now_usec, STATUS=status)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: a (graceful) stop has begun."""
        return self.send(STOPPING=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping for WatchdogSec=."""
        return self.send(WATCHDOG=1)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased, None values skipped) as one
        datagram. Returns True when it was sent, False when disabled or on error."""
        if self.address is None:
            return False
        lines = [
            f"{key.upper()}={_one_line(value)}"
            for key, value in fields.items()
            if value is not None
        ]
        if not lines:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(NOTIFY_SEND_TIMEOUT)
                sock.sendto(payload, address)
        except OSError as e:
            log.debug("sd_notify to %s failed: %s", self.address, e)
            return False
        return True

    def __repr__(self) -> str:
        return f"Notifier({self.address!r}, watchdog_interval={self.watchdog_interval!r})"


def _watchdog_interval(usec_text: str | None, pid_text: str | None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    if not usec_text:
        return None
    if pid_text:
        try:
            pid = int(pid_text, 10)
        except ValueError:
            log.debug("WATCHDOG_PID=%r is not a number: watchdog ignored", pid_text)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_text, 10)
    except ValueError:
        log.debug("WATCHDOG_USEC=%r is not a number: watchdog ignored", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(value: object) -> str:
    """A newline would start a new KEY=value assignment: flatten it. True -> 1."""
    if isinstance(value, bool):
        value = int(value)
    return str(value).replace("\r", " ").replace("\n", " ")

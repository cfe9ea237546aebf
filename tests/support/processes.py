"""`Process`: a child in its own session (process group), its output in log
files, stopped by its pid, then its group, then every descendant seen.

Every wait is bounded. The tests and the bench scripts share this one
wrapper (bench/_procs.py imports it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from support.waits import START_TIMEOUT, STOP_TIMEOUT, accepting, wait_for


class ProcessExitedError(RuntimeError):
    """The process exited while it was expected to run."""


def child_env(extra: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    """This environment for a child: no PYTHONPATH (the child imports the
    installed spoa_mp), unbuffered Python output, `drop` left out, `extra` added."""
    dropped = {"PYTHONPATH", *drop}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def title(proc: psutil.Process) -> str:
    """The process title as setproctitle set it ("" when the process is gone)."""
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return ""


def gone(proc: psutil.Process) -> bool:
    """True when the process no longer exists (reaped; pid reuse is detected)."""
    try:
        return not proc.is_running()
    except psutil.Error:
        return True


def dead(proc: psutil.Process) -> bool:
    """True when the process has exited (a zombie not reaped yet counts)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class Process:
    """`argv` in its own session, stdout and stderr in `<log_dir>/<name>.stdout.log`
    and `.stderr.log`, or both in `<name>.log` when `merge_output` (appended to
    when `append`). More Popen arguments (cwd, env, pass_fds) go in `popen`.

    `stop()` is graceful (a signal to the leader, wait); `kill()` kills the
    whole group and any descendant that escaped it; `shutdown()` is one then
    the other. All are idempotent.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        merge_output: bool = False,
        append: bool = False,
        **popen: Any,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        if merge_output:
            self.stdout_path = self.stderr_path = log_dir / f"{name}.log"
        else:
            self.stdout_path = log_dir / f"{name}.stdout.log"
            self.stderr_path = log_dir / f"{name}.stderr.log"
        mode = "ab" if append else "wb"
        with self.stdout_path.open(mode) as out, self.stderr_path.open(mode) as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if merge_output else err,
                start_new_session=True,
                **popen,
            )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)
        self._known: dict[int, psutil.Process] = {self.pid: self.ps}

    # -- state

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def descendants(self, recursive: bool = True) -> list[psutil.Process]:
        """Live descendants (or children); remembered so kill() finds them later."""
        try:
            kids = self.ps.children(recursive=recursive)
        except psutil.Error:
            return []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return kids

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants now; [] once it is gone."""
        kids = self.descendants()
        return [self.ps, *kids] if self.alive() else []

    def known(self) -> list[psutil.Process]:
        """Every process of the tree seen so far."""
        self.descendants()
        return list(self._known.values())

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def logs(self) -> str:
        """Its output, labelled, for a failure report."""
        parts = []
        paths = dict.fromkeys((self.stderr_path, self.stdout_path))
        for label, path in zip(("stderr", "stdout"), paths, strict=False):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(f"[{self.name} {label}: {path}]\n{text}")
        return "\n".join(parts) or f"[{self.name}: no output]"

    def check_alive(self) -> None:
        if not self.alive():
            raise ProcessExitedError(
                f"{self.name} exited with {self.returncode}: {shlex.join(self.argv)}\n"
                + self.logs()
            )

    # -- waits

    def wait_accepting(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Until 127.0.0.1:port accepts TCP connections; fails early if we exit."""

        def ready() -> bool:
            self.check_alive()
            return accepting(port)

        wait_for(ready, timeout, f"{self.name} to accept on port {port}")

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Its exit status; TimeoutError if it still runs after `timeout`."""
        self.descendants()  # remember the workers before they go
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout} s") from None

    # -- endings

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT, signum: int = signal.SIGTERM) -> int:
        """Graceful stop: `signum` to the leader, wait for its exit status
        (subprocess.TimeoutExpired if it does not exit in time)."""
        self.descendants()  # remember the workers before they go
        if self.alive():
            self.send_signal(signum)
        return self.popen.wait(timeout=timeout)

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGKILL the process group and every process of the tree we saw; reap
        the leader and wait (bounded) until the others are dead (a zombie
        counts: its parent or init reaps it)."""
        self.descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # session leader: pgid == pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        others = [p for pid, p in self._known.items() if pid != self.pid]
        for p in others:  # escaped the group (setsid/setpgid)?
            if not dead(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        wait_for(lambda: all(dead(p) for p in others), timeout, f"{self.name}'s processes to die")

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and a bounded wait, then kill() whatever is left."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stop(timeout)
        self.kill(timeout)


def owner_of(client: socket.socket, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the server side of the TCP connection `client`."""
    local = client.getsockname()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.raddr and (c.raddr.ip, c.raddr.port) == (local[0], local[1]):
                return pid
    return None

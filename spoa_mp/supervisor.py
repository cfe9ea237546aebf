"""The supervisor: opens the listening sockets once, pre-forks the workers,
watches them, and stops them.

Signal handlers only record: `signal.set_wakeup_fd` writes each signal
number to a socket that sits in the same selector as every worker's control
pipe, and the loop does the work. Children are reaped without blocking.
A worker that stops beating for --worker-timeout is killed and replaced;
dead workers are respawned with a growing delay; workers that cannot boot
stop the server with one clear line instead of a crash loop.

Signals: TERM and INT stop gracefully (stop accepting, finish in-flight
messages, close) within --graceful-timeout, then SIGKILL; a second INT, or
QUIT, stops at once. HUP reloads: the configuration, the --app module and
the reputation data are read again and a new generation of workers starts;
once all of it is ready, the old workers hand their HAProxy connections
over, between two frames, through the supervisor (which relays the sockets
and never reads them), and exit. If the new generation cannot start, the old
one keeps serving. --reload-mode rolling does it one worker at a time;
drain lets the old workers finish and close instead (replacing.py).

Start-up is server.py; each worker is a WorkerProcess (worker_process.py) given a WorkerOptions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from spoa_mp import control, event_loop, systemd
from spoa_mp.agent import Agent
from spoa_mp.blocklist import FileWatcher
from spoa_mp.config import ServerConfig
from spoa_mp.loader import watched_files
from spoa_mp.metrics import Aggregator
from spoa_mp.metrics_http import MetricsServer
from spoa_mp.metrics_prometheus import exposition, registry_for
from spoa_mp.process import (
    EXIT_FAILURE,
    EXIT_OK,
    SUPERVISOR_SIGNALS,
    describe,
    describe_status,
    kill,
)
from spoa_mp.replacing import RSS_CHECK_INTERVAL, Reload, Replacing
from spoa_mp.worker import worker_main
from spoa_mp.worker_options import options_for
from spoa_mp.worker_process import Death, WorkerProcess

CAPABILITIES = ("pipelining", "fragmentation")  # what the HELLO may offer
log = logging.getLogger(__name__)

RESPAWN_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # per worker slot, reset once it is ready
MAX_BOOT_FAILURES = 5  # consecutive workers dying before ready, with none ever ready


class HaltError(Exception):
    """Stop the server: `reason` is logged, `code` is the exit status."""

    def __init__(self, reason: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Supervisor(Replacing):
    def __init__(
        self,
        config: ServerConfig,
        agent: Agent,
        listeners: list[socket.socket],
        notifier: systemd.Notifier | None = None,
        own_socket_file: bool = True,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.notifier = notifier or systemd.Notifier(None)
        self.own_socket_file = own_socket_file  # never unlink a socket systemd created
        self._announced_ready = False
        self._next_watchdog = 0.0
        self._rate_mark = (time.monotonic(), 0)  # (when, messages_total) at the last STATUS
        # counters of every worker, alive or gone, summed (never going down)
        self.aggregator = Aggregator()
        self.registry = registry_for(self.aggregator)
        self.metrics_server = metrics_server
        self._restarts = 0
        self._reloads = 0
        self._reloads_failed = 0
        self.options = options_for(config, agent, tuple(listeners))
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.generation = 1
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._respawn_at: dict[int, float] = {}  # slot index -> when (current generation)
        self._failures: dict[int, int] = {}  # slot index -> consecutive deaths before ready
        self._ever_ready = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._exit_code = EXIT_OK
        self._reload: Reload | None = None
        self._next_target = 0  # round robin over the workers adopting connections
        self.target_workers = config.workers  # SIGTTIN/SIGTTOU change it until a reload
        self._next_rss_check = time.monotonic() + RSS_CHECK_INTERVAL
        self._watcher = FileWatcher(watched_files(config))

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        self._install_signals()
        try:
            c = self.config
            offered = zip(CAPABILITIES, (c.pipelining, c.fragmentation), strict=True)
            caps = [name for name, on in offered if on]
            log.info(
                "spoa-mp %s (pid %d): %d worker(s) on %s; SPOP 2.0, max-frame-size %d, "
                "capabilities offered: %s; reload mode %s; event loop %s; agent %s",
                _version(), os.getpid(), c.workers, ", ".join(describe(s) for s in self.listeners),
                c.max_frame_size, ",".join(caps) or "none", c.reload_mode,
                event_loop.describe(c.loop), c.app or "built-in IP reputation",
            )  # fmt: skip
            for index in range(1, self.config.workers + 1):
                self._spawn(index)
            while self.workers or not self._stopping:
                self._wait()
                self._reap()
                self._check_timeouts()
                if not self._stopping:
                    self._check_reload()
                    self._check_files()
                    self._check_recycling()
                    self._respawn_due()
                self._tell_systemd()
        except HaltError as e:
            log.error("%s", e.reason)
            self._exit_code = e.code
            self._stopping = True  # the others' deaths are expected now, not news
            self._kill_all(signal.SIGKILL)
            self._reap_all()
        finally:
            self._cleanup()
        return self._exit_code

    def _tell_systemd(self) -> None:
        """READY once the first generation serves, STATUS, and the watchdog
        ping: sent from this loop, so a wedged supervisor stops pinging."""
        n = self.notifier
        if not n.enabled:
            return
        now = time.monotonic()
        if not self._announced_ready and not self._stopping:
            current = self._current()
            if current and all(p.served for p in current):
                self._announced_ready = True
                n.ready(self._status())
        if n.watchdog_interval and now >= self._next_watchdog:
            self._next_watchdog = now + n.watchdog_interval
            n.watchdog()
            if self._announced_ready and not self._stopping:
                n.status(self._status())

    def messages_total(self) -> int:
        """Messages handled since start, by workers alive or gone (monotonic)."""
        return self.aggregator.total("messages")

    def render_metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The /metrics body and its content type (OpenMetrics if `accept` asks)."""
        self.aggregator.set_supervisor(
            workers_alive=sum(1 for p in self.workers.values() if p.serving),
            worker_restarts=self._restarts,
            reloads=self._reloads,
            reloads_failed=self._reloads_failed,
            generation=self.generation,
        )
        return exposition(self.registry, accept)

    def _status(self) -> str:
        now = time.monotonic()
        total = self.messages_total()
        rate = (total - self._rate_mark[1]) / max(now - self._rate_mark[0], 1e-3)
        self._rate_mark = (now, total)
        alive = [p for p in self.workers.values() if p.serving]
        return (
            f"{len(alive)} worker(s), {sum(p.connections for p in alive)} connection(s), "
            f"{rate:.0f} msg/s, {total} messages, generation {self.generation}"
        )

    def _wait(self) -> None:
        timeout = 1.0
        now = time.monotonic()
        if self._respawn_at and not self._stopping:
            timeout = max(0.0, min(timeout, min(self._respawn_at.values()) - now))
        if self._stopping:
            timeout = max(0.0, min(timeout, self._stop_deadline - now))
        if self.notifier.watchdog_interval:  # never ping later than systemd wants
            timeout = max(0.0, min(timeout, self._next_watchdog - now))
        timeout = max(0.0, min(timeout, self._watcher.next_check - now))
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._read_signals()
            elif isinstance(key.data, MetricsServer):
                key.data.handle(key)
            else:
                self._read_control(key.data)
        if self.metrics_server is not None:
            self.metrics_server.expire()
        if self._stopping and time.monotonic() >= self._stop_deadline and self.workers:
            log.warning("graceful timeout: killing %d worker(s) still running", len(self.workers))
            self._kill_all(signal.SIGKILL)
            self._stop_deadline = float("inf")

    # ---------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        if self.metrics_server is not None:
            self.metrics_server.register(self.selector)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in SUPERVISOR_SIGNALS:
            # the C-level handler writes the number to the wakeup socket;
            # the Python one does nothing, so no work ever runs in a handler
            signal.signal(sig, _record_only)

    def _read_signals(self) -> None:
        try:
            data = self._wake_r.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._graceful_stop(signal.Signals(signum).name)
            elif signum == signal.SIGQUIT:
                self._quick_stop()
            elif signum == signal.SIGHUP and not self._stopping:
                self._start_reload()
            elif signum == signal.SIGTTIN and not self._stopping:
                self._add_worker()
            elif signum == signal.SIGTTOU and not self._stopping:
                self._remove_worker()
            # SIGCHLD: reaping follows every wake-up anyway

    def _graceful_stop(self, why: str) -> None:
        if self._stopping:
            # a second Ctrl-C means "now"; a second TERM is often the same
            # stop delivered twice (to us, then to our process group)
            if why == "SIGINT":
                log.info("SIGINT again: stopping at once")
                self._quick_stop()
            return
        self._stopping = True
        self.notifier.stopping()
        self._stop_deadline = time.monotonic() + self.config.graceful_timeout
        log.info("%s: graceful stop (up to %.0f s)", why, self.config.graceful_timeout)
        self._close_listeners()
        self._kill_all(signal.SIGTERM)

    def _quick_stop(self) -> None:
        if not self._stopping:
            self.notifier.stopping()
        self._stopping = True
        self._stop_deadline = time.monotonic() + 1.0  # then SIGKILL
        self._close_listeners()
        self._kill_all(signal.SIGQUIT)

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()

    # ---------------------------------------------------------------- workers

    def _spawn(self, index: int) -> int:
        ours, theirs = control.channel()
        gc.collect()
        gc.freeze()  # keep the shared heap out of the collector: pages stay shared
        pid = os.fork()
        if pid == 0:  # child
            code = EXIT_FAILURE
            try:
                ours.close()
                code = worker_main(index, self.options, theirs, self._held_by_supervisor())
            except BaseException:
                with contextlib.suppress(Exception):
                    log.exception("worker %d crashed", index)
            finally:
                os._exit(code)
        theirs.close()
        proc = WorkerProcess(index, self.generation, pid, ours, time.monotonic())
        self.workers[pid] = proc
        self.selector.register(ours, selectors.EVENT_READ, proc)
        log.debug("worker %d started (pid %d, generation %d)", index, pid, self.generation)
        return pid

    def _held_by_supervisor(self) -> list[Callable[[], None]]:
        """What a forked child must close: the supervisor's descriptors."""
        held: list[Callable[[], None]] = []
        if self.metrics_server is not None:
            held.append(self.metrics_server.close_in_child)  # shared epoll: do not unregister
        held += [self.selector.close, self._wake_r.close, self._wake_w.close]
        held += [p.channel.close for p in self.workers.values() if p.channel is not None]
        return held

    def _read_control(self, proc: WorkerProcess) -> None:
        while proc.channel is not None:
            try:
                got = control.receive(proc.channel)
            except EOFError:  # the worker is gone; reaping will say how
                self._forget_control(proc)
                return
            if got is None:
                return
            msg, fds = got
            proc.beat(time.monotonic())
            kind = msg["kind"]
            if kind == control.CONNECTION and len(fds) == 1:
                self._relay(msg, fds[0])
                continue
            for fd in fds:  # nothing else carries descriptors: never leak one
                os.close(fd)
            if kind == control.BEAT:
                gauges = msg.get("gauges")
                self.aggregator.update(str(proc.pid), msg.get("counters"), gauges, slot=proc.index)
                if isinstance(gauges, dict):
                    proc.connections = _int(gauges.get("connections"))
            elif kind == control.READY:
                proc.mark_ready()
                self._ever_ready = True
                self._failures.pop(proc.index, None)
                log.info("worker %d ready (pid %d)", proc.index, proc.pid)
            elif kind == control.BOOT_ERROR:
                proc.mark_boot_failed(str(msg.get("error", "")))
            elif kind == control.RECYCLE:
                self._recycle(proc, f"handled {msg.get('messages', '?')} messages")
            elif kind == control.HANDED_OVER:
                log.info(
                    "worker %d (pid %d) handed %s connection(s) over",
                    proc.index, proc.pid, msg.get("moved", "?"),
                )  # fmt: skip

    def _relay(self, msg: control.Message, fd: int) -> None:
        """Pass a connection from a retiring worker to a current one. The
        supervisor only carries the descriptor; it never reads the socket."""
        serving = [p for p in self.workers.values() if p.serving and p.channel]
        # the newest generation if it is up; otherwise any worker still serving
        # (a late handover while the next reload is starting)
        targets = [p for p in serving if p.generation == self.generation] or serving
        try:
            if not targets or self._stopping:
                log.warning("a connection could not be handed over: no worker to take it")
                return
            self._next_target = (self._next_target + 1) % len(targets)
            target = targets[self._next_target]
            assert target.channel is not None
            try:
                passed = control.PassedConnection.from_message(msg)
            except ValueError as e:
                log.warning("a connection could not be handed over: %s", e)
                return
            if not control.send(target.channel, control.ADOPT, fds=(fd,), **passed.fields()):
                log.warning("worker %d could not take a connection: closed", target.index)
        finally:
            os.close(fd)  # the adopter has its own descriptor now

    def _forget_control(self, proc: WorkerProcess) -> None:
        if proc.channel is not None:
            self.selector.unregister(proc.channel)
            proc.channel.close()
            proc.channel = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.workers.get(pid)
            if proc is None:
                continue  # not ours (we may be PID 1 in a container)
            if proc.channel is not None:
                with contextlib.suppress(EOFError, OSError):
                    self._read_control(proc)  # a last beat, boot_error or handover
                self._forget_control(proc)
            del self.workers[pid]
            self.aggregator.retire(str(pid))  # its counts stay in the totals
            self._worker_died(proc, status)

    def _worker_died(self, proc: WorkerProcess, status: int) -> None:
        how = describe_status(status)
        death = proc.death()
        if self._stopping or death is Death.EXPECTED:
            log.debug("worker %d (pid %d) %s", proc.index, proc.pid, how)
            return
        r = self._reload
        if r is not None and proc.generation == r.generation and not proc.served:
            self._abort_reload(
                f"worker {proc.index} of the new generation "
                + (f"failed to boot: {proc.boot_error}" if proc.boot_error else how)
            )
            return
        if proc.generation != self.generation:
            log.warning("worker %d (pid %d, old generation) %s", proc.index, proc.pid, how)
            return
        if any(p.successor == proc.pid for p in self.workers.values()):
            # a successor died while starting: its predecessor still serves
            log.warning("worker %d (pid %d), a replacement, %s", proc.index, proc.pid, how)
            return
        if death is Death.BOOT_FAILED:
            if not self._ever_ready:
                raise HaltError(f"worker {proc.index} failed to boot: {proc.boot_error}")
            log.error("worker %d failed to boot: %s", proc.index, proc.boot_error)
        elif death is Death.HUNG:
            log.warning(
                "worker %d (pid %d) was killed after --worker-timeout", proc.index, proc.pid
            )
        else:
            log.warning("worker %d (pid %d) %s", proc.index, proc.pid, how)
        if not proc.served:
            failures = self._failures.get(proc.index, 0) + 1
            self._failures[proc.index] = failures
            if not self._ever_ready and failures >= MAX_BOOT_FAILURES:
                raise HaltError(
                    f"worker {proc.index} died {failures} times before it was ready "
                    f"(last: {how}); giving up"
                )
        delay = RESPAWN_DELAYS[min(self._failures.get(proc.index, 0), len(RESPAWN_DELAYS) - 1)]
        self._respawn_at[proc.index] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._respawn_at.items()):
            if when <= now:
                del self._respawn_at[index]
                self._restarts += 1
                self._spawn(index)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for proc in self.workers.values():
            if proc.overdue(now, self.config.worker_timeout):
                # a wedged loop cannot act on SIGTERM: SIGKILL it
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1f s: killing it",
                    proc.index, proc.pid, now - proc.last_beat,
                )  # fmt: skip
                proc.kill_for_timeout()
                kill(proc.pid, signal.SIGKILL)

    def _kill_all(self, sig: signal.Signals) -> None:
        for pid in list(self.workers):
            kill(pid, sig)

    def _reap_all(self) -> None:
        deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                self.selector.select(0.05)

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for proc in self.workers.values():
            self._forget_control(proc)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()
        if self.config.unix and self.own_socket_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix)


def _int(value: object) -> int:
    """A counter from a worker's heartbeat (JSON: never trust its type)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _record_only(signum: int, frame: object) -> None:
    """Python-level signal handler: the wakeup fd already carries the signal."""


def _version() -> str:
    from spoa_mp import __version__  # noqa: PLC0415

    return __version__

"""The supervisor: opens the listening sockets once, pre-forks the workers,
watches them, and stops them.

Signal handlers only record: `signal.set_wakeup_fd` writes each signal
number to a socket that sits in the same selector as every worker's health
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
drain lets the old workers finish and close instead.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

from spoa_mp import health, logs, systemd
from spoa_mp.agent import Agent, AppLoadError
from spoa_mp.blocklist import FileWatcher
from spoa_mp.config import ConfigError, ServerConfig, reload_config
from spoa_mp.dispatch import DispatchSettings
from spoa_mp.loader import build_agent, watched_files
from spoa_mp.metrics import Aggregator
from spoa_mp.metrics_http import MetricsServer, exposition, registry_for
from spoa_mp.process import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    SUPERVISOR_SIGNALS,
    describe,
    describe_status,
    drop_privileges,
    kill,
    open_listener,
    remove_pidfile,
    rss,
    set_title,
    write_pidfile,
)
from spoa_mp.protocol import AgentSettings
from spoa_mp.worker import ConnectionLimits, worker_main

log = logging.getLogger(__name__)

RESPAWN_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # per worker slot, reset once it is ready
MAX_BOOT_FAILURES = 5  # consecutive workers dying before ready, with none ever ready
RSS_CHECK_INTERVAL = 5.0


class HaltError(Exception):
    """Stop the server: `reason` is logged, `code` is the exit status."""

    def __init__(self, reason: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(eq=False, slots=True)
class WorkerProcess:
    index: int
    generation: int
    pid: int
    control: socket.socket | None  # our end of its control channel (health.py)
    started: float
    last_beat: float
    ready: bool = False
    boot_error: str | None = None
    connections: int = 0
    killed: bool = False
    retiring: bool = False  # told to hand over or stop after a reload
    successor: int = 0  # recycling: pid of the worker that will take over


@dataclass(slots=True)
class Reload:
    """A reload under way: the new generation is starting."""

    generation: int
    mode: str
    deadline: float  # the new workers must be ready by then
    previous: tuple[ServerConfig, Agent, AgentSettings]  # what to go back to
    slots: list[int]  # rolling: slots still to replace, in order


class Supervisor:
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
        self.agent = agent
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
        self.settings = settings_for(config)
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
            offered = (
                ("pipelining", self.config.pipelining),
                ("fragmentation", self.config.fragmentation),
            )
            caps = [name for name, on in offered if on]
            log.info(
                "spoa-mp %s (pid %d): %d worker(s) on %s; SPOP 2.0, max-frame-size %d, "
                "capabilities offered: %s; reload mode %s; agent %s",
                _version(), os.getpid(), self.config.workers,
                ", ".join(describe(s) for s in self.listeners),
                self.config.max_frame_size, ",".join(caps) or "none",
                self.config.reload_mode, self.config.app or "built-in IP reputation",
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
            if current and all(p.ready for p in current):
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
            workers_alive=sum(1 for p in self.workers.values() if p.ready and not p.retiring),
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
        alive = [p for p in self.workers.values() if p.ready and not p.retiring]
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

    # ---------------------------------------------------------------- reload

    def _start_reload(self) -> None:
        if self._reload is not None:
            log.warning("SIGHUP: a reload is already under way; ignored")
            return
        try:
            config = reload_config(self.config)
            agent = build_agent(config, reload=True)
        except (ConfigError, AppLoadError, ValueError, OSError) as e:
            log.error("reload failed, the running workers keep serving: %s", e)
            self._reloads_failed += 1
            return
        agent.freeze()
        if config.listen_description() != self.config.listen_description():
            log.warning(
                "reload: the listening address (%s) changes only with a restart; keeping %s",
                config.listen_description(), self.config.listen_description(),
            )  # fmt: skip
        self.notifier.reloading()
        previous = (self.config, self.agent, self.settings)
        self.config, self.agent, self.settings = config, agent, settings_for(config)
        self.generation += 1
        self.target_workers = config.workers
        self._respawn_at.clear()  # old slots are not refilled: the new generation replaces them
        self._failures.clear()
        slots = list(range(1, config.workers + 1))
        self._reload = Reload(
            generation=self.generation,
            mode=config.reload_mode,
            deadline=time.monotonic() + config.worker_timeout,
            previous=previous,
            slots=slots,
        )
        log.info(
            "SIGHUP: reloading (generation %d, %d worker(s), %s)",
            self.generation, config.workers, config.reload_mode,
        )  # fmt: skip
        first = slots[:1] if config.reload_mode == "rolling" else slots
        for index in first:
            self._spawn(index)

    def _check_files(self) -> None:
        """A changed blocklist reloads as SIGHUP does (zero-loss handover)."""
        if self._reload is not None:
            return  # looked at once the reload is over
        paths = watched_files(self.config)
        if paths != self._watcher.paths:  # a reload changed the list of files
            self._watcher = FileWatcher(paths)
        changed = self._watcher.changed()
        if changed:
            log.info("%s changed: reloading", ", ".join(changed))
            self._start_reload()

    def _check_reload(self) -> None:
        r = self._reload
        if r is None:
            return
        new = [p for p in self.workers.values() if p.generation == r.generation]
        old = [p for p in self.workers.values() if p.generation < r.generation]
        if time.monotonic() > r.deadline and not all(p.ready for p in new):
            self._abort_reload("the new workers were not ready in time")
            return
        if r.mode == "rolling":
            self._roll(r, new, old)
            return
        if len(new) < len(r.slots) or not all(p.ready for p in new):
            return
        for proc in old:
            self._retire(proc, r.mode)
        self._reload_done(r)

    def _reload_done(self, r: Reload) -> None:
        self._reloads += 1
        self._reload = None
        log.info("reload: generation %d serving", r.generation)
        self.notifier.ready(self._status())

    def _roll(self, r: Reload, new: list[WorkerProcess], old: list[WorkerProcess]) -> None:
        """Rolling mode: replace one worker at a time, each once its successor
        is ready."""
        if not all(p.ready for p in new):
            return
        index = r.slots.pop(0)
        for proc in old:
            if proc.index == index and not proc.retiring:
                self._retire(proc, "handover")
        if r.slots:
            self._spawn(r.slots[0])
            r.deadline = time.monotonic() + self.config.worker_timeout
            return
        for proc in old:  # slots the new configuration no longer has
            if not proc.retiring:
                self._retire(proc, "handover")
        self._reload_done(r)

    def _retire(self, proc: WorkerProcess, mode: str) -> None:
        proc.retiring = True
        if mode == "drain" or proc.control is None:
            kill(proc.pid, signal.SIGTERM)
        elif not health.send(proc.control, health.HANDOVER):
            kill(proc.pid, signal.SIGTERM)  # its channel is gone: drain it instead

    def _abort_reload(self, why: str) -> None:
        r = self._reload
        assert r is not None
        log.error("reload failed, the running workers keep serving: %s", why)
        self._reloads_failed += 1
        self.config, self.agent, self.settings = r.previous
        self.generation = r.generation - 1
        self.target_workers = self.config.workers
        self._reload = None
        for proc in list(self.workers.values()):
            if proc.generation != r.generation or proc.retiring:
                continue
            if proc.ready:
                # a rolling reload got this far: it may hold connections that
                # moved to it; they move back to the previous generation
                self._retire(proc, "handover")
            else:
                proc.retiring = True
                kill(proc.pid, signal.SIGKILL)
        # slots whose old worker already left (rolling) get a new one
        live = {p.index for p in self._current() if not p.retiring}
        now = time.monotonic()
        for index in range(1, self.target_workers + 1):
            if index not in live:
                self._respawn_at[index] = now
        self.notifier.ready(f"reload failed: {why}")

    # ---------------------------------------------------------------- recycling

    def _recycle(self, proc: WorkerProcess, why: str) -> None:
        """Replace a worker without losing a message: a successor starts, and
        once it is ready the worker hands its connections over and exits."""
        if proc.retiring or proc.successor or proc.generation != self.generation:
            return
        if self._reload is not None:
            return  # the reload replaces it anyway
        log.info("worker %d (pid %d) %s: replacing it", proc.index, proc.pid, why)
        self._restarts += 1
        proc.successor = self._spawn(proc.index)

    def _check_recycling(self) -> None:
        now = time.monotonic()
        if self.config.max_rss and now >= self._next_rss_check:
            self._next_rss_check = now + RSS_CHECK_INTERVAL
            limit = self.config.max_rss << 20
            for proc in list(self.workers.values()):
                used = rss(proc.pid)
                if used > limit and proc.ready:
                    self._recycle(proc, f"uses {used >> 20} MiB (--max-rss {self.config.max_rss})")
        for proc in list(self.workers.values()):
            if not proc.successor or proc.retiring:
                continue
            successor = self.workers.get(proc.successor)
            if successor is None:
                proc.successor = 0  # it died: the next request or check tries again
            elif successor.ready:
                self._retire(proc, "handover")

    def _add_worker(self) -> None:
        self.target_workers += 1
        taken = {p.index for p in self._current() if not p.retiring} | set(self._respawn_at)
        index = next(i for i in range(1, len(taken) + 2) if i not in taken)
        log.info("SIGTTIN: %d worker(s)", self.target_workers)
        self._spawn(index)

    def _remove_worker(self) -> None:
        current = [p for p in self._current() if not p.retiring]
        if self.target_workers <= 1 or not current:
            log.info("SIGTTOU: keeping the last worker")
            return
        self.target_workers -= 1
        last = max(current, key=lambda p: p.index)
        self._respawn_at.pop(last.index, None)
        log.info("SIGTTOU: %d worker(s); worker %d hands over", self.target_workers, last.index)
        self._retire(last, "handover")

    def _current(self) -> list[WorkerProcess]:
        return [p for p in self.workers.values() if p.generation == self.generation]

    # ---------------------------------------------------------------- workers

    def _spawn(self, index: int) -> int:
        ours, theirs = health.channel()
        gc.collect()
        gc.freeze()  # keep the shared heap out of the collector: pages stay shared
        pid = os.fork()
        if pid == 0:  # child
            code = EXIT_FAILURE
            try:
                ours.close()
                code = self._child(index, theirs)
            except BaseException:
                with contextlib.suppress(Exception):
                    log.exception("worker %d crashed", index)
            finally:
                os._exit(code)
        theirs.close()
        now = time.monotonic()
        proc = WorkerProcess(
            index=index, generation=self.generation, pid=pid, control=ours,
            started=now, last_beat=now,
        )  # fmt: skip
        self.workers[pid] = proc
        self.selector.register(ours, selectors.EVENT_READ, proc)
        log.debug("worker %d started (pid %d, generation %d)", index, pid, self.generation)
        return pid

    def _child(self, index: int, control: socket.socket) -> int:
        signal.set_wakeup_fd(-1)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches us via the supervisor
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(EXIT_OK))
        if self.metrics_server is not None:
            self.metrics_server.close_in_child()  # the epoll set is shared: do not unregister
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        for other in self.workers.values():
            if other.control is not None:
                other.control.close()
        set_title(f"spoa-mp: worker {index}")
        logs.set_role(f"worker {index}")
        recycle_after = 0
        if self.config.max_requests:
            recycle_after = self.config.max_requests + random.randint(
                0, self.config.max_requests_jitter
            )
        dispatch = DispatchSettings(
            handler_timeout=self.config.handler_timeout,
            max_pending=self.config.max_pending,
            blocking_threads=self.config.blocking_threads,
        )
        return worker_main(
            index, self.listeners, self.agent, self.settings, control,
            self.config.max_in_flight, self.config.graceful_timeout, self.config.debug,
            recycle_after, dispatch,
            ConnectionLimits(self.config.hello_timeout, self.config.max_connections),
        )  # fmt: skip

    def _read_control(self, proc: WorkerProcess) -> None:
        while proc.control is not None:
            try:
                got = health.receive(proc.control)
            except EOFError:  # the worker is gone; reaping will say how
                self._forget_control(proc)
                return
            if got is None:
                return
            msg, fds = got
            proc.last_beat = time.monotonic()
            kind = msg["kind"]
            if kind == health.HANDOVER and len(fds) == 1:
                self._relay(msg, fds[0])
                continue
            for fd in fds:  # nothing else carries descriptors: never leak one
                os.close(fd)
            if kind == health.BEAT:
                gauges = msg.get("gauges")
                self.aggregator.update(str(proc.pid), msg.get("counters"), gauges, slot=proc.index)
                if isinstance(gauges, dict):
                    proc.connections = _int(gauges.get("connections"))
            elif kind == health.READY:
                proc.ready = True
                self._ever_ready = True
                self._failures.pop(proc.index, None)
                log.info("worker %d ready (pid %d)", proc.index, proc.pid)
            elif kind == health.BOOT_ERROR:
                proc.boot_error = str(msg.get("error", ""))
            elif kind == health.RECYCLE:
                self._recycle(proc, f"handled {msg.get('messages', '?')} messages")
            elif kind == health.HANDED_OVER:
                log.info(
                    "worker %d (pid %d) handed %s connection(s) over",
                    proc.index, proc.pid, msg.get("moved", "?"),
                )  # fmt: skip

    def _relay(self, msg: health.Message, fd: int) -> None:
        """Pass a connection from a retiring worker to a current one. The
        supervisor only carries the descriptor; it never reads the socket."""
        serving = [p for p in self.workers.values() if p.ready and not p.retiring and p.control]
        # the newest generation if it is up; otherwise any worker still serving
        # (a late handover while the next reload is starting)
        targets = [p for p in serving if p.generation == self.generation] or serving
        try:
            if not targets or self._stopping:
                log.warning("a connection could not be handed over: no worker to take it")
                return
            self._next_target = (self._next_target + 1) % len(targets)
            target = targets[self._next_target]
            assert target.control is not None
            if not health.send(
                target.control, health.ADOPT, fds=(fd,), state=msg.get("state"),
                peer=msg.get("peer", ""),
            ):  # fmt: skip
                log.warning("worker %d could not take a connection: closed", target.index)
        finally:
            os.close(fd)  # the adopter has its own descriptor now

    def _forget_control(self, proc: WorkerProcess) -> None:
        if proc.control is not None:
            self.selector.unregister(proc.control)
            proc.control.close()
            proc.control = None

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
            if proc.control is not None:
                with contextlib.suppress(EOFError, OSError):
                    self._read_control(proc)  # a last beat, boot_error or handover
                self._forget_control(proc)
            del self.workers[pid]
            self.aggregator.retire(str(pid))  # its counts stay in the totals
            self._worker_died(proc, status)

    def _worker_died(self, proc: WorkerProcess, status: int) -> None:
        how = describe_status(status)
        if self._stopping or proc.retiring:
            log.debug("worker %d (pid %d) %s", proc.index, proc.pid, how)
            return
        r = self._reload
        if r is not None and proc.generation == r.generation and not proc.ready:
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
        if proc.boot_error:
            if not self._ever_ready:
                raise HaltError(f"worker {proc.index} failed to boot: {proc.boot_error}")
            log.error("worker %d failed to boot: %s", proc.index, proc.boot_error)
        elif proc.killed:
            log.warning(
                "worker %d (pid %d) was killed after --worker-timeout", proc.index, proc.pid
            )
        else:
            log.warning("worker %d (pid %d) %s", proc.index, proc.pid, how)
        if not proc.ready:
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
            if not proc.killed and now - proc.last_beat > self.config.worker_timeout:
                # a wedged loop cannot act on SIGTERM: SIGKILL it
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1f s: killing it",
                    proc.index, proc.pid, now - proc.last_beat,
                )  # fmt: skip
                proc.killed = True
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


def settings_for(config: ServerConfig) -> AgentSettings:
    return AgentSettings(
        max_frame_size=config.max_frame_size,
        pipelining=config.pipelining,
        fragmentation=config.fragmentation,
    )


def _record_only(signum: int, frame: object) -> None:
    """Python-level signal handler: the wakeup fd already carries the signal."""


def _version() -> str:
    from spoa_mp import __version__  # noqa: PLC0415

    return __version__


def serve(config: ServerConfig) -> int:
    """Run the server until it is stopped; returns the exit code."""
    # the title first: setproctitle stops working if the environment changes
    # before its first use (gunicorn #3430), and systemd.py edits it
    set_title("spoa-mp: supervisor")
    notifier = systemd.Notifier.from_environment()
    try:
        inherited = systemd.listen_fds()  # before the user's app can see LISTEN_*
    except ValueError as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        agent = build_agent(config)
    except (AppLoadError, ValueError, OSError) as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    agent.freeze()
    if inherited:
        # socket activation: systemd's socket unit says where we listen
        named = [s.sock for s in inherited if s.name == "spop"]
        listeners = named or [s.sock for s in inherited]
        for sock in listeners:
            systemd.prepare_listener(sock, config.backlog)
        listener = listeners[0]
    else:
        try:
            listener = open_listener(config)
        except OSError as e:
            print(f"spoa-mp: error: cannot listen on {config.listen_description()}: "
                  f"{e.strerror}", file=sys.stderr)  # fmt: skip
            return EXIT_FAILURE
        listeners = [listener]
    metrics_server = None
    supervisor: Supervisor | None = None

    def supervisor_metrics(accept: str) -> tuple[bytes, str]:
        assert supervisor is not None
        return supervisor.render_metrics(accept)

    try:
        if config.metrics:  # bound before dropping privileges (a port below 1024)
            metrics_server = MetricsServer(config.metrics, supervisor_metrics)
            log.info("metrics on http://%s/metrics", metrics_server.listen())
        if config.pidfile:
            write_pidfile(config.pidfile)
        drop_privileges(config.user, config.group, None if inherited else listener, config.pidfile)
    except (OSError, ValueError) as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        listener.close()
        return EXIT_FAILURE
    try:
        supervisor = Supervisor(
            config, agent, listeners, notifier, own_socket_file=not inherited,
            metrics_server=metrics_server,
        )  # fmt: skip
        return supervisor.run()
    finally:
        if config.pidfile:
            remove_pidfile(config.pidfile)

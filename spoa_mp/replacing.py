"""Replacing workers while serving: SIGHUP and changed blocklists reload
(a new generation takes over, handover / rolling / drain), --max-requests
and --max-rss recycle one worker, SIGTTIN/SIGTTOU add or remove one.

`Replacing` is the half of the Supervisor that does it; the attributes
declared here are the supervisor's (supervisor.py).
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import dataclass

from spoa_mp import control, systemd
from spoa_mp.agent import AppLoadError
from spoa_mp.blocklist import FileWatcher
from spoa_mp.config import ConfigError, ServerConfig, reload_config
from spoa_mp.loader import build_agent, watched_files
from spoa_mp.process import kill, rss
from spoa_mp.worker_options import WorkerOptions, options_for
from spoa_mp.worker_process import WorkerProcess

log = logging.getLogger(__name__)

RSS_CHECK_INTERVAL = 5.0


@dataclass(slots=True)
class Reload:
    """A reload under way: the new generation is starting."""

    generation: int
    mode: str
    deadline: float  # the new workers must be ready by then
    previous: tuple[ServerConfig, WorkerOptions]  # what to go back to
    slots: list[int]  # rolling: slots still to replace, in order


class Replacing:
    config: ServerConfig
    options: WorkerOptions
    listeners: list[socket.socket]
    notifier: systemd.Notifier
    workers: dict[int, WorkerProcess]
    generation: int
    target_workers: int
    _reload: Reload | None
    _reloads: int
    _reloads_failed: int
    _restarts: int
    _respawn_at: dict[int, float]
    _failures: dict[int, int]
    _watcher: FileWatcher
    _next_rss_check: float

    def _spawn(self, index: int) -> int:
        raise NotImplementedError

    def _status(self) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- reload

    def _start_reload(self) -> None:
        if self._reload is not None:
            log.warning("SIGHUP: a reload is already under way; ignored")
            return
        try:
            config = reload_config(self.config)
            agent = build_agent(config, reload=True)
            # the TLS files are read again here: a bad one keeps the old generation
            options = options_for(config, agent, tuple(self.listeners))
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
        previous = (self.config, self.options)
        self.config, self.options = config, options
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
        if time.monotonic() > r.deadline and not all(p.served for p in new):
            self._abort_reload("the new workers were not ready in time")
            return
        if r.mode == "rolling":
            self._roll(r, new, old)
            return
        if len(new) < len(r.slots) or not all(p.served for p in new):
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
        if not all(p.served for p in new):
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
        if not proc.retire():
            return  # told already, or killed
        if mode == "drain" or proc.channel is None:
            kill(proc.pid, signal.SIGTERM)
        elif not control.send(proc.channel, control.HAND_OVER):
            kill(proc.pid, signal.SIGTERM)  # its channel is gone: drain it instead

    def _abort_reload(self, why: str) -> None:
        r = self._reload
        assert r is not None
        log.error("reload failed, the running workers keep serving: %s", why)
        self._reloads_failed += 1
        self.config, self.options = r.previous
        self.generation = r.generation - 1
        self.target_workers = self.config.workers
        self._reload = None
        for proc in list(self.workers.values()):
            if proc.generation != r.generation or proc.retiring:
                continue
            if proc.served:
                # a rolling reload got this far: it may hold connections that
                # moved to it; they move back to the previous generation
                self._retire(proc, "handover")
            else:
                proc.retire()
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
                if used > limit and proc.serving:
                    self._recycle(proc, f"uses {used >> 20} MiB (--max-rss {self.config.max_rss})")
        for proc in list(self.workers.values()):
            if not proc.successor or proc.retiring:
                continue
            successor = self.workers.get(proc.successor)
            if successor is None:
                proc.successor = 0  # it died: the next request or check tries again
            elif successor.served:
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

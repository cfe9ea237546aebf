"""The one path from a read's NOTIFY frames to their ACKs, for every kind of
handler: sync, coroutine, batch, blocking (thread pool), several messages in
one NOTIFY, messages nobody handles.

Sans sockets: `Dispatcher.dispatch(conn, notifies)` runs the handlers of one
read and queues the ACKs that are ready on `conn.proto` (an
`AgentConnection`); the rest are ACKed from the event loop as their handlers
finish, all those of one loop iteration in one encode call per connection,
after which `on_progress(conn)` lets the owner send them.

- Sync handlers run inline; their ACKs leave with the read's.
- Coroutines run eagerly, inside the read, until they first suspend (what
  Python 3.12's eager tasks do, done by hand for 3.11): one that finishes at
  once costs no task. Only a suspended one becomes a task.
- Batch handlers get all the read's messages of their name in one call.
- Blocking handlers run in a bounded thread pool, created after the fork.
- Deadlines: a handler not done `timeout` seconds after its NOTIFY arrived is
  cancelled and its stream ACKed with its `on_timeout` actions; a late result
  is dropped. A handler that raises, or returns what is not actions, gets
  `on_error`. A stream always gets its ACK.

This module decides what runs when; the calls that outlive their read
(tasks, thread futures, deadlines, settling) are kept by inflight.py, and
the ACKs are assembled and queued by acks.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextvars import Context, copy_context
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, cast

from spoa_mp.acks import DEFERRED, PENDING, Acks, Conn, Result, per_notify
from spoa_mp.agent import Registered, check_timeout, normalize_actions
from spoa_mp.counters import Counters
from spoa_mp.eager import (
    EagerSteps,
    EagerTask,
    Finished,
    enter_task,
    leave_task,
    resume_task,
    wrap_awaitable,
)
from spoa_mp.inflight import Call, InFlight, hold
from spoa_mp.logs import RateLimitedLog
from spoa_mp.model import Action, Message
from spoa_mp.protocol import Notifies

log = logging.getLogger(__name__)

_name_of = attrgetter("name")


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Server-wide handler rules (command line / TOML)."""

    handler_timeout: float | None = None  # for handlers registered without a timeout
    max_in_flight: int = 256  # NOTIFYs awaiting a handler, per connection, before reads pause
    max_pending: int = 4096  # NOTIFYs awaiting a handler, per worker, before reads pause
    blocking_threads: int = 16  # the thread pool of blocking=True handlers, per worker

    def __post_init__(self) -> None:
        check_timeout(self.handler_timeout, "--handler-timeout")
        if self.max_pending < 1:
            raise ValueError(f"--max-pending must be at least 1, got {self.max_pending}")
        if self.blocking_threads < 1:
            raise ValueError(f"--blocking-threads must be at least 1, got {self.blocking_threads}")


class Dispatcher:
    """Runs a worker's handlers and ACKs their streams (see the module doc).

    `on_progress(conn)` is called after late ACKs were queued on a
    connection (send them; it may also read again); `on_capacity()` when the
    worker's pending NOTIFYs fall back under `max_pending` (reads paused by
    the cap may resume). `pending` is the worker's count of NOTIFYs awaiting
    a handler.
    """

    def __init__(
        self,
        handlers: Mapping[str, Registered],
        counters: Counters,
        settings: DispatchSettings,
        on_progress: Callable[[Any], None],
        on_capacity: Callable[[], None] = lambda: None,
        debug: bool = False,
    ) -> None:
        default = settings.handler_timeout
        # the server-wide timeout filled in once, so the hot loop reads one field
        self._handlers = {
            name: reg._replace(timeout=default) if reg.timeout is None and default else reg
            for name, reg in handlers.items()
        }
        # handlers the hot loop calls directly: plain functions, one message each
        self._inline = {
            name: reg.fn
            for name, reg in self._handlers.items()
            if not (reg.is_coroutine or reg.batch or reg.blocking)
        }
        # coroutine handlers, stepped eagerly inside the loop
        self._eager = {
            name: reg.fn
            for name, reg in self._handlers.items()
            if reg.is_coroutine and not (reg.batch or reg.blocking)
        }
        self.counters = counters
        self.settings = settings
        self.debug = debug
        self.pending = 0
        self.paused = False  # pending reached max_pending: reads wait
        self._on_progress = on_progress
        self._on_capacity = on_capacity
        self._noisy = RateLimitedLog(log, interval=10.0)
        self._acks = Acks(counters, self._noisy, debug, self._flush)
        self._send = self._acks.send  # bound once: the hot loop calls it every read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: InFlight | None = None  # with the loop, on first use
        self._late: list[tuple[tuple[int, ...], Call]] = []  # this read's calls, by message
        self._deferred: dict[Conn, Notifies] = {}
        # what asyncio.current_task() returns during eager steps; None outside _run
        self._proxy: EagerTask | None = None
        self._entered = False  # we set the current task (none was set: the usual case)
        self._idle_proxy: EagerTask | None = None
        self._steps = EagerSteps()  # drives the eager steps (no StopIteration per coroutine)

    # ------------------------------------------------------------ life

    def close(self) -> None:
        """Drop the timers and the thread pool (its running threads finish)."""
        if self._inflight is not None:
            self._inflight.close()

    @property
    def tasks(self) -> set[asyncio.Future[Any]]:
        """The handler tasks running now."""
        return set() if self._inflight is None else self._inflight.tasks

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = loop = asyncio.get_running_loop()
            self._inflight = InFlight(
                loop,
                self.counters,
                self._noisy,
                self.settings.blocking_threads,
                self._checked,
                self._acks.ready,
            )
        return self._loop

    # ------------------------------------------------------------ a read

    def dispatch(self, conn: Conn, notifies: Notifies) -> None:
        """Run the handlers of one read's NOTIFYs; queue the ACKs that are ready."""
        if self.debug:
            for sid, fid, note_msgs in notifies.notifications():
                log.debug("conn %d: NOTIFY sid=%d fid=%d %r", conn.fd, sid, fid, note_msgs)
        self._count(notifies)
        self._run(conn, notifies)

    def forget(self, conn: Conn) -> None:
        """conn is closed: its deferred NOTIFYs will never run."""
        deferred = self._deferred.pop(conn, None)
        if deferred is not None:
            conn.in_flight -= len(deferred)

    def _run(self, conn: Conn, notifies: Notifies) -> None:
        try:
            self._run_handlers(conn, notifies)
        finally:
            if self._entered:
                assert self._loop is not None
                assert self._proxy is not None
                leave_task(self._loop, self._proxy)
                self._entered = False
            self._proxy = None

    def _run_handlers(self, conn: Conn, notifies: Notifies) -> None:
        handlers = self._handlers
        inline = self._inline.get
        eager = self._eager.get
        msgs = notifies.messages
        late = self._late
        # one message per NOTIFY: beyond --max-in-flight, NOTIFYs wait unstarted
        room = self.settings.max_in_flight - conn.in_flight if notifies.counts is None else -1
        results: list[Any] = []
        add = results.append
        clock = time.perf_counter
        stamps = [clock()]
        stamp = stamps.append
        batches: dict[str, list[int]] | None = None
        any_deferred = False
        steps = self._steps
        for msg in msgs:
            fn = inline(msg.name)
            if fn is not None:
                try:
                    result = fn(msg)
                    if result.__class__ is not Action:
                        result = self._odd(msg, result, len(results))
                except Exception:
                    result = self._failed(handlers[msg.name], msg.name, 1)
                add(result)
                if result is not PENDING:  # else timed when it is done
                    stamp(clock())  # the time since the previous stamp is this handler's
                continue
            name = msg.name
            fn = eager(name)
            if fn is not None:
                if 0 <= room <= len(late):
                    add(DEFERRED)
                    any_deferred = True
                    continue
                # the eager step, inlined: most coroutines finish in it
                if self._proxy is None:
                    self._enter()
                coro = fn(msg)
                ctx = copy_context()  # as a task would: its context vars stay its own
                try:
                    got = ctx.run(steps.send, coro)
                except (Exception, asyncio.CancelledError):
                    steps.restart()
                    result = self._failed(handlers[name], name, 1)
                else:
                    if got.__class__ is not Finished:  # suspended: the rest is a task
                        call = Call(handlers[name], name, 1)
                        add(self._suspended(call, coro, got, ctx, (len(results),)))
                        continue
                    result = got.value
                    if result.__class__ is not Action:
                        result = self._checked(handlers[name], name, result, 1)
                add(result)
                stamp(clock())
                continue
            reg = handlers.get(name)
            if reg is None:
                add(None)  # a message nobody handles: an empty ACK, as HAProxy expects
            elif reg.batch:
                if batches is None:
                    batches = {}
                batches.setdefault(name, []).append(len(results))
                add(PENDING)
            elif 0 <= room <= len(late):
                add(DEFERRED)
                any_deferred = True
            else:
                add(self._call(reg, name, msg, (len(results),)))
        if batches is not None:
            for name, ks in batches.items():
                if self._run_batch(handlers[name], name, [msgs[k] for k in ks], tuple(ks), results):
                    stamp(clock())  # one observation per batch call, as for late ones
        self.counters.latency.observe_stamps(stamps)
        if late or any_deferred:
            self._late = []
            # the NOTIFYs that wait become streams; those ready now are ACKed below
            ids, results, held = hold(conn, notifies, results, late, self._deferred)
            self.pending += held
            if self.pending >= self.settings.max_pending and not self.paused:
                self.paused = True  # the owner stops reading until on_capacity()
                self.counters.backpressure += 1
        else:
            ids = notifies.ids
            if notifies.counts is not None:
                results = per_notify(results, notifies.counts)
        if results:
            self._send(conn, ids, results)

    def _count(self, notifies: Notifies) -> None:
        msgs = notifies.messages
        counters = self.counters
        counters.notifies += len(notifies.ids) >> 1
        counted = counters.messages
        handlers = self._handlers
        if len(msgs) == 1:  # unpipelined: one message per read, skip the bulk tools
            name = msgs[0].name
            if name in handlers:
                counted[name] = counted.get(name, 0) + 1
            return
        for name, n in Counter(map(_name_of, msgs)).items():
            if name in handlers:
                counted[name] = counted.get(name, 0) + n

    def _odd(self, msg: Message, result: object, k: int) -> Any:
        """A plain handler's result that is not one Action: check it, or (a
        plain function returning an awaitable) run that as a coroutine."""
        if result is None or result.__class__ is tuple or result.__class__ is list:
            return normalize_actions(result)
        if hasattr(result, "__await__"):
            return self._step(self._handlers[msg.name], msg.name, result, (k,), 1)
        return normalize_actions(result)

    def _failed(self, reg: Registered, name: str, n: int) -> Result:
        """Count and log a failed call (within an except block): its fallback."""
        errors = self.counters.handler_errors
        errors[name] = errors.get(name, 0) + n
        # the stream still gets its ACK; the traceback, but not thousands a second
        self._noisy.exception(f"handler:{name}", "handler for %r failed", name)
        return reg.on_error

    def _failed_call(self, reg: Registered, name: str, n: int) -> Any:
        """_failed() as the value of a call: one fallback per message of a batch."""
        fallback = self._failed(reg, name, n)
        return [fallback] * n if reg.batch else fallback

    # ------------------------------------------------------------ starting

    def _call(self, reg: Registered, name: str, arg: Any, ks: tuple[int, ...], n: int = 1) -> Any:
        """Start a blocking or coroutine handler: its result, or PENDING."""
        if not reg.blocking:
            try:
                awaitable = reg.fn(arg)
            except Exception:
                return self._failed_call(reg, name, n)
            return self._step(reg, name, awaitable, ks, n)
        self._get_loop()
        assert self._inflight is not None
        call = Call(reg, name, n)
        self._inflight.thread(call, arg)
        self._late.append((ks, call))
        return PENDING

    def _step(self, reg: Registered, name: str, coro: Any, ks: tuple[int, ...], n: int) -> Any:
        """Run a coroutine until it first suspends: its result if it does
        not, else PENDING (the rest runs as a task)."""
        if coro.__class__ is not types.CoroutineType:
            coro = wrap_awaitable(coro)
        if self._proxy is None:
            self._enter()
        ctx = copy_context()
        try:
            got = ctx.run(self._steps.send, coro)
        except (Exception, asyncio.CancelledError):
            self._steps.restart()
            return self._failed_call(reg, name, n)
        if got.__class__ is Finished:
            return self._checked(reg, name, got.value, n)
        return self._suspended(Call(reg, name, n), coro, got, ctx, ks)

    def _suspended(
        self, call: Call, coro: Any, yielded: object, ctx: Context, ks: tuple[int, ...]
    ) -> Any:
        """The call's coroutine suspended in its eager step (`yielded` what it
        awaits): the rest, in the driver that holds it, runs as a task. `ks`:
        its messages in the read."""
        inflight = self._inflight
        proxy = self._proxy
        assert inflight is not None
        assert proxy is not None
        rest = resume_task(self._steps.detach(), yielded, coro.__name__)
        task = inflight.task(call, rest, ctx)
        proxy.adopt(task)  # what the coroutine holds of current_task() means this task
        self._swap_proxy()
        self._late.append((ks, call))
        return PENDING

    def _enter(self) -> EagerTask:
        """The first eager step of a read: become the loop's current task."""
        loop = self._get_loop()
        # one proxy serves the reads until a coroutine suspends and keeps it
        proxy = self._idle_proxy
        if proxy is None or proxy.cancelling():
            proxy = self._idle_proxy = EagerTask()
        self._proxy = proxy
        # dispatch() called from inside a task (a test, an embedding): run under it
        self._entered = asyncio.current_task(loop) is None
        if self._entered:
            enter_task(loop, proxy)
        return proxy

    def _swap_proxy(self) -> EagerTask:
        """A new current task for the next eager step (the old one was adopted)."""
        assert self._loop is not None
        assert self._proxy is not None
        proxy = self._idle_proxy = EagerTask()
        if self._entered:
            leave_task(self._loop, self._proxy)
            enter_task(self._loop, proxy)
        self._proxy = proxy
        return proxy

    def _run_batch(
        self,
        reg: Registered,
        name: str,
        msgs: list[Message],
        ks: tuple[int, ...],
        results: list[Any],
    ) -> bool:
        """Run a batch call: True if its results are in `results` now."""
        n = len(msgs)
        if reg.blocking or reg.is_coroutine:
            got = self._call(reg, name, msgs, ks, n)
        else:
            try:
                got = reg.fn(msgs)
            except Exception:
                got = self._failed_call(reg, name, n)
            else:
                if hasattr(got, "__await__"):
                    got = self._step(reg, name, got, ks, n)
                else:
                    got = self._batch_results(reg, name, got, n)
        if got is PENDING:
            return False
        for k, result in zip(ks, got, strict=True):
            results[k] = result
        return True

    def _batch_results(self, reg: Registered, name: str, got: object, n: int) -> list[Result]:
        """A batch handler's results, checked: one per message."""
        try:
            items = list(cast("Iterable[object]", got))  # TypeError if it is not
            if len(items) != n:
                raise TypeError(f"a batch handler returned {len(items)} results for {n} messages")
        except TypeError:
            return cast("list[Result]", self._failed_call(reg, name, n))  # a batch: a list
        out: list[Result] = []
        for item in items:
            try:
                out.append(item if item.__class__ is Action else normalize_actions(item))
            except TypeError:
                out.append(self._failed(reg, name, 1))
        return out

    def _checked(self, reg: Registered, name: str, value: object, n: int) -> Any:
        """A finished call's value: its result(s) once checked."""
        if reg.batch:
            return self._batch_results(reg, name, value, n)
        if value.__class__ is Action:
            return value
        try:
            return normalize_actions(value)
        except TypeError:
            return self._failed_call(reg, name, n)

    # ------------------------------------------------------------ late ACKs

    def _flush(self) -> None:
        """The ACKs that became ready: one encode call per connection; the
        NOTIFYs they made room for start."""
        for conn, (ids, results) in self._acks.take().items():
            n = len(results)
            conn.in_flight -= n
            self.pending -= n
            if not conn.closed:  # else HAProxy went away: nobody to answer
                self._send(conn, ids, results)
                deferred = self._deferred.pop(conn, None)
                if deferred is not None:  # room again: start them, oldest first
                    conn.in_flight -= len(deferred)
                    self._run(conn, deferred)
            self._on_progress(conn)
        if self.paused and self.pending < self.settings.max_pending:
            self.paused = False
            self._on_capacity()

"""Handler calls in flight, for the dispatcher (dispatch.py): the calls that
did not finish inside their read, the tasks and thread futures held while
they run, their deadlines, and their settling: a result, an error or a
timeout fills the call's slots in its streams, and a stream whose last slot
is filled is handed to ACK assembly (acks.py). Also the split of a read into
the NOTIFYs ACKed now and those that wait for a call.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context
from typing import Any

from spoa_mp.acks import DEFERRED, PENDING, Conn, Result, Stream, joined
from spoa_mp.agent import Registered
from spoa_mp.counters import Counters
from spoa_mp.deadlines import Deadlines
from spoa_mp.logs import RateLimitedLog
from spoa_mp.model import Action
from spoa_mp.protocol import Notifies


class Call:
    """One handler call in flight: one message, or a batch of them."""

    __slots__ = ("deadline", "n", "name", "reg", "settled", "started", "targets", "task")

    def __init__(self, reg: Registered, name: str, n: int) -> None:
        self.reg = reg
        self.name = name
        self.n = n  # messages it answers
        self.started = 0.0  # loop time it went in flight (set by InFlight)
        self.deadline = 0.0
        self.settled = False
        self.targets: list[tuple[Stream, int]] = []  # (stream, part) per message, in order
        self.task: asyncio.Future[Any] | None = None


Checked = Callable[[Registered, str, object, int], Any]
"""The dispatcher's check of a finished call's value: its result(s)."""


class InFlight:
    """The calls of one worker's loop that run on after their read.

    `task()` runs the rest of a suspended coroutine as a task, `thread()` a
    blocking handler in the thread pool (created on first use); both hold
    the call until it is done and watch its deadline. When it finishes (or
    fails, or expires: cancelled, its late result dropped) its streams get
    their results and `ready(stream)` is called for each one complete.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        noisy: RateLimitedLog,
        threads: int,
        checked: Checked,
        ready: Callable[[Stream], None],
    ) -> None:
        self.loop = loop
        self.counters = counters
        self._noisy = noisy
        self._threads = threads
        self._checked = checked
        self._ready = ready
        self._deadlines: Deadlines[Call] = Deadlines(loop, self._expire)
        self._pool: ThreadPoolExecutor | None = None
        self.tasks: set[asyncio.Future[Any]] = set()  # strong references while they run

    def close(self) -> None:
        """Drop the timers and the thread pool (its running threads finish)."""
        self._deadlines.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------ starting

    def task(self, call: Call, coro: Coroutine[Any, Any, Any], ctx: Context) -> asyncio.Task[Any]:
        """Run `coro` (the rest of the call's coroutine) as a task in `ctx`."""
        loop = self.loop
        call.started = loop.time()
        task = loop.create_task(coro, context=ctx)
        call.task = task
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(call, t))
        timeout = call.reg.timeout  # inline, not a helper: once per suspended coroutine
        if timeout is not None:
            self._deadlines.add(call, timeout)
        return task

    def thread(self, call: Call, arg: Any) -> None:
        """Run the call's blocking handler on `arg` in the thread pool."""
        loop = self.loop
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="spoa-blocking")
        call.started = loop.time()
        fut = loop.run_in_executor(self._pool, call.reg.fn, arg)
        call.task = fut
        fut.add_done_callback(lambda f: self._thread_done(call, f))
        timeout = call.reg.timeout
        if timeout is not None:
            self._deadlines.add(call, timeout)

    # ------------------------------------------------------------ finishing

    def _task_done(self, call: Call, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if call.settled:  # past its deadline, already ACKed: the late result is dropped
            if not task.cancelled():
                task.exception()  # retrieved, or asyncio logs it (every one: no rate limit)
            return
        if task.cancelled():  # not by a deadline: the handler cancelled itself
            self._settle(call, self._error_of(call, asyncio.CancelledError("handler cancelled")))
            return
        exc = task.exception()
        if exc is not None:
            self._settle(call, self._error_of(call, exc))
            return
        self._finish(call, task.result())

    def _thread_done(self, call: Call, fut: asyncio.Future[Any]) -> None:
        if call.settled:
            return
        if fut.cancelled():
            return  # by _expire, which settled it
        exc = fut.exception()
        if exc is not None:
            self._settle(call, self._error_of(call, exc))
            return
        self._finish(call, fut.result())

    def _error_of(self, call: Call, exc: BaseException) -> list[Result]:
        errors = self.counters.handler_errors
        errors[call.name] = errors.get(call.name, 0) + call.n
        self._noisy.error(
            f"handler:{call.name}",
            "handler for %r failed",
            call.name,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return [call.reg.on_error] * call.n

    def _finish(self, call: Call, value: object) -> None:
        if value.__class__ is Action and not call.reg.batch:  # the usual: nothing to check
            self._settle(call, (value,))
            return
        got = self._checked(call.reg, call.name, value, call.n)
        self._settle(call, got if call.reg.batch else [got])

    def _expire(self, call: Call) -> None:
        """Past its deadline: cancel it, ACK its streams with the fallback."""
        name = call.name
        timeouts = self.counters.handler_timeouts
        timeouts[name] = timeouts.get(name, 0) + call.n
        self._noisy.warning(
            f"timeout:{name}",
            "handler for %r passed its %.3g s deadline: stream ACKed with its on_timeout actions",
            name,
            call.reg.timeout,
        )
        fallback = call.reg.on_timeout
        self._settle(call, [fallback] * call.n)
        if call.task is not None:
            call.task.cancel()

    def _settle(self, call: Call, got: Sequence[Result]) -> None:
        call.settled = True
        self.counters.latency.observe(self.loop.time() - call.started)
        for (stream, p), result in zip(call.targets, got, strict=True):
            stream.parts[p] = result
            stream.missing -= 1
            if not stream.missing:
                self._ready(stream)


def hold(
    conn: Conn,
    notifies: Notifies,
    results: list[Any],
    late: list[tuple[tuple[int, ...], Call]],
    deferred: dict[Conn, Notifies],
) -> tuple[array[int], list[Result], int]:
    """Split a read: the NOTIFYs that wait for a call become streams (in
    their calls' targets), those not started (DEFERRED) join `deferred`.
    Returns the ids and results of those ready now, and how many streams
    wait (already added to conn.in_flight)."""
    if notifies.counts is not None:  # some NOTIFY carries several messages
        return _hold_parts(conn, notifies, results, late)
    # one message per NOTIFY (unfragmented 3.x, most 2.6 reads): result k is
    # NOTIFY k's, no slices
    ids = notifies.ids
    held = 0
    for ks, call in late:  # each message of a call (a batch's: several) is its own stream
        targets = call.targets
        for k in ks:
            targets.append((Stream(conn, ids[2 * k], ids[2 * k + 1], [PENDING], 1), 0))
        held += len(ks)
    now_ids: array[int] = array("Q")
    now_results: list[Result] = []
    waiting: Notifies | None = None
    for k, result in enumerate(results):
        if result is PENDING:
            continue
        if result is DEFERRED:
            if waiting is None:
                waiting = deferred.get(conn)
                if waiting is None:
                    waiting = deferred[conn] = Notifies()
            waiting.add(ids[2 * k], ids[2 * k + 1], notifies.messages[k : k + 1])
            conn.in_flight += 1
            continue
        now_ids.append(ids[2 * k])
        now_ids.append(ids[2 * k + 1])
        now_results.append(result)
    conn.in_flight += held
    return now_ids, now_results, held


def _hold_parts(
    conn: Conn, notifies: Notifies, results: list[Any], late: list[tuple[tuple[int, ...], Call]]
) -> tuple[array[int], list[Result], int]:
    """hold() for a read where a NOTIFY carries several messages (never
    DEFERRED: only reads of one message per NOTIFY defer, see
    Dispatcher._run_handlers)."""
    owner: dict[int, Call] = {}
    for ks, call in late:
        for k in ks:
            owner[k] = call
    ids = notifies.ids
    counts = notifies.counts
    assert counts is not None
    now_ids: array[int] = array("Q")
    now_results: list[Result] = []
    held = 0
    at = 0
    for j in range(len(ids) >> 1):
        count = counts[j]
        parts = results[at : at + count]
        if missing := sum(1 for part in parts if part is PENDING):
            stream = Stream(conn, ids[2 * j], ids[2 * j + 1], parts, missing)
            for p, part in enumerate(parts):
                if part is PENDING:
                    owner[at + p].targets.append((stream, p))
            held += 1
        else:
            now_ids.append(ids[2 * j])
            now_ids.append(ids[2 * j + 1])
            now_results.append(parts[0] if count == 1 else joined(parts))
        at += count
    conn.in_flight += held
    return now_ids, now_results, held

"""Deadlines of handler calls without a timer each."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Timed(Protocol):
    started: float  # loop time
    deadline: float  # set here
    settled: bool  # done, or expired: no longer watched


T = TypeVar("T", bound=Timed)


class Deadlines(Generic[T]):
    """Calls by deadline: one FIFO per timeout value (arrival order is then
    deadline order) and one loop timer for the earliest. Settled calls are
    skipped when they reach the head, and the queues are compacted when they
    hold many more settled calls than live ones."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[T], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._queues: dict[float, deque[T]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._added = 0

    def add(self, call: T, timeout: float) -> None:
        call.deadline = call.started + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        while queue and queue[0].settled:
            queue.popleft()
        queue.append(call)
        self._added += 1
        if self._added >= 4096:
            self._compact()
        if self._timer is None or call.deadline < self._when:
            self._schedule(call.deadline)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        first = None
        for queue in self._queues.values():
            while queue and (queue[0].settled or queue[0].deadline <= now):
                call = queue.popleft()
                if not call.settled:
                    self._expire(call)
            if queue and (first is None or queue[0].deadline < first):
                first = queue[0].deadline
        if first is not None:
            self._schedule(first)

    def _compact(self) -> None:
        self._added = 0
        for timeout, queue in self._queues.items():
            if len(queue) > 1024:
                self._queues[timeout] = deque(c for c in queue if not c.settled)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

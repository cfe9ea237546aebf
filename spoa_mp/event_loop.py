"""The event loop a worker runs its connections and handlers on.

`auto` (the default) takes uvloop when it is installed (`pip install
'spoa-mp[uvloop]'`) and asyncio's own loop otherwise; `asyncio` and `uvloop`
ask for one. uvloop runs the same asyncio code with its loop in C (libuv):
each readable socket, timer and finished task costs less Python, which is most
of what a worker does per message when reads carry one NOTIFY (HAProxy 3.x,
light load), and what await-heavy handlers pay for every wake-up.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("auto", "asyncio", "uvloop")

_T = TypeVar("_T")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(name: str) -> str:
    """The loop `name` stands for here: "asyncio" or "uvloop".
    ValueError for "uvloop" when it is not installed, or an unknown name."""
    if name == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    if name == "uvloop" and not uvloop_installed():
        raise ValueError("uvloop is not installed (pip install 'spoa-mp[uvloop]')")
    if name not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {name!r} (one of {', '.join(EVENT_LOOPS)})")
    return name


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new loop of kind `name` (after resolve())."""
    if resolve(name) == "uvloop":
        import uvloop  # noqa: PLC0415 - optional, and only the workers need it

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def describe(name: str) -> str:
    """For the startup line: "uvloop 0.23.0" or "asyncio"."""
    if resolve(name) == "uvloop":
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return "asyncio"


def run(main: Coroutine[Any, Any, _T], name: str) -> _T:
    """asyncio.run(main) on a loop of kind `name`."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)

"""The handler API: an `Agent` maps SPOE message names to handler functions.

A handler module needs nothing but this module and `spoa_mp.model`::

    from spoa_mp.agent import Agent
    from spoa_mp.model import set_var

    agent = Agent("example")

    @agent.on_message("check-client-ip")
    def check(msg):
        return set_var("sess", "ip_score", 42 if msg[0] else 0)

and is served with `spoa-mp myhandlers:agent`. A handler gets a
`spoa_mp.model.Message` and returns an `Action`, an iterable of Actions or
None; it may be `async def`. Decorators return the function unchanged, so
`check(msg)` stays directly callable in tests.

Registration happens at import time, in the supervisor, which then freezes
the agent and forks: every worker inherits the same table, and a late
registration (which one worker would see and the others not) is an error.
This module imports no server code, so handler modules can be unit-tested
without building the codec.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias, TypeVar, cast

from spoa_mp.model import Action, Message

__all__ = [
    "Agent",
    "AppLoadError",
    "BatchHandler",
    "Handler",
    "HandlerOptions",
    "HandlerResult",
    "Registered",
    "WorkerStartHook",
    "check_timeout",
    "load_app",
    "normalize_actions",
]

HandlerResult: TypeAlias = Action | Iterable[Action] | None
"""What a handler returns: one Action, an iterable of Actions, or None."""

Handler: TypeAlias = Callable[[Message], HandlerResult | Awaitable[HandlerResult]]
"""A handler: called with one `Message`; sync or async."""

WorkerStartHook: TypeAlias = Callable[[], object]
"""A per-worker init function: no arguments; sync or async."""

BatchHandler: TypeAlias = Callable[
    [list[Message]], Sequence[HandlerResult] | Awaitable[Sequence[HandlerResult]]
]
"""A batch handler: called with a read's messages of one name; one result each."""

H = TypeVar("H", bound=Handler)
B = TypeVar("B", bound=BatchHandler)
W = TypeVar("W", bound=WorkerStartHook)

_CLOSED = (
    "registration is closed: handlers must be registered at import time, "
    "before the server forks workers"
)


class Registered(NamedTuple):
    """A registered callable, how the dispatcher calls it, and its deadline rules.

    `is_coroutine`: calling fn returns a coroutine. `batch`: fn takes the list
    of a read's messages of this name and returns one result per message.
    `blocking`: fn runs in the worker's thread pool. `timeout`: seconds from
    the NOTIFY's arrival to its ACK (None: the server's --handler-timeout).
    `on_timeout` / `on_error`: the actions ACKed instead when the deadline
    passes or the handler raises (or returns something that is not actions).
    """

    fn: Callable[..., Any]
    is_coroutine: bool
    batch: bool = False
    blocking: bool = False
    timeout: float | None = None
    on_timeout: tuple[Action, ...] = ()
    on_error: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """How a handler is called and what is ACKed when it cannot answer (see
    Registered), checked once where it is registered."""

    batch: bool = False
    blocking: bool = False
    timeout: float | None = None
    on_timeout: tuple[Action, ...] = ()
    on_error: tuple[Action, ...] = ()

    @classmethod
    def checked(
        cls,
        name: str,
        *,
        blocking: bool,
        timeout: object,
        on_timeout: HandlerResult,
        on_error: HandlerResult,
    ) -> HandlerOptions:
        """The options of the handler for message `name` from what the user
        passed (ValueError/TypeError naming the handler when they are wrong)."""
        return cls(
            blocking=bool(blocking),
            timeout=check_timeout(timeout, f"handler for {name!r}: timeout"),
            on_timeout=_fallback(on_timeout, name, "on_timeout"),
            on_error=_fallback(on_error, name, "on_error"),
        )


def _is_coroutine(fn: object) -> bool:
    """True when calling fn returns a coroutine: async def functions and
    methods, functools.partial of them, and objects whose __call__ is async."""
    while isinstance(fn, functools.partial):
        fn = fn.func  # inspect unwraps partials too, but not partial(obj_with_async_call)
    if inspect.iscoroutinefunction(fn):
        return True
    if isinstance(fn, type) or inspect.isfunction(fn) or inspect.ismethod(fn):
        return False  # calling a class builds an instance; a plain function is sync
    return inspect.iscoroutinefunction(type(fn).__call__)


class Agent:
    """A table of SPOE message handlers, plus per-worker init hooks.

    ::

        agent = Agent("iprep")

        @agent.on_message("check-client-ip")
        async def check(msg): ...

        @agent.on_worker_start
        def connect():  # runs in each worker, after the fork
            ...

    The server calls `freeze()` before forking; registering afterwards raises
    RuntimeError.
    """

    __slots__ = ("_frozen", "_handlers", "_handlers_view", "_hooks", "name")

    def __init__(self, name: str = "agent") -> None:
        self.name = name
        self._handlers: dict[str, Registered] = {}
        self._handlers_view = MappingProxyType(self._handlers)
        self._hooks: list[Registered] = []
        self._frozen = False

    def __repr__(self) -> str:
        state = ", frozen" if self._frozen else ""
        return f"<Agent {self.name!r}: {len(self._handlers)} handlers{state}>"

    def _check_open(self, method: str) -> None:
        if self._frozen:
            raise RuntimeError(f"Agent {self.name!r}: {method}(): {_CLOSED}")

    def add_handler(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        blocking: bool = False,
        timeout: float | None = None,
        on_timeout: HandlerResult = None,
        on_error: HandlerResult = None,
    ) -> None:
        """Register `fn` for SPOE message `name` (the non-decorator form of
        `on_message`, with the same keywords).

        Raises ValueError for a duplicate or empty name or a timeout that is
        not a positive number, TypeError when fn is not callable or a fallback
        is not actions, RuntimeError once frozen.
        """
        self._check_open("add_handler")
        options = HandlerOptions.checked(
            name, blocking=blocking, timeout=timeout, on_timeout=on_timeout, on_error=on_error
        )
        self._add("add_handler", name, fn, options)

    def add_batch_handler(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        blocking: bool = False,
        timeout: float | None = None,
        on_timeout: HandlerResult = None,
        on_error: HandlerResult = None,
    ) -> None:
        """Register the batch handler `fn` for SPOE message `name` (the
        non-decorator form of `on_batch`, with the same keywords and errors
        as add_handler)."""
        self._check_open("add_batch_handler")
        options = HandlerOptions.checked(
            name, blocking=blocking, timeout=timeout, on_timeout=on_timeout, on_error=on_error
        )
        self._add("add_batch_handler", name, fn, replace(options, batch=True))

    def _add(self, method: str, name: str, fn: Callable[..., Any], options: HandlerOptions) -> None:
        self._check_open(method)  # again: a decorator registers later than its line
        if not isinstance(name, str):
            raise TypeError(f"message name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("message name must not be empty")
        if not callable(fn):
            raise TypeError(f"handler for {name!r} must be callable, not {type(fn).__name__}")
        if name in self._handlers:
            old = self._handlers[name].fn
            raise ValueError(
                f"Agent {self.name!r}: message {name!r} already has a handler "
                f"({getattr(old, '__qualname__', repr(old))})"
            )
        is_coroutine = _is_coroutine(fn)
        if options.blocking and is_coroutine:
            raise TypeError(
                f"handler for {name!r}: blocking=True runs a plain function in a thread; "
                "a coroutine function needs no thread"
            )
        self._handlers[name] = Registered(
            fn,
            is_coroutine,
            batch=options.batch,
            blocking=options.blocking,
            timeout=options.timeout,
            on_timeout=options.on_timeout,
            on_error=options.on_error,
        )

    def on_message(
        self,
        name: str,
        *,
        timeout: float | None = None,
        on_timeout: HandlerResult = None,
        on_error: HandlerResult = None,
        blocking: bool = False,
    ) -> Callable[[H], H]:
        """Decorator registering the function for SPOE message `name`.

        Returns the function unchanged::

            @agent.on_message("check-client-ip", timeout=0.05,
                              on_timeout=set_var("sess", "ip_score", 100))
            async def check(msg: Message) -> Action: ...

        `timeout` (seconds, > 0) bounds the time from the NOTIFY's arrival to
        its ACK; past it the handler is cancelled and the stream is ACKed with
        `on_timeout` (default: no action). A handler that raises gets
        `on_error`. Without `timeout`, the server's `--handler-timeout`
        applies. `blocking=True` runs a plain function that blocks (a sync
        database driver, `requests`) in the worker's thread pool, so it never
        stalls the worker's loop; its deadline is enforced the same way (the
        thread itself cannot be stopped: its late result is dropped).
        """
        self._check_open("on_message")  # fail at the decorator line, not later
        # checked at the decorator line, before the function is even defined
        options = HandlerOptions.checked(
            name, blocking=blocking, timeout=timeout, on_timeout=on_timeout, on_error=on_error
        )

        def decorator(fn: H) -> H:
            self._add("add_handler", name, fn, options)
            return fn

        return decorator

    def on_batch(
        self,
        name: str,
        *,
        timeout: float | None = None,
        on_timeout: HandlerResult = None,
        on_error: HandlerResult = None,
        blocking: bool = False,
    ) -> Callable[[B], B]:
        """Decorator registering a batch handler for SPOE message `name`.

        The function gets the list of every message of that name in one read
        (HAProxy pipelines many NOTIFYs per read under load) and returns a
        sequence of results, one per message, in order: one round trip to a
        store can serve them all::

            @agent.on_batch("check-client-ip", timeout=0.05)
            async def check(msgs: list[Message]) -> list[Action]:
                scores = await redis.mget([str(m["ip"]) for m in msgs])
                return [score_action(s) for s in scores]

        The keywords are those of `on_message`; the deadline and fallbacks
        apply to the whole batch. A result list of the wrong length counts
        as an error for every message in it. Returns the function unchanged.
        """
        self._check_open("on_batch")
        options = HandlerOptions.checked(
            name, blocking=blocking, timeout=timeout, on_timeout=on_timeout, on_error=on_error
        )
        options = replace(options, batch=True)

        def decorator(fn: B) -> B:
            self._add("add_handler", name, fn, options)
            return fn

        return decorator

    def on_worker_start(self, fn: W) -> W:
        """Decorator registering a function run in every worker after the fork
        (sync or async, no arguments), in registration order. The place to
        open connections or reseed random generators: anything that must not
        be shared between processes. Returns the function unchanged.
        """
        self._check_open("on_worker_start")
        if not callable(fn):
            raise TypeError(f"worker start hook must be callable, not {type(fn).__name__}")
        self._hooks.append(Registered(fn, _is_coroutine(fn)))
        return fn

    def freeze(self) -> None:
        """Close registration (idempotent); the server calls it before forking."""
        self._frozen = True

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def handlers(self) -> Mapping[str, Registered]:
        """Read-only live view: message name -> Registered(fn, is_coroutine)."""
        return self._handlers_view

    @property
    def worker_start_hooks(self) -> tuple[Registered, ...]:
        """The on_worker_start functions, as Registered(fn, is_coroutine), in order."""
        return tuple(self._hooks)


# ------------------------------------------------------------ handler results


def _describe(result: object) -> str:
    return type(result).__qualname__


_NOT_ITERABLES = (str, bytes, bytearray, memoryview, Mapping)


def _normalize_slow(result: object) -> tuple[Action, ...]:
    if isinstance(result, Action):  # a subclass
        return (result,)
    expected = "a handler must return an Action, an iterable of Actions or None"
    if isinstance(result, _NOT_ITERABLES):
        raise TypeError(f"{expected}, not {_describe(result)}")
    try:
        # tuple() itself tells whether it is iterable (the old __getitem__
        # protocol included, which isinstance(Iterable) would miss)
        items = tuple(cast("Iterable[object]", result))
    except TypeError:
        raise TypeError(f"{expected}, not {_describe(result)}") from None
    actions = []
    for i, a in enumerate(items):
        if not isinstance(a, Action):
            raise TypeError(
                f"{expected}; got a {_describe(result)} whose item {i} is a {_describe(a)}"
            )
        actions.append(a)
    return tuple(actions)


def normalize_actions(result: object) -> tuple[Action, ...]:
    """A handler's result as a tuple of Actions (TypeError if it is not one).

    None gives (), an Action gives (action,), an iterable of Actions gives
    them as a tuple (a tuple of Actions is returned as is). Strings, bytes
    and mappings are refused even though they are iterable.

    >>> normalize_actions(None)
    ()
    """
    # Runs once per message: exact-class checks first, no isinstance or
    # try/except unless the result is unusual.
    # (type(x) is C rather than x.__class__ is C: the same cost, and mypy
    # narrows it.)
    if result is None:
        return ()
    if type(result) is tuple or type(result) is list:
        for a in result:
            if a.__class__ is not Action:
                return _normalize_slow(result)
        return result if type(result) is tuple else tuple(result)
    if type(result) is Action:
        return (result,)
    return _normalize_slow(result)


def check_timeout(value: object, what: str) -> float | None:
    """A deadline in seconds: None, or a finite number > 0 (ValueError otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, not {_describe(value)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _fallback(result: HandlerResult, name: str, what: str) -> tuple[Action, ...]:
    try:
        return normalize_actions(result)
    except TypeError as e:
        raise TypeError(f"handler for {name!r}: {what}: {e}") from None


# ------------------------------------------------------------- app loading


class AppLoadError(ValueError):
    """An app spec could not be turned into an Agent; str() is one line."""


def _one_line(exc: BaseException) -> str:
    """'Type: message' on one line (exception messages may span several)."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _is_dotted_name(s: str) -> bool:
    return bool(s) and all(part.isidentifier() for part in s.split("."))


def load_app(spec: str) -> Agent:
    """The Agent named by `"module:attribute"`, like gunicorn and uvicorn.

    The attribute may be dotted (`"pkg.mod:factory.agent"`). When it names a
    callable that is not an Agent, it is an app factory: it is called with no
    arguments and must return an Agent. Every failure raises AppLoadError
    with a one-line message (the CLI prints it and exits 2)::

        agent = load_app("myapp.handlers:agent")
        agent = load_app("myapp.handlers:create_agent")  # factory
    """
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not _is_dotted_name(module_name) or not _is_dotted_name(attr):
        raise AppLoadError(
            f"invalid app spec {spec!r}: expected 'module:attribute', e.g. 'myapp.handlers:agent'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only "not found" when the missing module is the one named (or a
        # parent package of it); a missing import *inside* it is the user's bug.
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise AppLoadError(f"module {module_name!r} not found") from e
        raise AppLoadError(f"error while importing {module_name!r}: {_one_line(e)}") from e
    except (Exception, SystemExit) as e:  # user code: anything can happen at import
        raise AppLoadError(f"error while importing {module_name!r}: {_one_line(e)}") from e

    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise AppLoadError(f"attribute {attr!r} not found in module {module_name!r}") from e

    if isinstance(obj, Agent):
        return obj
    if not callable(obj):
        raise AppLoadError(f"{spec!r} is a {_describe(obj)}, not an Agent")
    try:
        result = obj()
    except (Exception, SystemExit) as e:
        raise AppLoadError(f"error while calling app factory {spec!r}: {_one_line(e)}") from e
    if not isinstance(result, Agent):
        raise AppLoadError(f"app factory {spec!r} returned a {_describe(result)}, not an Agent")
    return result

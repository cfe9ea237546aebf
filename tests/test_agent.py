"""spoa_mp.agent: handler registration, result normalization and app loading."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from spoa_mp.agent import (
    Agent,
    AppLoadError,
    Registered,
    load_app,
    normalize_actions,
)
from spoa_mp.model import Action, Message, set_var, unset_var

CLOSED = (
    "registration is closed: handlers must be registered at import time, "
    "before the server forks workers"
)


def sync_handler(msg: Message) -> Action:
    return set_var("sess", "x", 1)


async def async_handler(msg: Message) -> Action:
    return set_var("sess", "x", 1)


# ------------------------------------------------------------------ registration


def test_on_message_registers_and_returns_the_function_unchanged() -> None:
    agent = Agent("t")

    @agent.on_message("a")
    def handler(msg: Message) -> None:
        return None

    assert handler.__name__ == "handler"
    assert agent.handlers["a"] == Registered(handler, False)
    assert agent.handlers["a"].fn is handler
    assert handler(None) is None  # type: ignore[arg-type]  # still a plain function


def test_decorated_async_handler_is_unchanged_and_marked_coroutine() -> None:
    agent = Agent()
    assert agent.on_message("a")(async_handler) is async_handler
    assert agent.handlers["a"] == Registered(async_handler, True)


def test_add_handler_is_the_non_decorator_form() -> None:
    agent = Agent("t")
    assert agent.add_handler("a", sync_handler) is None
    agent.add_handler("b", async_handler)
    assert dict(agent.handlers) == {
        "a": Registered(sync_handler, False),
        "b": Registered(async_handler, True),
    }


def test_add_batch_handler_is_the_non_decorator_form_of_on_batch() -> None:
    agent = Agent("t")
    fallback = set_var("txn", "fallback", 1)
    agent.add_batch_handler("b", sync_handler, timeout=0.5, on_error=fallback)
    assert agent.handlers["b"] == Registered(
        sync_handler, False, batch=True, timeout=0.5, on_error=(fallback,)
    )


def test_decorator_fallbacks_may_be_one_shot_iterables() -> None:
    # checked once at the decorator line: the iterator is read once, not twice
    agent = Agent("t")
    fallback = set_var("txn", "fallback", 1)
    agent.on_message("m", on_error=iter([fallback]))(sync_handler)
    agent.on_batch("b", on_timeout=iter([fallback]), timeout=1)(sync_handler)
    assert agent.handlers["m"].on_error == (fallback,)
    assert agent.handlers["b"].on_timeout == (fallback,)


def test_agent_name_defaults_to_agent() -> None:
    assert Agent().name == "agent"
    assert Agent("iprep").name == "iprep"
    assert "iprep" in repr(Agent("iprep"))


def test_duplicate_names_raise_and_keep_the_first_handler() -> None:
    agent = Agent("t")
    agent.add_handler("a", sync_handler)
    with pytest.raises(ValueError, match=r"message 'a' already has a handler \(sync_handler\)"):
        agent.add_handler("a", async_handler)
    with pytest.raises(ValueError, match="already has a handler"):
        agent.on_message("a")(async_handler)
    assert agent.handlers["a"].fn is sync_handler


def test_non_callable_handler_is_a_type_error() -> None:
    agent = Agent()
    with pytest.raises(TypeError, match="handler for 'a' must be callable, not int"):
        agent.add_handler("a", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be callable, not str"):
        agent.on_message("b")("not a function")  # type: ignore[type-var]
    with pytest.raises(TypeError, match="worker start hook must be callable, not NoneType"):
        agent.on_worker_start(None)  # type: ignore[type-var]
    assert not agent.handlers
    assert agent.worker_start_hooks == ()


def test_bad_message_names() -> None:
    agent = Agent()
    with pytest.raises(ValueError, match="must not be empty"):
        agent.add_handler("", sync_handler)
    with pytest.raises(TypeError, match="message name must be a str, not bytes"):
        agent.add_handler(b"a", sync_handler)  # type: ignore[arg-type]
    assert not agent.handlers


def test_handlers_is_a_read_only_live_view() -> None:
    agent = Agent()
    view = agent.handlers
    assert isinstance(view, MappingProxyType)
    with pytest.raises(TypeError):
        view["a"] = Registered(sync_handler, False)  # type: ignore[index]
    agent.add_handler("a", sync_handler)
    assert list(view) == ["a"]


def test_worker_start_hooks_in_order_sync_and_async() -> None:
    agent = Agent()

    @agent.on_worker_start
    def first() -> None:
        pass

    @agent.on_worker_start
    async def second() -> None:
        pass

    assert first.__name__ == "first"  # returned unchanged
    assert agent.worker_start_hooks == (Registered(first, False), Registered(second, True))
    assert isinstance(agent.worker_start_hooks, tuple)


def test_freeze() -> None:
    agent = Agent()
    assert not agent.frozen
    agent.add_handler("a", sync_handler)
    agent.freeze()
    agent.freeze()  # idempotent
    assert agent.frozen
    assert agent.handlers["a"].fn is sync_handler  # still readable


@pytest.mark.parametrize(
    ("method", "register"),
    [
        ("on_message", lambda agent: agent.on_message("b")),
        ("on_message", lambda agent: agent.on_message("b")(sync_handler)),
        ("add_handler", lambda agent: agent.add_handler("b", sync_handler)),
        ("add_batch_handler", lambda agent: agent.add_batch_handler("b", sync_handler)),
        ("on_worker_start", lambda agent: agent.on_worker_start(sync_handler)),
    ],
    ids=[
        "on_message",
        "on_message-decorate",
        "add_handler",
        "add_batch_handler",
        "on_worker_start",
    ],
)
def test_freeze_blocks_every_registration_method(method: str, register: Any) -> None:
    agent = Agent("frozen-one")
    agent.add_handler("a", sync_handler)
    agent.freeze()
    with pytest.raises(RuntimeError) as info:
        register(agent)
    assert str(info.value) == f"Agent 'frozen-one': {method}(): {CLOSED}"
    assert list(agent.handlers) == ["a"]
    assert agent.worker_start_hooks == ()


def test_decorator_obtained_before_freeze_is_refused_after() -> None:
    agent = Agent()
    decorator = agent.on_message("late")
    agent.freeze()
    with pytest.raises(RuntimeError, match=CLOSED):
        decorator(sync_handler)
    assert not agent.handlers


# ---------------------------------------------------------- coroutine detection


class AsyncCallable:
    async def __call__(self, msg: Message) -> None:
        return None

    async def method(self, msg: Message) -> None:
        return None


class SyncCallable:
    def __call__(self, msg: Message) -> None:
        return None

    def method(self, msg: Message) -> None:
        return None


async def two_args(x: int, msg: Message) -> None:
    return None


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (async_handler, True),
        (functools.partial(two_args, 1), True),
        (functools.partial(functools.partial(two_args), 1), True),
        (AsyncCallable(), True),
        (functools.partial(AsyncCallable()), True),
        (AsyncCallable().method, True),
        (sync_handler, False),
        (lambda msg: None, False),
        (functools.partial(sync_handler), False),
        (SyncCallable(), False),
        (SyncCallable().method, False),
        (AsyncCallable, False),  # calling the class builds an instance
        (print, False),
    ],
    ids=[
        "async-def",
        "partial",
        "nested-partial",
        "async-__call__",
        "partial-of-async-__call__",
        "async-method",
        "def",
        "lambda",
        "partial-of-def",
        "sync-__call__",
        "sync-method",
        "class",
        "builtin",
    ],
)
def test_coroutine_detection(fn: Any, expected: bool) -> None:
    agent = Agent()
    agent.add_handler("m", fn)
    agent.on_worker_start(fn)
    assert agent.handlers["m"].is_coroutine is expected
    assert agent.worker_start_hooks[0].is_coroutine is expected


# ------------------------------------------------------------ normalize_actions

A = set_var("sess", "a", 1)
B = unset_var("txn", "b")


class MyAction(Action):
    __slots__ = ()


def test_normalize_none_and_single_action() -> None:
    assert normalize_actions(None) == ()
    assert normalize_actions(A) == (A,)
    assert normalize_actions(A)[0] is A


def test_normalize_tuple_is_returned_as_is() -> None:
    result = (A, B)
    assert normalize_actions(result) is result
    assert normalize_actions(()) == ()


def test_normalize_list_and_other_iterables() -> None:
    assert normalize_actions([A, B]) == (A, B)
    assert normalize_actions([]) == ()
    assert normalize_actions(a for a in (A, B)) == (A, B)
    assert normalize_actions(iter([B])) == (B,)
    assert normalize_actions({A}) == (A,)

    class Actions(list):  # type: ignore[type-arg]
        pass

    assert normalize_actions(Actions([A])) == (A,)


def test_normalize_action_subclasses() -> None:
    sub = MyAction(1, A.scope, b"a", A.type, A.num, A.raw)
    assert normalize_actions(sub) == (sub,)
    assert normalize_actions([A, sub]) == (A, sub)
    assert normalize_actions((sub,)) == (sub,)


EXPECTED = "a handler must return an Action, an iterable of Actions or None"


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ("set-var", f"{EXPECTED}, not str"),
        (b"\x01", f"{EXPECTED}, not bytes"),
        (bytearray(b"x"), f"{EXPECTED}, not bytearray"),
        (42, f"{EXPECTED}, not int"),
        (True, f"{EXPECTED}, not bool"),
        ({A: 1}, f"{EXPECTED}, not dict"),
        (object(), f"{EXPECTED}, not object"),
        ([A, 1], f"{EXPECTED}; got a list whose item 1 is a int"),
        ((None,), f"{EXPECTED}; got a tuple whose item 0 is a NoneType"),
        ([[A]], f"{EXPECTED}; got a list whose item 0 is a list"),
        ((x for x in ["s"]), f"{EXPECTED}; got a generator whose item 0 is a str"),
    ],
    ids=[
        "str",
        "bytes",
        "bytearray",
        "int",
        "bool",
        "dict",
        "object",
        "list-with-int",
        "tuple-with-none",
        "nested-list",
        "generator-with-str",
    ],
)
def test_normalize_rejects(result: object, message: str) -> None:
    with pytest.raises(TypeError) as info:
        normalize_actions(result)
    assert str(info.value) == message


def test_normalize_propagates_iteration_errors() -> None:
    def broken() -> Iterator[Action]:
        yield A
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        normalize_actions(broken())


# --------------------------------------------------------------------- load_app


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for throwaway modules, unloaded afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def load_error(spec: str) -> AppLoadError:
    """The AppLoadError that load_app(spec) must raise."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec)
    return info.value


AGENT_MODULE = """
    from types import SimpleNamespace
    from spoa_mp.agent import Agent

    agent = Agent("plain")

    def make():
        return Agent("made")

    factory = SimpleNamespace(agent=Agent("nested"), make=make)
    not_an_agent = 42

    def returns_none():
        return None

    def raises():
        raise ValueError("bad\\nconfig")

    def needs_args(x):
        return Agent()
"""


def test_load_app_module_attribute(app_dir: Path) -> None:
    write(app_dir / "la_plain.py", AGENT_MODULE)
    agent = load_app("la_plain:agent")
    assert isinstance(agent, Agent)
    assert agent.name == "plain"
    assert agent is sys.modules["la_plain"].agent


def test_load_app_factory(app_dir: Path) -> None:
    write(app_dir / "la_factory.py", AGENT_MODULE)
    assert load_app("la_factory:make").name == "made"


def test_load_app_dotted_module_and_attribute(app_dir: Path) -> None:
    write(app_dir / "la_pkg" / "__init__.py", "")
    write(app_dir / "la_pkg" / "mod.py", AGENT_MODULE)
    assert load_app("la_pkg.mod:factory.agent").name == "nested"
    assert load_app("la_pkg.mod:factory.make").name == "made"


@pytest.mark.parametrize(
    "spec", ["la_x", "la_x:", ":agent", "la_x:a:b", "la x:agent", "la_x:1a", ".la_x:agent"]
)
def test_load_app_bad_spec(spec: str) -> None:
    assert str(load_error(spec)) == (
        f"invalid app spec {spec!r}: expected 'module:attribute', e.g. 'myapp.handlers:agent'"
    )


def test_load_app_errors_are_value_errors() -> None:
    assert issubclass(AppLoadError, ValueError)


def test_load_app_module_not_found(app_dir: Path) -> None:
    assert str(load_error("la_missing_xyz:agent")) == "module 'la_missing_xyz' not found"


def test_load_app_parent_package_not_found(app_dir: Path) -> None:
    assert str(load_error("la_missing_pkg.sub:agent")) == "module 'la_missing_pkg.sub' not found"


def test_load_app_submodule_not_found(app_dir: Path) -> None:
    write(app_dir / "la_pkg2" / "__init__.py", "")
    assert str(load_error("la_pkg2.nope:agent")) == "module 'la_pkg2.nope' not found"


def test_load_app_missing_import_inside_the_module(app_dir: Path) -> None:
    write(app_dir / "la_inner.py", "import la_not_installed_xyz\n")
    assert str(load_error("la_inner:agent")) == (
        "error while importing 'la_inner': "
        "ModuleNotFoundError: No module named 'la_not_installed_xyz'"
    )


def test_load_app_import_error_inside_the_module(app_dir: Path) -> None:
    write(app_dir / "la_importerror.py", "from os import no_such_name\n")
    message = str(load_error("la_importerror:agent"))
    assert message.startswith(
        "error while importing 'la_importerror': "
        "ImportError: cannot import name 'no_such_name' from 'os'"
    )
    assert "\n" not in message


def test_load_app_exception_while_importing(app_dir: Path) -> None:
    write(app_dir / "la_boom.py", 'raise RuntimeError("boom\\n  on two lines")\n')
    error = load_error("la_boom:agent")
    assert str(error) == "error while importing 'la_boom': RuntimeError: boom on two lines"
    assert isinstance(error.__cause__, RuntimeError)


def test_load_app_exception_without_message(app_dir: Path) -> None:
    write(app_dir / "la_bare.py", "raise KeyError\n")
    assert str(load_error("la_bare:agent")) == "error while importing 'la_bare': KeyError"


def test_load_app_sys_exit_while_importing(app_dir: Path) -> None:
    write(app_dir / "la_exit.py", "import sys\nsys.exit(3)\n")
    assert str(load_error("la_exit:agent")) == "error while importing 'la_exit': SystemExit: 3"


def test_load_app_syntax_error(app_dir: Path) -> None:
    write(app_dir / "la_syntax.py", "def broken(:\n    pass\n")
    message = str(load_error("la_syntax:agent"))
    assert message.startswith("error while importing 'la_syntax': SyntaxError: ")
    assert "la_syntax.py" in message
    assert "\n" not in message


@pytest.mark.parametrize("attr", ["nope", "factory.nope", "nope.agent"])
def test_load_app_attribute_not_found(app_dir: Path, attr: str) -> None:
    write(app_dir / "la_attr.py", AGENT_MODULE)
    assert str(load_error(f"la_attr:{attr}")) == f"attribute {attr!r} not found in module 'la_attr'"


def test_load_app_attribute_is_not_an_agent(app_dir: Path) -> None:
    write(app_dir / "la_notagent.py", AGENT_MODULE)
    error = load_error("la_notagent:not_an_agent")
    assert str(error) == "'la_notagent:not_an_agent' is a int, not an Agent"


def test_load_app_factory_returns_something_else(app_dir: Path) -> None:
    write(app_dir / "la_badfactory.py", AGENT_MODULE)
    assert str(load_error("la_badfactory:returns_none")) == (
        "app factory 'la_badfactory:returns_none' returned a NoneType, not an Agent"
    )


def test_load_app_factory_raises(app_dir: Path) -> None:
    write(app_dir / "la_raises.py", AGENT_MODULE)
    error = load_error("la_raises:raises")
    assert str(error) == (
        "error while calling app factory 'la_raises:raises': ValueError: bad config"
    )
    error = load_error("la_raises:needs_args")
    assert str(error).startswith(
        "error while calling app factory 'la_raises:needs_args': TypeError: "
    )


def test_load_app_does_not_freeze(app_dir: Path) -> None:
    write(app_dir / "la_nofreeze.py", AGENT_MODULE)
    assert not load_app("la_nofreeze:agent").frozen  # the server freezes before forking


def test_agent_module_imports_no_server_code() -> None:
    # handler modules must be testable without the codec or the server
    code = (
        "import sys, spoa_mp.agent; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('spoa_mp'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["spoa_mp", "spoa_mp.agent", "spoa_mp.model"]

"""spoa_mp.apps.iprep: the default IP-reputation agent."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from spoa_mp import codec
from spoa_mp.agent import Agent, normalize_actions
from spoa_mp.apps import iprep
from spoa_mp.apps.iprep import make_agent
from spoa_mp.model import Action, Message, Scope, String, set_var
from spoa_mp.reputation import ReputationFileError

ENCODER = codec.Encoder()
DECODER = codec.Decoder()


def notify(args: Sequence[tuple[str, Any]], name: str = "check-client-ip") -> Message:
    """The Message HAProxy would send with these (name, value) arguments."""
    data = ENCODER.notify_frame(1, 1, messages=[(name, list(args))])
    frames, items, consumed, error = DECODER.decode(data, 16380)
    assert (consumed, error) == (len(data), 0)
    (msg,) = codec.messages(data, frames[0], items)
    return msg


def handler_of(agent: Agent) -> Callable[[Message], Any]:
    registered = agent.handlers["check-client-ip"]
    assert not registered.is_coroutine
    return registered.fn


def score(agent: Agent, *args: tuple[str, Any]) -> int | None:
    """The score the agent answers for a message, None for no action."""
    actions = normalize_actions(handler_of(agent)(notify(args)))
    if not actions:
        return None
    (action,) = actions
    assert action.name == b"ip_score"
    assert action.scope == Scope.SESS
    value = action.value
    assert isinstance(value, int)
    return value


def ip(addr: str) -> tuple[str, Any]:
    """An unnamed address argument (`args src`)."""
    return ("", IPv4Address(addr) if "." in addr and ":" not in addr else IPv6Address(addr))


def test_module_has_no_agent_at_import() -> None:
    assert not hasattr(iprep, "agent")
    assert iprep.__all__ == ["MESSAGE", "make_agent"]


def test_registers_check_client_ip_only() -> None:
    agent = make_agent(seed=1)
    assert isinstance(agent, Agent)
    assert list(agent.handlers) == ["check-client-ip"]
    assert not agent.frozen  # the server freezes it


# ----------------------------------------------------------------- random mode


def test_random_scores_cover_0_to_100_inclusive_and_nothing_else() -> None:
    agent = make_agent(seed=12345)
    msg = notify([ip("192.0.2.1")])
    handler = handler_of(agent)
    seen: set[int] = set()
    for _ in range(50_000):  # bounded: 0 and 100 each have probability 1/101
        (action,) = normalize_actions(handler(msg))
        value = action.value
        assert isinstance(value, int)
        assert 0 <= value <= 100
        seen.add(value)
        if len(seen) == 101:
            break
    assert seen == set(range(101))


def test_random_mode_answers_ipv6_too() -> None:
    assert 0 <= score(make_agent(seed=3), ip("2001:db8::1")) <= 100  # type: ignore[operator]


def test_seed_makes_the_sequence_reproducible_and_adds_no_hook() -> None:
    def sequence(agent: Agent) -> list[int | None]:
        return [score(agent, ip("192.0.2.1")) for _ in range(50)]

    a, b = make_agent(seed=7), make_agent(seed=7)
    assert a.worker_start_hooks == ()
    assert sequence(a) == sequence(b)
    assert sequence(make_agent(seed=7)) != sequence(make_agent(seed=8))


def test_unseeded_agent_reseeds_in_each_worker() -> None:
    agent = make_agent()
    (hook,) = agent.worker_start_hooks
    assert not hook.is_coroutine
    handler = handler_of(agent)
    msg = notify([ip("192.0.2.1")])

    def child_sequence(run_hook: bool) -> bytes:
        """The scores a forked worker sends (30 of them, as bytes)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (child)
            code = 1
            try:
                if run_hook:
                    hook.fn()
                scores = bytes(normalize_actions(handler(msg))[0].value for _ in range(30))
                os.write(w, scores)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(out) == 30
        return out

    # Without the hook two workers would inherit the same generator state...
    assert child_sequence(run_hook=False) == child_sequence(run_hook=False)
    # ...with it they diverge (equal by chance with probability 101**-30).
    assert child_sequence(run_hook=True) != child_sequence(run_hook=True)


# ------------------------------------------------------------------- file mode

REPUTATION = """\
# test list
10.0.0.0/8        15
10.1.0.0/16       40
10.1.2.0/24       60
192.0.2.7         90
203.0.113.0/24    0
2001:db8::/32     80
2001:db8:1::/48   20
2001:db8:1:2::5   100
"""


@pytest.fixture
def rep_file(tmp_path: Path) -> Path:
    path = tmp_path / "reputation.txt"
    path.write_text(REPUTATION)
    return path


@pytest.fixture
def file_agent(rep_file: Path) -> Agent:
    return make_agent(str(rep_file), default_score=7)


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("10.200.3.4", 15),
        ("10.1.9.9", 40),
        ("10.1.2.200", 60),
        ("10.1.2.0", 60),
        ("10.1.3.0", 40),
        ("10.255.255.255", 15),
        ("192.0.2.7", 90),
        ("192.0.2.8", 7),
        ("203.0.113.9", 0),
        ("11.0.0.0", 7),
        ("0.0.0.0", 7),
        ("255.255.255.255", 7),
        ("2001:db8:5::1", 80),
        ("2001:db8:1::1", 20),
        ("2001:db8:1:2::5", 100),
        ("2001:db8:1:2::6", 20),
        ("2001:db9::", 7),
        ("::1", 7),
        ("::ffff:10.1.2.3", 60),  # IPv4-mapped: looked up as IPv4
        ("::ffff:192.0.2.7", 90),
        ("::ffff:8.8.8.8", 7),
        ("::10.1.2.3", 7),  # IPv4-compatible (deprecated) is not mapped
    ],
)
def test_longest_prefix_match(file_agent: Agent, addr: str, expected: int) -> None:
    assert score(file_agent, ip(addr)) == expected


def test_default_score_defaults_to_100(rep_file: Path) -> None:
    assert score(make_agent(str(rep_file)), ip("11.0.0.1")) == 100


def test_named_ip_argument_wins_over_position(file_agent: Agent) -> None:
    assert score(file_agent, ("ip", IPv4Address("10.1.2.3"))) == 60
    assert score(file_agent, ("other", String(b"x")), ("ip", IPv4Address("10.1.2.3"))) == 60
    assert score(file_agent, ("", IPv4Address("192.0.2.7")), ("ip", IPv4Address("10.1.2.3"))) == 60


def test_first_argument_without_an_ip_name(file_agent: Agent) -> None:
    assert score(file_agent, ("src", IPv4Address("10.1.2.3"))) == 60
    assert score(file_agent, ip("10.1.2.3"), ("", String(b"x"))) == 60
    assert score(file_agent, ip("10.1.2.3"), ip("192.0.2.7")) == 60


@pytest.mark.parametrize(
    "args",
    [
        [],
        [("", None)],
        [("ip", None)],
        [("", String(b"10.1.2.3"))],
        [("", "10.1.2.3")],
        [("", 167838211)],
        [("", b"\x0a\x01\x02\x03")],
        [("", True)],
        [("x", IPv4Address("10.1.2.3")), ("ip", None)],  # the named one is NULL
    ],
    ids=["no-args", "null", "named-null", "string", "str", "int", "binary", "bool", "ip-null"],
)
@pytest.mark.parametrize("mode", ["file", "random"])
def test_no_action_without_an_ip_address(
    rep_file: Path, mode: str, args: list[tuple[str, Any]]
) -> None:
    agent = make_agent(str(rep_file)) if mode == "file" else make_agent(seed=1)
    assert handler_of(agent)(notify(args)) is None
    assert score(agent, *args) is None


def test_actions_are_prebuilt_objects(file_agent: Agent) -> None:
    handler = handler_of(file_agent)
    first = handler(notify([ip("10.1.2.3")]))
    again = handler(notify([ip("10.1.2.99")]))
    mapped = handler(notify([ip("::ffff:10.1.2.1")]))
    # one prebuilt Action per score: the worker's batch encoding path
    # (Action results, bytes cached on them) applies
    assert first.__class__ is Action
    assert first is again is mapped
    assert first == set_var("sess", "ip_score", 60)
    unlisted = handler(notify([ip("11.0.0.1")]))
    assert unlisted is handler(notify([ip("2001:db9::1")]))
    assert unlisted == set_var("sess", "ip_score", 7)


def test_random_actions_are_prebuilt_objects() -> None:
    handler = handler_of(make_agent(seed=5))
    msg = notify([ip("192.0.2.1")])
    by_score: dict[object, Action] = {}
    for _ in range(2000):
        (action,) = normalize_actions(handler(msg))
        assert by_score.setdefault(action.value, action) is action
    assert len(by_score) > 90  # many scores seen, each always the same object


def test_variable_name_and_scope(rep_file: Path) -> None:
    agent = make_agent(str(rep_file), var_name="rep.score", scope="txn")
    (action,) = normalize_actions(handler_of(agent)(notify([ip("10.1.2.3")])))
    assert action == set_var(Scope.TXN, "rep.score", 60)
    agent = make_agent(seed=1, scope=Scope.REQ)
    (action,) = normalize_actions(handler_of(agent)(notify([ip("10.1.2.3")])))
    assert action.scope == Scope.REQ


@pytest.mark.parametrize("bad", [-1, 101, True, 50.0, "50"])
def test_bad_default_score(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"default_score must be an int in 0\.\.100"):
        make_agent(default_score=bad)


def test_bad_variable_name_or_scope() -> None:
    with pytest.raises(ValueError, match="variable name"):
        make_agent(var_name="ip score")
    with pytest.raises(ValueError, match="unknown scope 'session'"):
        make_agent(scope="session")


def test_reputation_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_agent(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("10.0.0.0/8 15\n10.0.0.1/8 20\n")
    with pytest.raises(ReputationFileError, match=r"bad\.txt:2: "):
        make_agent(str(bad))

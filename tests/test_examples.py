"""The example agent in examples/ (copied by users from the README) works,
tested with the test kit (spoa_mp.testing) as the README shows."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType

import pytest

from spoa_mp.agent import Agent
from spoa_mp.model import String, set_var, unset_var
from spoa_mp.testing import AgentClient, serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "botcheck.py"


@pytest.fixture(scope="module")
def botcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("botcheck", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def client(botcheck: ModuleType) -> Iterator[AgentClient]:
    with AgentClient(botcheck.agent) as c:
        yield c


def test_example_registers_its_handlers(botcheck: ModuleType) -> None:
    agent = botcheck.agent
    assert isinstance(agent, Agent)
    assert set(agent.handlers) == {"check-request", "check-token"}
    assert agent.handlers["check-token"].is_coroutine
    assert not agent.handlers["check-request"].is_coroutine
    assert len(agent.worker_start_hooks) == 1


def test_blocked_network_is_a_bot(client: AgentClient) -> None:
    result = client.send("check-request", ip=IPv4Address("192.0.2.7"), ua=String(b"Mozilla/5.0"))
    assert result.actions == [
        set_var("txn", "bot", True),
        set_var("txn", "reason", "blocked network"),
    ]
    assert result.vars == {"txn.bot": True, "txn.reason": "blocked network"}


@pytest.mark.parametrize("ua", [String(b"curl/8.0"), None])
def test_suspicious_user_agent_is_a_bot(client: AgentClient, ua: String | None) -> None:
    result = client.send("check-request", ip=IPv4Address("198.51.100.1"), ua=ua)
    assert result.actions[0] == set_var("txn", "bot", True)
    assert result["txn.reason"] == "suspicious user-agent"


def test_browser_is_not_a_bot(client: AgentClient) -> None:
    result = client.send("check-request", ip=IPv4Address("198.51.100.1"), ua="Mozilla/5.0")
    assert result.actions == [set_var("txn", "bot", False), unset_var("txn", "reason")]
    assert result.unset == ["txn.reason"]


@pytest.mark.parametrize(("token", "valid"), [(String(b"ok-123"), True), (String(b"x"), False)])
def test_token_check_is_a_coroutine(client: AgentClient, token: String, valid: bool) -> None:
    result = client.send("check-token", token=token)
    assert result.actions == [set_var("txn", "token_valid", valid)]
    assert (result.timed_out, result.failed) == (False, False)


@pytest.mark.e2e
def test_the_example_served_as_the_readme_says() -> None:
    # `spoa-mp --app botcheck:agent` from the directory that holds botcheck.py
    with serve("botcheck:agent", cwd=EXAMPLES) as server:
        result = server.send("check-request", ip=IPv4Address("192.0.2.7"), ua="Mozilla/5.0")
        assert result.vars == {"txn.bot": True, "txn.reason": "blocked network"}
        assert server.send("check-token", token="ok-1")["txn.token_valid"] is True

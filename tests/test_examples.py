"""The example agent in examples/ (copied by users from the README) works."""

from __future__ import annotations

import asyncio
import importlib.util
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType

import pytest

from spoa_mp.agent import Agent, normalize_actions
from spoa_mp.codec import Decoder, Encoder, messages
from spoa_mp.model import Message, String, set_var, unset_var

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "botcheck.py"


@pytest.fixture(scope="module")
def botcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("botcheck", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def message(name: str, **args: object) -> Message:
    frame = Encoder().frame(3, 1, 1, messages=[(name, list(args.items()))])
    decoded = Decoder().decode(frame, 16380)
    return messages(frame, decoded.frames[0], decoded.items)[0]


def test_example_registers_its_handlers(botcheck: ModuleType) -> None:
    agent = botcheck.agent
    assert isinstance(agent, Agent)
    assert set(agent.handlers) == {"check-request", "check-token"}
    assert agent.handlers["check-token"].is_coroutine
    assert not agent.handlers["check-request"].is_coroutine
    assert len(agent.worker_start_hooks) == 1


def test_blocked_network_is_a_bot(botcheck: ModuleType) -> None:
    msg = message("check-request", ip=IPv4Address("192.0.2.7"), ua=String(b"Mozilla/5.0"))
    actions = normalize_actions(botcheck.check_request(msg))
    assert actions == (set_var("txn", "bot", True), set_var("txn", "reason", "blocked network"))


@pytest.mark.parametrize("ua", [String(b"curl/8.0"), None])
def test_suspicious_user_agent_is_a_bot(botcheck: ModuleType, ua: String | None) -> None:
    msg = message("check-request", ip=IPv4Address("198.51.100.1"), ua=ua)
    assert normalize_actions(botcheck.check_request(msg))[0] == set_var("txn", "bot", True)


def test_browser_is_not_a_bot(botcheck: ModuleType) -> None:
    msg = message("check-request", ip=IPv4Address("198.51.100.1"), ua=String(b"Mozilla/5.0"))
    actions = normalize_actions(botcheck.check_request(msg))
    assert actions == (set_var("txn", "bot", False), unset_var("txn", "reason"))


@pytest.mark.parametrize(("token", "valid"), [(String(b"ok-123"), True), (String(b"x"), False)])
def test_token_check_is_a_coroutine(botcheck: ModuleType, token: String, valid: bool) -> None:
    result = asyncio.run(botcheck.check_token(message("check-token", token=token)))
    assert normalize_actions(result) == (set_var("txn", "token_valid", valid),)

"""Pytest fixtures of the test kit; enable them in a conftest.py (or a test
module) with ``pytest_plugins = ["spoa_mp.testing_pytest"]``::

    def test_check(spoa_client):
        client = spoa_client(agent, handler_timeout=0.1)
        assert client.send("check-client-ip", ip=IPv4Address("192.0.2.1")).actions == [...]

    def test_served(spoa_server):
        server = spoa_server("myagent:agent", workers=2)
        assert server.send("check-client-ip", ip=IPv4Address("192.0.2.1")).actions == [...]

Both are factories taking the arguments of `AgentClient` and `serve`; what
they made is closed or stopped when the test ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spoa_mp.agent import Agent
from spoa_mp.testing_client import AgentClient
from spoa_mp.testing_server import RunningAgent, serve


@pytest.fixture
def spoa_client() -> Iterator[Callable[..., AgentClient]]:
    """AgentClient(agent, **options), closed at the end of the test."""
    clients: list[AgentClient] = []

    def make(agent: Agent | str, **options: Any) -> AgentClient:
        client = AgentClient(agent, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def spoa_server() -> Iterator[Callable[..., RunningAgent]]:
    """serve(app, *args, **options) started, stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def start(app: str | None = None, *args: str, **options: Any) -> RunningAgent:
            return stack.enter_context(serve(app, *args, **options))

        yield start

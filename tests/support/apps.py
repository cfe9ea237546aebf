"""The test apps that servers load (`--app testapp:agent`): module text that
a test writes into the server's working directory, and the messages that
drive it; and `importable_app`, an app module that this process imports.

`TEST_APP`'s handlers: `fast` answers txn.fast = 1; `boom` raises
ValueError("kaboom from the boom handler"); `hang` blocks its worker;
`slow` (SLOW_HANDLER, shared with the reload tests' app) logs "slow start N"
once it runs (tests wait for that line instead of sleeping), then sleeps MS
milliseconds and answers txn.slow = N.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

Messages = list[tuple[str, list[tuple[str, object]]]]

SLOW_HANDLER = """
@agent.on_message("slow")
async def slow(msg):
    n = msg[0]
    log.info("slow start %s", n)
    await asyncio.sleep(msg[1] / 1000)
    return set_var("txn", "slow", n)
"""

TEST_APP = (
    """
import asyncio
import logging
import time

from spoa_mp.agent import Agent
from spoa_mp.model import set_var

log = logging.getLogger("testapp")
agent = Agent("testapp")


@agent.on_message("fast")
def fast(msg):
    return set_var("txn", "fast", 1)


@agent.on_message("boom")
def boom(msg):
    raise ValueError("kaboom from the boom handler")


@agent.on_message("hang")
def hang(msg):
    time.sleep(3600)

"""
    + SLOW_HANDLER
)


def slow_msg(n: int, ms: int) -> Messages:
    """One `slow` message: answers txn.slow = n after ms milliseconds."""
    return [("slow", [("n", n), ("ms", ms)])]


_module_ids = itertools.count()


def importable_app(
    directory: Path, monkeypatch: pytest.MonkeyPatch, body: str, agent_name: str = "x"
) -> str:
    """A module `tapp_N` in `directory` (put on sys.path until the test's
    monkeypatch is undone) defining `agent = Agent(agent_name)`, then `body`;
    returns its app spec `tapp_N:agent`. N is new for every call, so that no
    module imported by an earlier test is reused."""
    name = f"tapp_{next(_module_ids)}"
    source = f"from spoa_mp.agent import Agent\nagent = Agent({agent_name!r})\n" + body
    (directory / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:agent"

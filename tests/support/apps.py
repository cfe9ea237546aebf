"""The test apps that servers load (`--app testapp:agent`): module text that
a test writes into the server's working directory, and the messages that
drive it.

`TEST_APP`'s handlers: `fast` answers txn.fast = 1; `boom` raises
ValueError("kaboom from the boom handler"); `hang` blocks its worker;
`slow` (SLOW_HANDLER, shared with the reload tests' app) logs "slow start N"
once it runs (tests wait for that line instead of sleeping), then sleeps MS
milliseconds and answers txn.slow = N.
"""

from __future__ import annotations

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

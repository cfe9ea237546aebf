"""The agents bench_handlers.py compares: one per kind of handler, all for
`check-client-ip` (what `spoa-mp bench` sends), all answering one prebuilt
set-var. The Redis kinds are examples/redis_scores.py's two agents."""

from __future__ import annotations

import asyncio

from spoa_mp.agent import Agent
from spoa_mp.model import Action, Message, set_var

ANSWER = set_var("sess", "ip_score", 50)

sync = Agent("bench-sync")
eager = Agent("bench-eager")
sleep = Agent("bench-sleep")


@sync.on_message("check-client-ip")
def check_sync(_msg: Message) -> Action:
    return ANSWER


@eager.on_message("check-client-ip")
async def check_eager(_msg: Message) -> Action:
    """A coroutine that never suspends (a cache hit, say)."""
    return ANSWER


@sleep.on_message("check-client-ip")
async def check_sleep(_msg: Message) -> Action:
    """A coroutine that waits 1 ms (a fast remote call)."""
    await asyncio.sleep(0.001)
    return ANSWER

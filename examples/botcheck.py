"""An example agent: copy this file, change the handlers, run it with

    spoa-mp --app botcheck:agent

(from the directory that holds botcheck.py). HAProxy side: a message
`check-request` with `args ip=src ua=req.hdr(user-agent) path=path`, and
rules reading `txn.<var-prefix>.bot` / `txn.<var-prefix>.reason`.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_network

from spoa_mp.agent import Agent
from spoa_mp.model import Message, set_var, unset_var

agent = Agent("botcheck")

BLOCKED = [ip_network("192.0.2.0/24"), ip_network("2001:db8:bad::/48")]
NOT_A_BOT = (set_var("txn", "bot", False), unset_var("txn", "reason"))  # built once


@agent.on_message("check-request")
def check_request(msg: Message) -> tuple:
    """Plain functions run inline in the worker's loop: keep them fast."""
    ip = msg.get("ip")
    ua = msg.get("ua")  # a String (bytes): HAProxy sends raw bytes
    if ip is not None and any(ip in net for net in BLOCKED):
        return (set_var("txn", "bot", True), set_var("txn", "reason", "blocked network"))
    if ua is None or b"curl" in ua.lower():
        return (set_var("txn", "bot", True), set_var("txn", "reason", "suspicious user-agent"))
    return NOT_A_BOT


@agent.on_message("check-token")
async def check_token(msg: Message) -> list:
    """Coroutines run as tasks: a slow lookup holds up only its own stream."""
    token = msg.get("token")
    await asyncio.sleep(0)  # e.g. await a cache or an HTTP call here
    valid = isinstance(token, bytes) and token.startswith(b"ok-")
    return [set_var("txn", "token_valid", valid)]


@agent.on_worker_start
def connect() -> None:
    """Runs in every worker after the fork: open connections, caches, ... here."""

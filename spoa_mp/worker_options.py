"""What a worker process is given: one frozen WorkerOptions, built once per
generation by the supervisor from the configuration, read by the worker
after the fork."""

from __future__ import annotations

import random
import socket
import ssl
from dataclasses import dataclass, field

from spoa_mp.access import AllowList
from spoa_mp.agent import Agent
from spoa_mp.config import ServerConfig
from spoa_mp.dispatch import DispatchSettings
from spoa_mp.handshake import AgentSettings
from spoa_mp.tls import server_context_for


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What a worker allows a client that may be hostile."""

    hello_timeout: float = 10.0  # seconds from accept to a complete HAPROXY-HELLO
    max_connections: int = 4096  # open connections per worker; beyond, closed at accept
    tls: ssl.SSLContext | None = None  # wraps every accepted connection (tls.py)
    allow: AllowList = field(default_factory=AllowList)  # TCP peers outside: closed at accept


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    listeners: tuple[socket.socket, ...]
    agent: Agent
    settings: AgentSettings = field(default_factory=AgentSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    graceful_timeout: float = 30.0
    debug: bool = False
    max_requests: int = 0  # replace the worker after this many messages (0: never)
    max_requests_jitter: int = 0  # plus a random 0..N, drawn in each worker
    loop: str = "auto"  # spoa_mp.event_loop: auto | asyncio | uvloop

    def recycle_after(self) -> int:
        """This worker's --max-requests (drawn after the fork: each its own)."""
        if not self.max_requests:
            return 0
        return self.max_requests + random.randint(0, self.max_requests_jitter)


def settings_for(config: ServerConfig) -> AgentSettings:
    return AgentSettings(
        max_frame_size=config.max_frame_size,
        pipelining=config.pipelining,
        fragmentation=config.fragmentation,
    )


def options_for(
    config: ServerConfig, agent: Agent, listeners: tuple[socket.socket, ...]
) -> WorkerOptions:
    return WorkerOptions(
        listeners=listeners,
        agent=agent,
        settings=settings_for(config),
        dispatch=DispatchSettings(
            handler_timeout=config.handler_timeout,
            max_pending=config.max_pending,
            blocking_threads=config.blocking_threads,
            max_in_flight=config.max_in_flight,
        ),
        limits=ConnectionLimits(
            config.hello_timeout,
            config.max_connections,
            # built here, in the supervisor, at start and on each reload (a bad
            # file raises TLSError, and a reload keeps the running generation)
            tls=server_context_for(config),
            allow=AllowList(config.allow),
        ),
        graceful_timeout=config.graceful_timeout,
        debug=config.debug,
        max_requests=config.max_requests,
        max_requests_jitter=config.max_requests_jitter,
        loop=config.loop,
    )

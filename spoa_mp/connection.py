"""One HAProxy connection as a worker holds it: the socket, its SPOP state
(protocol.py) and what the worker's loop tracks about it."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from spoa_mp.protocol import AgentConnection


@dataclass(eq=False, slots=True)
class Connection:
    sock: socket.socket
    fd: int
    peer: str
    proto: AgentConnection
    out: bytearray = field(default_factory=bytearray)  # what the kernel did not take yet
    in_flight: int = 0  # NOTIFYs awaiting a handler, not ACKed yet
    reading: bool = True
    closed: bool = False
    tls: bool = False  # an ssl.SSLSocket: finished, not handed over, on reload (tls_io.py)
    handshaking: bool = False  # its TLS handshake is under way
    last_read: float = 0.0  # TLS: loop time of the last read (finishing waits for quiet)
    recheck: asyncio.TimerHandle | None = None  # TLS: finishing looks again then

"""One HAProxy connection as a worker holds it: the socket, its SPOP state
(protocol.py) and what the worker's loop tracks about it."""

from __future__ import annotations

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
    tls: bool = False  # an ssl.SSLSocket: relayed by this process after a reload (relay.py)
    handshaking: bool = False  # its TLS handshake is under way

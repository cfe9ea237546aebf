"""What an AgentConnection reports besides NOTIFYs (`take_events()`), and the
exception its parsers raise when HAProxy's bytes break the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # handshake.py raises ViolationError: import its types only
    from spoa_mp.handshake import Handshake


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    handshake: Handshake


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A health-check HELLO was answered; close once sent."""


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """HAProxy sent HAPROXY-DISCONNECT; our AGENT-DISCONNECT is queued."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """HAProxy's bytes broke the protocol; AGENT-DISCONNECT(status) is queued."""

    status: int
    detail: str


Event: TypeAlias = HandshakeDone | HealthCheck | PeerDisconnected | ProtocolError


class ViolationError(Exception):
    """Raised while reading a frame that breaks the protocol; the connection
    turns it into a ProtocolError event and AGENT-DISCONNECT(status)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

"""The control channel between the supervisor and one worker.

A SOCK_SEQPACKET socketpair per worker: message boundaries are kept, and a
message may carry file descriptors (SCM_RIGHTS), which is how connections
move from an old worker to a new one on reload. Each message is a small
JSON object with a `kind`; each kind has one meaning and one direction.

Worker -> supervisor: `ready` once it accepts connections; `beat` about
once a second from its event loop (a wedged loop stops beating) with its
counters; `boot_error` explaining why it could not start; `connection` with
one connection's socket and negotiated state (a PassedConnection);
`handed_over` when it has passed on all of them; `recycle` when it reached
--max-requests.
Supervisor -> worker: `hand_over` (pass your connections on, then exit);
`adopt` with a connection's socket and state (a PassedConnection).

Neither side ever blocks on the channel: a beat that does not fit is
dropped (the next one carries the same counters).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

# worker -> supervisor
READY = "ready"
BEAT = "beat"
BOOT_ERROR = "boot_error"
CONNECTION = "connection"  # "here is one of my connections" (fd + PassedConnection)
HANDED_OVER = "handed_over"  # "all of them are passed on"
RECYCLE = "recycle"  # "I reached --max-requests, replace me"
# supervisor -> worker
HAND_OVER = "hand_over"  # "pass your connections on, then exit"
ADOPT = "adopt"  # "carry on this connection" (fd + PassedConnection)

MAX_MESSAGE = 1 << 16  # JSON only: connection state is small (no pending bytes, see worker)

Message = dict[str, Any]


class HandshakeState(TypedDict):
    """What HELLO negotiated (spoa_mp.handshake.Handshake, as JSON)."""

    max_frame_size: int
    pipelining: bool
    fragmentation: bool
    engine_id: str
    haproxy_capabilities: list[str]
    healthcheck: bool


class HandoverState(TypedDict):
    """A connection's state between two frames (AgentConnection.handover_state)."""

    phase: int
    max_frame_size: int
    handshake: HandshakeState | None


@dataclass(frozen=True, slots=True)
class PassedConnection:
    """What travels with a connection's descriptor (`connection`, `adopt`)."""

    peer: str
    state: HandoverState

    def fields(self) -> dict[str, object]:
        return {"peer": self.peer, "state": self.state}

    @classmethod
    def from_message(cls, msg: Mapping[str, object]) -> PassedConnection:
        """Checked: a state that is not what handover_state writes raises ValueError."""
        return cls(peer=str(msg.get("peer", "")), state=handover_state(msg.get("state")))


def _field(data: Mapping[str, object], key: str, type_: type[Any]) -> Any:
    value = data.get(key)
    if not isinstance(value, type_) or (type_ is int and isinstance(value, bool)):
        raise ValueError(f"handover state: {key!r} is not {type_.__name__}")
    return value


def handover_state(data: object) -> HandoverState:
    """A HandoverState from JSON-able data (received, or handover_state()'s)."""
    if not isinstance(data, Mapping):
        raise ValueError("handover state: not an object")
    hs = data.get("handshake")
    handshake: HandshakeState | None = None
    if hs is not None:
        if not isinstance(hs, Mapping):
            raise ValueError("handover state: 'handshake' is not an object")
        caps = _field(hs, "haproxy_capabilities", list)
        handshake = HandshakeState(
            max_frame_size=_field(hs, "max_frame_size", int),
            pipelining=_field(hs, "pipelining", bool),
            fragmentation=_field(hs, "fragmentation", bool),
            engine_id=_field(hs, "engine_id", str),
            haproxy_capabilities=[str(c) for c in caps],
            healthcheck=_field(hs, "healthcheck", bool),
        )
    return HandoverState(
        phase=_field(data, "phase", int),
        max_frame_size=_field(data, "max_frame_size", int),
        handshake=handshake,
    )


def channel() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end), both non-blocking."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        sock.setblocking(False)
    return ours, theirs


def encode(kind: str, **fields: object) -> bytes:
    return json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()


def send(sock: socket.socket, kind: str, fds: tuple[int, ...] = (), **fields: object) -> bool:
    """Send one message (with fds, if any); False if it would block or the
    peer is gone."""
    data = encode(kind, **fields)
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        return False
    return True


def receive(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """One message and the fds that came with it; None when nothing is
    waiting; raises EOFError when the peer is gone. Fds of a message that
    cannot be parsed are closed, never leaked."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 8)
    except BlockingIOError:
        return None
    except ConnectionResetError as e:
        raise EOFError from e
    if not data:
        raise EOFError
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
            raise ValueError("not a control message")
    except ValueError:
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        return {"kind": "invalid"}, []
    return msg, fds

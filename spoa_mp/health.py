"""The control channel between the supervisor and one worker.

A SOCK_SEQPACKET socketpair per worker: message boundaries are kept, and a
message may carry file descriptors (SCM_RIGHTS), which is how connections
move from an old worker to a new one on reload. Each message is a small
JSON object with a `kind`.

Worker -> supervisor: `ready` once it accepts connections; `beat` about
once a second from its event loop (a wedged loop stops beating) with its
counters; `boot_error` explaining why it could not start; `handover` with
one connection's socket and negotiated state; `handed_over` when it has
passed on all of them; `recycle` when it reached --max-requests.
Supervisor -> worker: `handover` (pass your connections on, then exit);
`adopt` with a connection's socket and state.

Neither side ever blocks on the channel: a beat that does not fit is
dropped (the next one carries the same counters).
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

READY = "ready"
BEAT = "beat"
BOOT_ERROR = "boot_error"
HANDOVER = "handover"  # supervisor: "hand your connections over"; worker: "here is one"
HANDED_OVER = "handed_over"
ADOPT = "adopt"
RECYCLE = "recycle"  # worker: "I reached --max-requests, replace me"

MAX_MESSAGE = 1 << 16  # JSON only: connection state is small (no pending bytes, see worker)

Message = dict[str, Any]


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

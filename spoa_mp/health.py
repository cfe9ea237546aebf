"""The worker -> supervisor health pipe: one JSON object per line.

A worker says `ready` once it accepts connections, then `beat` about once a
second from its event loop (so a wedged loop stops beating), carrying its
counters; `boot_error` explains why it could not start. Lines stay far below
PIPE_BUF, so each write is atomic; a worker never blocks on the pipe (a beat
that does not fit is dropped: the next one carries the same counters).
"""

from __future__ import annotations

import json
import os
from typing import Any

READY = "ready"
BEAT = "beat"
BOOT_ERROR = "boot_error"

Message = dict[str, Any]


def encode(kind: str, **fields: object) -> bytes:
    return json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode() + b"\n"


def send(fd: int, kind: str, **fields: object) -> bool:
    """Write one message without blocking; False if the pipe is full or gone."""
    try:
        os.write(fd, encode(kind, **fields))
    except (BlockingIOError, BrokenPipeError):
        return False
    return True


class Reader:
    """Splits what arrives on a pipe into messages (the supervisor side)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self._buf = b""
        self._limit = limit

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        if b"\n" not in self._buf:
            if len(self._buf) > self._limit:  # no line end in sight: not our format
                self._buf = b""
            return []
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and isinstance(msg.get("kind"), str):
                out.append(msg)
        return out

"""The rare frames a connection counts for the worker's metrics."""

from __future__ import annotations

from spoa_mp.codec import FrameType

FRAME_NAMES: dict[int, str] = {
    FrameType.UNSET: "unset",
    FrameType.HAPROXY_HELLO: "haproxy-hello",
    FrameType.HAPROXY_DISCONNECT: "haproxy-disconnect",
    FrameType.NOTIFY: "notify",
    FrameType.AGENT_HELLO: "agent-hello",
    FrameType.AGENT_DISCONNECT: "agent-disconnect",
    FrameType.ACK: "ack",
}


class FrameCounts:
    """Frames counted where they are rare: everything but NOTIFY in and ACK
    out, which the caller counts in bulk (one worker-wide instance is shared
    by its connections)."""

    __slots__ = ("disconnects_in", "disconnects_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in: dict[str, int] = {}
        self.frames_out: dict[str, int] = {}
        self.disconnects_in: dict[str, int] = {}  # by status code
        self.disconnects_out: dict[str, int] = {}

    @staticmethod
    def add(table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

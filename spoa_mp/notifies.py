"""The NOTIFY frames of one read, as the hot path hands them to the dispatcher."""

from __future__ import annotations

from array import array
from typing import TypeAlias

from spoa_mp.model import Message

Notification: TypeAlias = tuple[int, int, list[Message]]
"""(stream-id, frame-id, messages) of one NOTIFY; answer with AgentConnection.ack()."""


class Notifies:
    """The NOTIFY frames of one feed(), in arrival order, column-wise.

    `ids` holds (stream-id, frame-id) pairs; `messages` every message in
    order; `counts` the number of messages of each NOTIFY, or None while
    each carries exactly one (HAProxy sends one message per event unless a
    group says otherwise). Columns cost no object per NOTIFY, and ack_for()
    hands `ids` to the encoder as they are.
    """

    __slots__ = ("counts", "ids", "messages")

    def __init__(
        self, ids: array[int] | None = None, messages: list[Message] | None = None
    ) -> None:
        self.ids = array("Q") if ids is None else ids
        self.messages: list[Message] = [] if messages is None else messages
        self.counts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids) >> 1

    def extend(self, other: Notifies) -> None:
        """Append the NOTIFYs of another feed (in order)."""
        if other.counts is not None and self.counts is None:
            self.counts = [1] * len(self)
        if self.counts is not None:
            self.counts += [1] * len(other) if other.counts is None else other.counts
        self.ids += other.ids
        self.messages += other.messages

    def add(self, sid: int, fid: int, msgs: list[Message]) -> None:
        if self.counts is None and len(msgs) != 1:
            self.counts = [1] * len(self)
        if self.counts is not None:
            self.counts.append(len(msgs))
        self.ids.append(sid)
        self.ids.append(fid)
        self.messages += msgs

    def notifications(self) -> list[Notification]:
        """One (sid, fid, messages) tuple per NOTIFY."""
        ids = self.ids
        if self.counts is None:
            return [(ids[2 * k], ids[2 * k + 1], [m]) for k, m in enumerate(self.messages)]
        notes = []
        at = 0
        for k, count in enumerate(self.counts):
            notes.append((ids[2 * k], ids[2 * k + 1], self.messages[at : at + count]))
            at += count
        return notes

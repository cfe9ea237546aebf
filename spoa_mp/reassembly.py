"""Fragmented NOTIFY frames (HAProxy <= 3.0), put back together.

A NOTIFY without FIN starts a payload, UNSET frames with the same stream-id
and frame-id continue it, FIN ends it; ABORT drops it. The pieces are joined
into one whole NOTIFY frame built in place, decoded once when complete.
"""

from __future__ import annotations

from spoa_mp.codec import (
    F_FID,
    F_FLAGS,
    F_PLEN,
    F_POFF,
    F_SID,
    F_TYPE,
    FLAG_ABORT,
    FLAG_FIN,
    CodecError,
    FrameRecord,
    FrameType,
    Status,
    encode_varint,
    whole_notify_messages,
)
from spoa_mp.events import ViolationError
from spoa_mp.notifies import Notification


class Reassembly:
    """The fragmented NOTIFY under way on one connection (at most one: HAProxy
    does not interlace them), bounded to `max_size` payload bytes."""

    __slots__ = ("_fragment", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # (sid, fid, the frame so far, where its payload starts)
        self._fragment: tuple[int, int, bytearray, int] | None = None

    @property
    def under_way(self) -> bool:
        return self._fragment is not None

    def take(self, data: bytes, f: FrameRecord, announced: bool) -> Notification | None:
        """Take one NOTIFY-without-FIN, UNSET or ABORT frame (record `f` of
        `data`); returns the NOTIFY once its last fragment is in. `announced`:
        we offered fragmentation in the handshake."""
        sid, fid, flags, type_ = f[F_SID], f[F_FID], f[F_FLAGS], f[F_TYPE]
        if flags & FLAG_ABORT:
            # HAProxy gave up on this NOTIFY: forget it, nothing to answer
            if self._fragment is not None and self._fragment[:2] == (sid, fid):
                self._fragment = None
            return None
        if not announced:
            raise ViolationError(Status.FRAGMENTATION_NOT_SUPPORTED, "fragment, not announced")
        if type_ == FrameType.NOTIFY:
            if self._fragment is not None:
                raise ViolationError(Status.INTERLACED_FRAMES, "new NOTIFY inside a fragmented one")
            # the whole frame is built in place: a length prefix (set at the
            # end), the header of a NOTIFY with FIN, then the payloads
            head = bytes((0, 0, 0, 0, FrameType.NOTIFY, 0, 0, 0, FLAG_FIN))
            buf = bytearray(head + encode_varint(sid) + encode_varint(fid))
            self._fragment = (sid, fid, buf, len(buf))
            buf += data[f[F_POFF] : f[F_POFF] + f[F_PLEN]]
            return None
        if self._fragment is None or self._fragment[:2] != (sid, fid):
            raise ViolationError(Status.INTERLACED_FRAMES, "continuation of an unknown NOTIFY")
        _, _, buf, head_len = self._fragment
        buf += memoryview(data)[f[F_POFF] : f[F_POFF] + f[F_PLEN]]
        if len(buf) - head_len > self.max_size:
            raise ViolationError(Status.TOO_BIG, "reassembled NOTIFY above the limit")
        if not flags & FLAG_FIN:
            return None
        self._fragment = None
        buf[:4] = (len(buf) - 4).to_bytes(4, "big")
        frame = bytes(buf)
        del buf[:]  # the only copy left is `frame`, which the messages keep
        try:
            return (sid, fid, whole_notify_messages(frame))
        except CodecError as e:
            raise ViolationError(e.status, "malformed reassembled NOTIFY") from None

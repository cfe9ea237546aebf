"""DISCONNECT frames: reading HAProxy's, encoding ours."""

from __future__ import annotations

from spoa_mp.codec import Encoder, FrameRecord, FrameType, Status, item_bytes, item_value, kv_items
from spoa_mp.handshake import INTEGER_TYPES
from spoa_mp.model import I_TYPE, DataType, ItemRecord, String


def read_disconnect(data: bytes, f: FrameRecord, items: list[ItemRecord]) -> tuple[int, str]:
    """(status-code, message) of a HAPROXY-DISCONNECT; lenient, as it ends the
    connection anyway: a missing or mistyped field reads as 0 or ""."""
    kv = kv_items(data, f, items)
    code = kv.get("status-code")
    status = item_value(data, code) if code is not None and code[I_TYPE] in INTEGER_TYPES else 0
    msg = kv.get("message")
    text = ""
    if msg is not None and msg[I_TYPE] == DataType.STRING:
        text = item_bytes(data, msg).decode("utf-8", "replace")
    assert isinstance(status, int)
    if not 0 <= status <= 0xFFFFFFFF:
        status = Status.UNKNOWN
    return status, text


def agent_disconnect(encoder: Encoder, status: int, message: str) -> bytes:
    """The AGENT-DISCONNECT frame; the message is cut to 255 bytes (HAProxy 2.6
    discards a longer one and waits for its idle timeout)."""
    return encoder.kv_frame(
        FrameType.AGENT_DISCONNECT, 0, 0,
        kv=[
            ("status-code", (DataType.UINT32, status & 0xFFFFFFFF, b"")),
            ("message", String(message.encode()[:255])),
        ],
    )  # fmt: skip

"""HELLO: what the agent offers, what HAPROXY-HELLO asks, what they agree on.

`negotiate` reads a HAPROXY-HELLO into a Handshake (raising ViolationError with
the status HAProxy's own agents answer), `agent_hello` encodes our answer.
The connection state machine (protocol.py) decides what happens next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spoa_mp.codec import (
    DEFAULT_FRAME_SIZE,
    F_FID,
    F_SID,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Encoder,
    FrameRecord,
    FrameType,
    Status,
    item_bytes,
    item_value,
    kv_items,
)
from spoa_mp.events import ViolationError
from spoa_mp.model import I_NUM, I_TYPE, DataType, ItemRecord, String

if TYPE_CHECKING:  # the types only: the handshake knows no sockets
    from spoa_mp.control import HandshakeState

SPOP_VERSION = "2.0"
INTEGER_TYPES = frozenset((DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64))


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What this agent offers in the handshake."""

    max_frame_size: int = DEFAULT_FRAME_SIZE
    pipelining: bool = True  # announced only when HAProxy offers it
    fragmentation: bool = True  # reassemble fragmented NOTIFY (HAProxy <= 3.0)
    max_reassembled_size: int = 1 << 20  # bound on a reassembled NOTIFY payload

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max-frame-size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE}]")


@dataclass(frozen=True, slots=True)
class Handshake:
    """The outcome of HAPROXY-HELLO / AGENT-HELLO on one connection."""

    max_frame_size: int
    pipelining: bool
    fragmentation: bool
    engine_id: str
    haproxy_capabilities: tuple[str, ...]
    healthcheck: bool

    def state(self) -> HandshakeState:
        """As JSON-able data, for a handover to another process."""
        return {
            "max_frame_size": self.max_frame_size,
            "pipelining": self.pipelining,
            "fragmentation": self.fragmentation,
            "engine_id": self.engine_id,
            "haproxy_capabilities": list(self.haproxy_capabilities),
            "healthcheck": self.healthcheck,
        }

    @classmethod
    def from_state(cls, hs: HandshakeState) -> Handshake:
        return cls(
            max_frame_size=int(hs["max_frame_size"]),
            pipelining=bool(hs["pipelining"]),
            fragmentation=bool(hs["fragmentation"]),
            engine_id=str(hs["engine_id"]),
            haproxy_capabilities=tuple(str(c) for c in hs["haproxy_capabilities"]),
            healthcheck=bool(hs["healthcheck"]),
        )


def parse_capabilities(value: bytes) -> tuple[str, ...]:
    """HAProxy's capability list: comma-separated, blanks ignored (a blank also
    ends a name, as in HAProxy's own parser)."""
    return tuple(t.decode("ascii", "replace") for t in re.split(rb"[,\s]+", value) if t)


def supports_version(value: bytes) -> bool:
    """Whether a `supported-versions` list includes 2.0 (a major version
    announces all its minors)."""
    for entry in value.split(b","):
        major, _, minor = entry.strip().partition(b".")
        # bounded before int(): a peer could send thousands of digits
        numeric = major.isdigit() and minor.isdigit() and len(major) <= 3 and len(minor) <= 3
        if numeric and int(major) == 2:
            return True
    return False


def negotiate(
    settings: AgentSettings, data: bytes, f: FrameRecord, items: list[ItemRecord]
) -> Handshake:
    """The Handshake a HAPROXY-HELLO (frame record `f` of `data`) agrees to."""
    if f[F_SID] or f[F_FID]:
        raise ViolationError(Status.INVALID, "HELLO with non-zero stream-id or frame-id")
    kv = kv_items(data, f, items)

    versions = kv.get("supported-versions")
    if versions is None:
        raise ViolationError(Status.NO_VERSION, "no supported-versions")
    if versions[I_TYPE] != DataType.STRING:
        raise ViolationError(Status.INVALID, "supported-versions is not a string")
    if not supports_version(item_bytes(data, versions)):
        raise ViolationError(Status.BAD_VERSION, "HAProxy does not offer SPOP 2.x")

    size = kv.get("max-frame-size")
    if size is None:
        raise ViolationError(Status.NO_FRAME_SIZE, "no max-frame-size")
    if size[I_TYPE] not in INTEGER_TYPES:
        raise ViolationError(Status.INVALID, "max-frame-size is not an integer")
    theirs = item_value(data, size)
    assert isinstance(theirs, int)
    if theirs < MIN_FRAME_SIZE:
        raise ViolationError(
            Status.BAD_FRAME_SIZE, f"max-frame-size {theirs} is below {MIN_FRAME_SIZE}"
        )

    caps: tuple[str, ...] = ()
    cap_item = kv.get("capabilities")
    if cap_item is not None:
        if cap_item[I_TYPE] != DataType.STRING:
            raise ViolationError(Status.INVALID, "capabilities is not a string")
        caps = parse_capabilities(item_bytes(data, cap_item))

    check = kv.get("healthcheck")
    healthcheck = check is not None and check[I_TYPE] == DataType.BOOL and bool(check[I_NUM])
    engine = kv.get("engine-id")
    engine_id = ""
    if engine is not None and engine[I_TYPE] == DataType.STRING:
        engine_id = item_bytes(data, engine).decode("utf-8", "replace")

    return Handshake(
        max_frame_size=min(settings.max_frame_size, theirs),
        pipelining=settings.pipelining and "pipelining" in caps,
        fragmentation=settings.fragmentation,
        engine_id=engine_id,
        haproxy_capabilities=caps,
        healthcheck=healthcheck,
    )


def agent_hello(encoder: Encoder, hs: Handshake) -> bytes:
    """The AGENT-HELLO frame announcing what `hs` agreed."""
    ours = [
        c for c, on in (("pipelining", hs.pipelining), ("fragmentation", hs.fragmentation)) if on
    ]
    return encoder.kv_frame(
        FrameType.AGENT_HELLO, 0, 0,
        kv=[
            ("version", String(SPOP_VERSION.encode())),
            ("max-frame-size", (DataType.UINT32, hs.max_frame_size, b"")),
            ("capabilities", String(",".join(ours).encode())),
        ],
    )  # fmt: skip

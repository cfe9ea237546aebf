"""What a worker counts and reports in every heartbeat (control.py),
cumulative since it started; the supervisor sums them over
workers alive and gone (see metrics.py)."""

from __future__ import annotations

from collections.abc import Iterable

from spoa_mp.frame_counts import FrameCounts
from spoa_mp.handshake import Handshake
from spoa_mp.metrics import LatencyHistogram


class Counters:
    def __init__(self) -> None:
        self.messages: dict[str, int] = {}  # by message name
        self.handler_errors: dict[str, int] = {}  # by message name: raised or returned garbage
        self.handler_timeouts: dict[str, int] = {}  # by message name: ACKed with on_timeout
        self.latency = LatencyHistogram()
        self.frames = FrameCounts()  # the rare frames, counted by the protocol core
        self.notifies = 0  # NOTIFY in and ACK out: counted in bulk by the dispatcher
        self.acks = 0
        self.connections_total = 0
        self.connections_refused = 0  # closed at accept: --max-connections
        self.hello_timeouts = 0  # closed: no HELLO within --hello-timeout
        self.tls_handshake_failures = 0  # closed: TLS handshake failed or timed out
        self.connections_not_allowed = 0  # closed at accept: peer outside --allow
        self.protocol_errors = 0
        self.acks_cut = 0
        self.backpressure = 0  # times reads paused at --max-pending
        self.handed_over = 0
        self.adopted = 0

    @property
    def messages_total(self) -> int:
        return sum(self.messages.values())

    def as_dict(self) -> dict[str, object]:
        f = self.frames
        return {
            "messages": self.messages,
            "handler_errors": self.handler_errors,
            "handler_timeouts": self.handler_timeouts,
            "latency": self.latency.snapshot(),
            "frames_in": {**f.frames_in, "notify": self.notifies},
            "frames_out": {**f.frames_out, "ack": self.acks},
            "disconnects": {"in": f.disconnects_in, "out": f.disconnects_out},
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "hello_timeouts": self.hello_timeouts,
            "tls_handshake_failures": self.tls_handshake_failures,
            "connections_not_allowed": self.connections_not_allowed,
            "protocol_errors": self.protocol_errors,
            "acks_cut": self.acks_cut,
            "backpressure": self.backpressure,
            "handed_over": self.handed_over,
            "adopted": self.adopted,
        }


def gauges(
    connections: int, in_flight: int, handshakes: Iterable[Handshake | None]
) -> dict[str, object]:
    """A worker's gauges for its heartbeat: what is open now, and what its
    connections negotiated (health checks and handshakes under way left out)."""
    sizes: dict[str, int] = {}
    caps: dict[str, int] = {}
    for hs in handshakes:
        if hs is not None and not hs.healthcheck:
            FrameCounts.add(sizes, str(hs.max_frame_size))
            names = [n for n, on in (("pipelining", hs.pipelining),
                                     ("fragmentation", hs.fragmentation)) if on]  # fmt: skip
            FrameCounts.add(caps, ",".join(names))
    return {
        "connections": connections,
        "in_flight": in_flight,
        "negotiated": {"max_frame_size": sizes, "capabilities": caps},
    }

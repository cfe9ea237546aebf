"""The supervisor's view of one worker process: a small state machine.

    STARTING --ready--> READY --retire--> RETIRING --(exits)
       |  \\                |                  |
       |   boot_error      kill (no heartbeat for --worker-timeout)
       v     v             v                  v
    RETIRING BOOT_FAILED   KILLED <-----------+

What its death means follows from the state it died in (`death()`), so the
supervisor does not have to interpret a bag of flags.
"""

from __future__ import annotations

import enum
import socket


class State(enum.Enum):
    STARTING = "starting"  # forked, not serving yet
    READY = "ready"  # accepting and serving connections
    BOOT_FAILED = "boot failed"  # said why it cannot start; exits
    RETIRING = "retiring"  # told to hand its connections over (or drain) and exit
    KILLED = "killed"  # SIGKILLed: no heartbeat for --worker-timeout


class Death(enum.Enum):
    EXPECTED = "expected"  # it was told to go
    BOOT_FAILED = "boot failed"  # it said why it could not start
    HUNG = "hung"  # killed after --worker-timeout
    CRASHED = "crashed"  # anything else: exited or killed unasked


class TransitionError(RuntimeError):
    pass


class WorkerProcess:
    __slots__ = (
        "_retired",
        "boot_error",
        "channel",
        "connections",
        "generation",
        "index",
        "last_beat",
        "pid",
        "served",
        "started",
        "state",
        "successor",
    )  # fmt: skip

    def __init__(
        self, index: int, generation: int, pid: int, channel: socket.socket | None, now: float
    ) -> None:
        self.index = index  # its slot, 1..--workers
        self.generation = generation
        self.pid = pid
        self.channel = channel  # our end of its control channel (control.py)
        self.started = now
        self.last_beat = now
        self.state = State.STARTING
        self.boot_error: str | None = None
        self.connections = 0  # from its heartbeats
        self.successor = 0  # recycling: pid of the worker that will take over
        self.served = False  # it was READY once (even if it is retiring now)
        self._retired = False  # it was told to go before it was killed

    def __repr__(self) -> str:
        return f"<worker {self.index} pid {self.pid} gen {self.generation} {self.state.value}>"

    # ------------------------------------------------------------ transitions

    def mark_ready(self) -> None:
        """It accepts connections. A worker already told to go stays retiring."""
        if self.state is State.STARTING:
            self.state = State.READY
            self.served = True
        elif self.state is State.RETIRING:
            self.served = True
        elif self.state is not State.KILLED:
            raise TransitionError(f"{self!r} cannot become ready")

    def mark_boot_failed(self, error: str) -> None:
        if self.state is State.STARTING:
            self.state = State.BOOT_FAILED
        self.boot_error = error

    def retire(self) -> bool:
        """Told to go (hand over or drain). False if it already was, or is dead."""
        if self.state in (State.RETIRING, State.KILLED):
            return False
        self.state = State.RETIRING
        self._retired = True
        return True

    def kill_for_timeout(self) -> None:
        if self.state is State.KILLED:
            raise TransitionError(f"{self!r} was killed already")
        self.state = State.KILLED

    # ------------------------------------------------------------ questions

    @property
    def serving(self) -> bool:
        """Ready, and not on its way out: new connections may go to it."""
        return self.state is State.READY

    @property
    def retiring(self) -> bool:
        """It was told to go (its death is no news)."""
        return self._retired

    def beat(self, now: float) -> None:
        self.last_beat = now

    def overdue(self, now: float, timeout: float) -> bool:
        """No heartbeat for `timeout` seconds, and not killed for it yet."""
        return self.state is not State.KILLED and now - self.last_beat > timeout

    def death(self) -> Death:
        """What its exit means, from the state it was in."""
        if self._retired:
            return Death.EXPECTED
        if self.boot_error is not None:
            return Death.BOOT_FAILED
        if self.state is State.KILLED:
            return Death.HUNG
        return Death.CRASHED

"""Loopback ports and bounded waits: every wait polls a condition until a
deadline, never a bare sleep. Only 127.0.0.1 is used."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # process start until the port accepts / workers are ready
WAIT_TIMEOUT = 10.0  # the default bound of every other wait
STOP_TIMEOUT = 10.0  # SIGTERM until exit
IO_TIMEOUT = 5.0  # one frame or one HTTP exchange

T = TypeVar("T")


def free_port(host: str = HOST) -> int:
    """A TCP port the OS considers free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float = WAIT_TIMEOUT,
    what: str = "",
    interval: float = 0.02,
) -> T:
    """Poll `predicate` until it returns something truthy (which is returned);
    TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        time.sleep(interval)


def connect_refused(port: int, host: str = HOST) -> bool:
    """True when a TCP connect to host:port is refused right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def accepting(port: int, host: str = HOST) -> bool:
    """True when host:port accepts a TCP connection right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

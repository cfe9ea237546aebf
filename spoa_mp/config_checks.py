"""The value checks of the settings (spoa_mp/config.py): one per key that has
one, run on the coerced value from the command line or the TOML file. Each
returns None when the value is fine, else the reason, worded to follow
"FILE: 'key' " or "--key "."""

from __future__ import annotations

import grp
import math
import os
import pwd
import re
from collections.abc import Callable

from spoa_mp import event_loop
from spoa_mp.addresses import parse_address
from spoa_mp.event_loop import EVENT_LOOPS
from spoa_mp.limits import MAX_FRAME_SIZE, MIN_FRAME_SIZE

MAX_WORKERS = 1024
RELOAD_MODES = ("handover", "rolling", "drain")
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included.
_UNIX_PATH_MAX = 107

Check = Callable[[object], "str | None"]


def _check_blocklists(value: object) -> str | None:
    assert isinstance(value, tuple)
    for path, _ in value:
        reason = _check_readable_file(path)
        if reason:
            return reason
    return None


def _between(low: int, high: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        assert isinstance(value, int)
        if low <= value <= high:
            return None
        return f"must be between {low} and {high}, got {value}"

    return check


def _at_least_one(value: object) -> str | None:
    assert isinstance(value, int)
    return None if value >= 1 else f"must be at least 1, got {value}"


def _seconds(*, zero_ok: bool) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        assert isinstance(value, float)
        if not math.isfinite(value):
            return f"must be a finite number of seconds, got {value}"
        if value < 0 or (value == 0 and not zero_ok):
            bound = "0 or more" if zero_ok else "more than 0"
            return f"must be {bound} seconds, got {value:g}"
        return None

    return check


def _check_host(value: object) -> str | None:
    assert isinstance(value, str)
    if not value or value != value.strip():
        return f"must be a host name or address, got {value!r}"
    return None


_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z", re.ASCII)


def _check_app(value: object) -> str | None:
    if value is None:
        return None
    assert isinstance(value, str)
    module, sep, attr = value.partition(":")
    if sep and _DOTTED.match(module) and _DOTTED.match(attr):
        return None
    return f"must look like 'module:attribute' (e.g. 'myapp.handlers:agent'), got {value!r}"


def _check_unix(value: object) -> str | None:
    if value is None:
        return None
    assert isinstance(value, str)
    if not value:
        return "must be a path, got ''"
    size = len(os.fsencode(value))
    if size > _UNIX_PATH_MAX:
        return f"is too long for a Unix socket ({size} bytes, at most {_UNIX_PATH_MAX}): {value}"
    directory = os.path.dirname(value) or "."
    if not os.path.isdir(directory):
        return f"is in a directory that does not exist: {directory}"
    return None


def _check_readable_file(value: object) -> str | None:
    if value is None:
        return None
    assert isinstance(value, str)
    if not value:
        return "must be a path, got ''"
    try:
        with open(value, "rb"):
            pass
    except OSError as e:
        return f"cannot be read: {value}: {e.strerror or e}"
    return None


def _check_metrics_address(value: object) -> str | None:
    try:
        parse_address(str(value))
    except ValueError as e:
        return str(e)
    return None


def _check_user(value: object) -> str | None:
    try:
        pwd.getpwnam(str(value))
    except KeyError:
        return f"no such user: {value}"
    return None


def _check_group(value: object) -> str | None:
    try:
        grp.getgrnam(str(value))
    except KeyError:
        return f"no such group: {value}"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def _check_loop(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be one of {', '.join(EVENT_LOOPS)}, got {value!r}"
    try:
        event_loop.resolve(value)
    except ValueError as e:
        return str(e)
    return None


CHECKS: dict[str, Check] = {
    "host": _check_host,
    "port": _between(0, 65535),
    "unix": _check_unix,
    "backlog": _between(1, 65535),
    "workers": _between(1, MAX_WORKERS),
    "app": _check_app,
    "reputation_file": _check_readable_file,
    "default_score": _between(0, 100),
    "blocklist": _check_blocklists,
    "max_frame_size": _between(MIN_FRAME_SIZE, MAX_FRAME_SIZE),
    "max_in_flight": _at_least_one,
    "max_pending": _at_least_one,
    "handler_timeout": _seconds(zero_ok=False),
    "blocking_threads": _between(1, 1024),
    "hello_timeout": _seconds(zero_ok=False),
    "max_connections": _at_least_one,
    "worker_timeout": _seconds(zero_ok=False),
    "graceful_timeout": _seconds(zero_ok=True),
    "reload_mode": _one_of(RELOAD_MODES),
    "user": _check_user,
    "group": _check_group,
    "max_requests": _between(0, 1 << 62),
    "max_requests_jitter": _between(0, 1 << 62),
    "max_rss": _between(0, 1 << 40),
    "metrics": _check_metrics_address,
    "tls_cert": _check_readable_file,
    "tls_key": _check_readable_file,
    "tls_client_ca": _check_readable_file,
    "log_format": _one_of(("text", "json")),
    "loop": _check_loop,
}

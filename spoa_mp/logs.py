"""Logging for a pre-forked process tree: one stderr handler, pid and role on every line.

::

    2026-05-09 07:35:25,123 4242 supervisor INFO spoa_mp.supervisor: listening on 127.0.0.1:12345
    2026-05-09 07:35:25,130 4243 worker 1 WARNING spoa_mp.worker: accept failed: ...

or, with ``--log-format json``, one JSON object per line (:class:`JsonFormatter`)::

    {"time": "2026-05-09T07:35:25.130Z", "level": "warning", "pid": 4243, "role": "worker",
     "worker": 1, "logger": "spoa_mp.worker", "event": "accept failed: %s",
     "args": ["[Errno 24] Too many open files"],
     "message": "accept failed: [Errno 24] Too many open files"}

``event`` is the call's format string, the same for every occurrence (what to
group and alert on), ``args`` its values, ``message`` the two put together;
``extra={...}`` fields of a call become keys of their own, and a traceback is
``exc``. In that format uncaught exceptions and warnings are logged too, so
that nothing else reaches stderr as free text.

Only ``cli.main()`` calls :func:`setup_logging`; modules just use
``logging.getLogger(__name__)``. A forked worker calls :func:`set_role` once; the
role lives in one module-level object read by the handler's filter, so nothing
else needs to know which process it is in. No threads (we fork), no queue
handlers: stderr goes to the terminal or to journald as it is.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO, TypeAlias

ExcInfo: TypeAlias = (
    bool | BaseException | tuple[type[BaseException], BaseException, TracebackType | None]
)

__all__ = [
    "FORMAT",
    "LOG_FORMATS",
    "JsonFormatter",
    "RateLimitedLog",
    "get_role",
    "set_role",
    "setup_logging",
]

FORMAT = "%(asctime)s %(process)d %(role)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

# LogRecord attributes that are not extra=... fields
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "role"}
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: object) -> object:
    """value as JSON has it: scalars as they are, anything else as its str()."""
    return value if isinstance(value, _PLAIN) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        role = str(getattr(record, "role", "main"))
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "pid": record.process,
            "role": role,
        }
        kind, _, number = role.partition(" ")
        if kind == "worker" and number.isdigit():
            out["role"], out["worker"] = "worker", int(number)
        out["logger"] = record.name
        out["event"] = str(record.msg)
        if isinstance(record.args, tuple) and record.args:
            out["args"] = [_plain(a) for a in record.args]
        elif isinstance(record.args, dict) and record.args:
            out["args"] = {str(k): _plain(v) for k, v in record.args.items()}
        try:
            out["message"] = record.getMessage()
        except (TypeError, ValueError) as e:  # a bad format string: keep the line valid
            out["message"] = f"{record.msg!s} (formatting failed: {e})"
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = _plain(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("spoa_mp").critical("uncaught exception", exc_info=(kind, value, tb))


class _RoleFilter(logging.Filter):
    """Adds ``record.role`` (the process's role) to every record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.role = "main"

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


_ROLE = _RoleFilter()  # the module-level value set_role() changes
_handler: logging.Handler | None = None  # the handler setup_logging() installed


def set_role(role: str) -> None:
    """Name this process in every later log line ("supervisor", "worker 3")."""
    _ROLE.role = role


def get_role() -> str:
    return _ROLE.role


def setup_logging(debug: bool, stream: TextIO | None = None, log_format: str = "text") -> None:
    """Log to stderr (or `stream`) at INFO, or DEBUG when `debug`, as text or json.

    Calling it again replaces the handler it installed before (and only that one).
    """
    global _handler  # noqa: PLW0603 - the one handler this module owns
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        sys.excepthook = _log_uncaught
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
        sys.excepthook = sys.__excepthook__
        logging.captureWarnings(False)
    handler.addFilter(_ROLE)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    _handler = handler


class RateLimitedLog:
    """Logs the first message of a kind per `interval` seconds and counts the rest.

    For storms (HAProxy reconnecting hundreds of times a second after a refused
    handshake, accept() failing on EMFILE)::

        noisy = RateLimitedLog(log, interval=10.0)
        noisy.warning("accept", "accept failed: %s", e)

    Messages are grouped by `key`, so keys should name a kind of event, not a
    peer. The next message of a key logged after a quiet period ends with
    ``(N similar messages suppressed)``. At most `max_keys` keys are tracked;
    past that, new keys share one limit, so a flood of distinct keys stays
    bounded too. `clock` is for tests.
    """

    _OVERFLOW = object()

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [time of the last message logged, messages suppressed since]
        self._state: dict[object, list[float | int]] = {}

    def log(self, level: int, key: object, msg: str, *args: object) -> bool:
        """Log unless rate-limited; True if the message was logged."""
        return self._log(level, key, msg, args, exc_info=False)

    def _log(
        self, level: int, key: object, msg: str, args: tuple[object, ...], *, exc_info: ExcInfo
    ) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        state = self._state.get(key)
        if state is None and len(self._state) >= self.max_keys:
            self._prune(now)
            if len(self._state) >= self.max_keys:
                key = self._OVERFLOW
                state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        self._state[key] = [now, 0]
        if suppressed:
            if args:
                msg += " (%d similar messages suppressed)"
                args = (*args, suppressed)
            else:  # no %-formatting will happen: a literal '%' in msg must stay as it is
                msg += f" ({suppressed} similar messages suppressed)"
        # stacklevel: the record names our caller's caller (the code that logged)
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True

    def _prune(self, now: float) -> None:
        # Keys quiet for a whole interval: their pending count is dropped with them.
        for key in [k for k, (t, _) in self._state.items() if now - t >= self.interval]:
            del self._state[key]

    def debug(self, key: object, msg: str, *args: object) -> bool:
        return self._log(logging.DEBUG, key, msg, args, exc_info=False)

    def info(self, key: object, msg: str, *args: object) -> bool:
        return self._log(logging.INFO, key, msg, args, exc_info=False)

    def warning(self, key: object, msg: str, *args: object) -> bool:
        return self._log(logging.WARNING, key, msg, args, exc_info=False)

    def error(self, key: object, msg: str, *args: object, exc_info: ExcInfo = False) -> bool:
        """exc_info: as logging's (an exception caught elsewhere, e.g. a task's)."""
        return self._log(logging.ERROR, key, msg, args, exc_info=exc_info)

    def exception(self, key: object, msg: str, *args: object) -> bool:
        """error() with the current exception's traceback (call it from an except block)."""
        return self._log(logging.ERROR, key, msg, args, exc_info=True)

"""Server configuration: defaults, an optional TOML file, command-line overrides.

Precedence, lowest first: the defaults of :class:`ServerConfig`, the TOML file
(``--config FILE``), then the flags given on the command line. Only flags that
were actually given override the file. The file's keys are the long option
names without the dashes::

    # /etc/spoa-mp.toml
    host = "127.0.0.1"
    port = 12345
    workers = 8
    max-frame-size = 16380
    reputation-file = "reputation.txt"   # relative to this file's directory
    default-score = 100
    pipelining = false
    worker-timeout = 30                  # an integer is fine for seconds

Rules (decided here, documented in ``--help``):

* ``unix`` wins: when set, the agent listens on that Unix socket and ``host`` and
  ``port`` are ignored, wherever they came from (a shared file may name a port
  while one instance is started with ``--unix``).
* Relative paths in the file (``unix``, ``reputation-file``) are relative to the
  file's own directory; on the command line, to the current directory. Both are
  stored absolute, so a reload after a ``chdir`` still means the same files.
* ``port = 0`` asks the kernel for any free port (tests use it).
* Every mistake raises :class:`ConfigError` with a one-line message naming where
  the bad value came from: ``FILE: 'port' ...`` or ``--port ...``.

:func:`reload_config` re-reads the file of a running configuration and applies
the same command-line values again, which is what SIGHUP needs.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time

from spoa_mp.config_checks import CHECKS, MAX_WORKERS, RELOAD_MODES
from spoa_mp.limits import DEFAULT_FRAME_SIZE, MAX_FRAME_SIZE, MIN_FRAME_SIZE

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_WORKERS",
    "MIN_FRAME_SIZE",
    "RELOAD_MODES",
    "TOML_KEYS",
    "ConfigError",
    "ServerConfig",
    "default_workers",
    "file_value",
    "load_config",
    "reload_config",
]


def default_workers() -> int:
    """The CPUs this process may run on (affinity, e.g. taskset or a cpuset), capped."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


class ConfigError(ValueError):
    """A bad configuration value or file; ``str()`` is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the supervisor and its workers need to know, immutable.

    Build it with :func:`load_config` (which validates); constructing it directly
    (tests, embedding) skips validation.
    """

    host: str = "127.0.0.1"
    port: int = 12345
    unix: str | None = None  # listen on this Unix socket instead of TCP (host/port ignored)
    backlog: int = 1024
    workers: int = field(default_factory=default_workers)
    app: str | None = None  # "module:attr"; None = the built-in IP-reputation agent
    reputation_file: str | None = None
    default_score: int = 100  # for addresses the reputation file does not list
    blocklist: tuple[tuple[str, int], ...] = ()  # (file, score) pairs, spoa_mp.blocklist
    max_frame_size: int = DEFAULT_FRAME_SIZE  # MIN_FRAME_SIZE..MAX_FRAME_SIZE
    pipelining: bool = True
    fragmentation: bool = True
    max_in_flight: int = 256  # messages in flight per connection before reads pause
    max_pending: int = 4096  # NOTIFYs awaiting a handler, per worker, before reads pause
    handler_timeout: float | None = None  # seconds; for handlers registered without timeout=
    blocking_threads: int = 16  # threads per worker for blocking=True handlers
    hello_timeout: float = 10.0  # seconds from accept to a complete HELLO, else closed
    max_connections: int = 4096  # open connections per worker; more are closed at accept
    worker_timeout: float = 30.0  # seconds without a heartbeat before a worker is killed
    graceful_timeout: float = 30.0  # seconds workers get to finish when stopping
    reload_mode: str = "handover"  # SIGHUP: handover | rolling | drain (see supervisor.py)
    user: str | None = None  # switch to this user (and its group) once the socket is bound
    group: str | None = None
    pidfile: str | None = None
    max_requests: int = 0  # recycle a worker after this many messages (0 = never)
    max_requests_jitter: int = 0  # plus a random 0..N, so workers do not recycle together
    max_rss: int = 0  # recycle a worker whose resident memory exceeds this many MiB (0 = never)
    metrics: str | None = None  # HOST:PORT serving Prometheus /metrics from the supervisor
    tls_cert: str | None = None  # PEM certificate (chain): the listeners speak TLS (tls.py)
    tls_key: str | None = None  # its PEM private key
    tls_client_ca: str | None = None  # PEM CA(s): clients must present a certificate it signed
    allow: tuple[str, ...] = ()  # CIDRs TCP peers must be in (access.py); () = everyone
    debug: bool = False
    log_format: str = "text"  # text | json (spoa_mp.logs)
    loop: str = "auto"  # the workers' event loop: auto | asyncio | uvloop (spoa_mp.event_loop)
    config_file: str | None = None  # absolute path of the TOML file read, if any
    # The explicitly given command-line values (already normalised), kept so that a
    # reload re-applies them over the re-read file. Not part of equality.
    cli_values: tuple[tuple[str, object], ...] = field(default=(), compare=False, repr=False)

    def listen_description(self) -> str:
        """``127.0.0.1:12345``, ``[::1]:12345`` or ``unix:/run/spoa-mp.sock``."""
        if self.unix:
            return f"unix:{self.unix}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# --------------------------------------------------------------- key tables

# Every settable key (field name) and the Python type its value must have.
_KINDS: dict[str, type] = {
    "host": str,
    "port": int,
    "unix": str,
    "backlog": int,
    "workers": int,
    "app": str,
    "reputation_file": str,
    "default_score": int,
    "blocklist": tuple,
    "max_frame_size": int,
    "pipelining": bool,
    "fragmentation": bool,
    "max_in_flight": int,
    "max_pending": int,
    "handler_timeout": float,
    "blocking_threads": int,
    "hello_timeout": float,
    "max_connections": int,
    "worker_timeout": float,
    "graceful_timeout": float,
    "reload_mode": str,
    "user": str,
    "group": str,
    "pidfile": str,
    "max_requests": int,
    "max_requests_jitter": int,
    "max_rss": int,
    "metrics": str,
    "tls_cert": str,
    "tls_key": str,
    "tls_client_ca": str,
    "allow": tuple,
    "debug": bool,
    "log_format": str,
    "loop": str,
}
_TLS_KEYS = ("tls_cert", "tls_key", "tls_client_ca")  # checked together (tls.py)
_BUILT_IN_AGENT_KEYS = ("reputation_file", "default_score", "blocklist")
# may be None (not from TOML)
_OPTIONAL = frozenset(
    {"unix", "app", "reputation_file", "user", "group", "pidfile", "metrics", "handler_timeout"}
) | set(_TLS_KEYS)
_PATH_KEYS = frozenset({"unix", "reputation_file", "pidfile", *_TLS_KEYS})
TOML_KEYS: tuple[str, ...] = tuple(k.replace("_", "-") for k in _KINDS)

_EXPECTED = {
    int: "an integer", float: "a number", str: "a string", bool: "a boolean",
    tuple: "a list of 'FILE[:SCORE]' strings",
}  # fmt: skip
# Python type of a parsed TOML value -> its TOML name, for "got ..." messages.
_TOML_TYPE_NAMES: dict[type, str] = {
    str: "string", int: "integer", float: "float", bool: "boolean", list: "array",
    dict: "table", datetime: "datetime", date: "date", time: "time",
}  # fmt: skip


def _type_name(value: object) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


def _coerce(name: str, value: object, where: str) -> object:
    """value checked against the key's type (an integer is fine where seconds go)."""
    kind = _KINDS[name]
    if value is None and name in _OPTIONAL:
        return None
    if kind is float and type(value) is int:
        return float(value)
    if kind is tuple:
        return _string_list(name, value, where)
    if type(value) is not kind:  # not isinstance: True is no integer here
        raise ConfigError(f"{where} must be {_EXPECTED[kind]}, got {_type_name(value)}")
    return value


def _string_list(name: str, value: object, where: str) -> tuple[object, ...]:
    """Strings (a list, or one), each parsed: `blocklist` 'FILE[:SCORE]' into
    (FILE, SCORE), `allow` a CIDR normalised ('10.1.2.3' -> '10.1.2.3/32')."""
    from spoa_mp.access import normalized_network  # noqa: PLC0415 - only when used
    from spoa_mp.blocklist import parse_blocklist_arg  # noqa: PLC0415 - only when used

    parse: Callable[[str], object] = normalized_network if name == "allow" else parse_blocklist_arg
    expected = "a list of CIDR strings" if name == "allow" else _EXPECTED[tuple]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where} must be {expected}, got {_type_name(value)}")
    out: list[object] = []
    for item in items:
        if isinstance(item, tuple):  # already parsed (a reload re-applies the flags)
            out.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigError(f"{where} must be {expected}, got {_type_name(item)}")
        try:
            out.append(parse(item))
        except ValueError as e:
            raise ConfigError(f"{where} {e}") from None
    return tuple(out)


# ------------------------------------------------------------------ loading

_TOML_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)


def _read_toml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POSITION.match(str(e))
        if m:
            raise ConfigError(f"{path}:{m[2]}:{m[3]}: {m[1]}") from None
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start}): {e.reason}") from None


def _unknown_key(path: str, key: str) -> ConfigError:
    hint = difflib.get_close_matches(key.replace("_", "-"), TOML_KEYS, n=1)
    suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(f"{path}: unknown key {key!r}{suffix}")


def _resolved(value: object, absolute: Callable[[str], str]) -> object:
    assert isinstance(value, tuple)
    return tuple((absolute(path) if path else path, score) for path, score in value)


def file_value(name: str, raw: object, where: str, base: str) -> object:
    """A value of the TOML file as load_config takes it: type-checked, paths
    relative to `base` (the file's directory) made absolute. ConfigError."""
    value = _coerce(name, raw, where)
    if name in _PATH_KEYS and isinstance(value, str) and value:
        return os.path.normpath(os.path.join(base, value))
    if name == "blocklist":
        return _resolved(value, lambda p: os.path.normpath(os.path.join(base, p)))
    return value


def load_config(
    cli_values: Mapping[str, object], config_file: str | None = None, *, together: bool = True
) -> ServerConfig:
    """Defaults, then the TOML file (if any), then `cli_values`; validated.

    `cli_values` maps field names (``max_frame_size``) to the values given on the
    command line, and holds only those actually given. `together=False` skips
    checking the TLS keys together (check-config does). Raises ConfigError.
    """
    merged: dict[str, object] = {}
    origin: dict[str, str] = {}  # key -> how to name it in an error message
    config_path: str | None = None

    if config_file is not None:
        config_path = os.path.abspath(config_file)
        base = os.path.dirname(config_path)
        for key, raw in _read_toml(config_file).items():
            name = key.replace("-", "_")
            if "_" in key or name not in _KINDS:
                if isinstance(raw, dict):  # a [table]: ours are all top-level keys
                    raise ConfigError(
                        f"{config_file}: unknown table [{key}]: settings are top-level keys"
                    )
                raise _unknown_key(config_file, key)
            where = f"{config_file}: {key!r}"
            merged[name] = file_value(name, raw, where, base)
            origin[name] = where

    given: dict[str, object] = {}
    for name, raw in cli_values.items():
        if name not in _KINDS:
            raise ConfigError(f"unknown option {name!r}")
        where = "--" + name.replace("_", "-")
        value = _coerce(name, raw, where)
        if name in _PATH_KEYS and isinstance(value, str) and value:
            value = os.path.abspath(value)
        elif name == "blocklist":
            value = _resolved(value, os.path.abspath)
        merged[name] = given[name] = value
        origin[name] = where

    for name, value in merged.items():
        check = CHECKS.get(name)
        reason = check(value) if check else None
        if reason:
            raise ConfigError(f"{origin[name]} {reason}")
    if merged.get("app"):  # the built-in agent's own settings would be silently ignored
        for name in _BUILT_IN_AGENT_KEYS:
            if name in merged and merged[name] not in ((), None):
                raise ConfigError(
                    f"{origin[name]} is read by the built-in IP-reputation agent only, "
                    f"not by --app {merged['app']}"
                )
    if together and any(merged.get(k) for k in _TLS_KEYS):
        from spoa_mp.tls import settings_problem  # noqa: PLC0415 - loads ssl

        if problem := settings_problem(*(merged.get(k) for k in _TLS_KEYS)):
            raise ConfigError(f"{origin[problem[0]]} {problem[1]}")

    return ServerConfig(
        **merged,  # type: ignore[arg-type]  # each value checked against _KINDS above
        config_file=config_path,
        cli_values=tuple(given.items()),
    )


def reload_config(config: ServerConfig) -> ServerConfig:
    """`config` built again: its file re-read, its command-line values re-applied."""
    return load_config(dict(config.cli_values), config.config_file)

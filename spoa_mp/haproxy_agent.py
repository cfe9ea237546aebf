"""What the HAProxy configuration says about the agent: the address of its
``server`` line, the SPOE messages it answers (the built-in agent's, or those
an --app agent registers, loaded as the server would) and the processing
timeout its handlers' deadlines need."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from spoa_mp.agent import Registered
from spoa_mp.config import ConfigError, ServerConfig
from spoa_mp.loader import build_agent

DEFAULT_MESSAGE = "check-client-ip"  # spoa_mp.apps.iprep.MESSAGE (not imported: no table load)
DEFAULT_PROCESSING_TIMEOUT = "100ms"
WORD = re.compile(r"[^\s#'\"\\]+\Z")  # one HAProxy config word: no space, quote, comment


def agent_server_address(config: ServerConfig) -> tuple[str, str | None]:
    """The address of the agents' ``server`` line, and a comment when it had
    to be chosen (a wildcard listen address)."""
    if config.unix:
        return f"unix@{config.unix}", None
    if config.port == 0:
        raise ConfigError(
            "the agent's port is 0 (any free port): give the port it listens on (-p PORT)"
        )
    host, note = config.host, None
    if host == "0.0.0.0":
        host, note = "127.0.0.1", "the agent listens on 0.0.0.0: use an address of its machine"
    elif host in ("::", "[::]"):
        host, note = "::1", "the agent listens on ::: use an address of its machine"
    host = host.strip("[]")
    if ":" in host:
        return f"[{host}]:{config.port}", note
    return f"{host}:{config.port}", note


def message_names(config: ServerConfig) -> tuple[str, ...]:
    """The SPOE messages the agent answers: check-client-ip for the built-in
    agent, else the names the --app agent registers, in registration order.

    Raises AppLoadError when the app cannot be loaded, ConfigError when it
    has no handlers or a name HAProxy cannot take.
    """
    if not config.app:
        return (DEFAULT_MESSAGE,)
    names = tuple(_app_handlers(config))
    if not names:
        raise ConfigError(
            f"app {config.app!r} registers no message handler (@agent.on_message(NAME))"
        )
    for name in names:
        if not WORD.match(name):
            raise ConfigError(
                f"app {config.app!r}: message name {name!r} cannot be used in HAProxy"
            )
    return names


def _app_handlers(config: ServerConfig) -> Mapping[str, Registered]:
    return build_agent(config).handlers


def handler_deadline(config: ServerConfig) -> float | None:
    """The longest deadline of the agent's handlers (their own timeout, else
    --handler-timeout), in seconds; None when some handler has none."""
    if not config.app:
        return config.handler_timeout
    deadlines = [reg.timeout or config.handler_timeout for reg in _app_handlers(config).values()]
    if not deadlines or None in deadlines:
        return None
    return max(d for d in deadlines if d is not None)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def haproxy_seconds(text: str) -> float:
    """An HAProxy time ("100ms", "1s", "250" = milliseconds) in seconds."""
    digits = text.rstrip("usmhd")
    return int(digits) * _UNITS.get(text[len(digits) :] or "ms", 1e-3)


def processing_timeout(deadline: float | None) -> str:
    """A `timeout processing` above a handler deadline: the fallback ACK sent
    at the deadline must reach HAProxy before it gives up (a quarter more, at
    least 50 ms, for the loop and the network)."""
    if deadline is None:
        return DEFAULT_PROCESSING_TIMEOUT
    return f"{math.ceil(deadline * 1000 + max(50.0, deadline * 250))}ms"

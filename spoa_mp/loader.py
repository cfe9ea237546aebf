"""Loading the user's agent: the --app module, or the built-in IP-reputation
agent. The server and the tools (check-config, haproxy-config) load it the
same way; this module imports neither the worker nor the codec, so the tools
stay light."""

from __future__ import annotations

import os
import sys

from spoa_mp.agent import Agent, load_app
from spoa_mp.config import ServerConfig


def build_agent(config: ServerConfig, reload: bool = False) -> Agent:
    """The user's agent (--app) or the default IP-reputation agent. On a
    reload the --app module (and its submodules) is imported again, so
    changed code takes effect; packages above it are not."""
    if config.app and reload:
        module = config.app.partition(":")[0]
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    if config.app:
        # like gunicorn and uvicorn: --app myapp:agent finds ./myapp.py even when
        # started through the console script (which does not put . on sys.path)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return load_app(config.app)
    from spoa_mp.apps.iprep import make_agent  # noqa: PLC0415 - only when it is the job

    return make_agent(
        config.reputation_file, default_score=config.default_score, blocklists=config.blocklist
    )


def watched_files(config: ServerConfig) -> tuple[str, ...]:
    """The blocklists of the built-in agent: a change reloads (spoa_mp.blocklist).
    (The --reputation-file is read again on SIGHUP only, as before.)"""
    return () if config.app else tuple(path for path, _ in config.blocklist)

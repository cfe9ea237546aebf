"""Starting the server: the listening sockets (systemd's or our own), the
agent, the metrics endpoint, the pidfile and the privilege drop, in that
order; then the Supervisor runs until it is stopped."""

from __future__ import annotations

import logging
import sys

from spoa_mp import systemd
from spoa_mp.access import log_startup
from spoa_mp.agent import AppLoadError
from spoa_mp.config import ServerConfig
from spoa_mp.loader import build_agent
from spoa_mp.metrics_http import MetricsServer
from spoa_mp.process import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    drop_privileges,
    open_listener,
    remove_pidfile,
    set_title,
    write_pidfile,
)
from spoa_mp.supervisor import Supervisor

log = logging.getLogger(__name__)


def serve(config: ServerConfig) -> int:
    """Run the server until it is stopped; returns the exit code."""
    # the title first: setproctitle stops working if the environment changes
    # before its first use (gunicorn #3430), and systemd.py edits it
    set_title("spoa-mp: supervisor")
    notifier = systemd.Notifier.from_environment()
    try:
        inherited = systemd.listen_fds()  # before the user's app can see LISTEN_*
    except ValueError as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        agent = build_agent(config)
    except (AppLoadError, ValueError, OSError) as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    agent.freeze()
    if inherited:
        # socket activation: systemd's socket unit says where we listen
        named = [s.sock for s in inherited if s.name == "spop"]
        listeners = named or [s.sock for s in inherited]
        for sock in listeners:
            systemd.prepare_listener(sock, config.backlog)
        listener = listeners[0]
    else:
        try:
            listener = open_listener(config)
        except OSError as e:
            print(f"spoa-mp: error: cannot listen on {config.listen_description()}: "
                  f"{e.strerror}", file=sys.stderr)  # fmt: skip
            return EXIT_FAILURE
        listeners = [listener]
    metrics_server = None
    supervisor: Supervisor | None = None

    def supervisor_metrics(accept: str) -> tuple[bytes, str]:
        assert supervisor is not None
        return supervisor.render_metrics(accept)

    try:
        if config.metrics:  # bound before dropping privileges (a port below 1024)
            metrics_server = MetricsServer(config.metrics, supervisor_metrics)
            log.info("metrics on http://%s/metrics", metrics_server.listen())
        if config.pidfile:
            write_pidfile(config.pidfile)
        drop_privileges(config.user, config.group, None if inherited else listener, config.pidfile)
    except (OSError, ValueError) as e:
        print(f"spoa-mp: error: {e}", file=sys.stderr)
        listener.close()
        return EXIT_FAILURE
    try:
        supervisor = Supervisor(
            config, agent, listeners, notifier, own_socket_file=not inherited,
            metrics_server=metrics_server,
        )  # fmt: skip
        log_startup(config, supervisor.options.limits, listeners)
        return supervisor.run()
    finally:
        if config.pidfile:
            remove_pidfile(config.pidfile)

"""The serve command's flags: ``spoa-mp [serve] [options]``, parsed into a
ServerConfig (with ``--config FILE``). Its own module so that the tools
(haproxy-config) parse the very same flags without importing the command.

The short flags are those of HAProxy's example agent (``spoa -h -d -p PORT -n N``),
so it can be swapped in. Every flag is optional; a flag given on the command
line overrides the same key of ``--config FILE``, and flags not given leave the
file alone (their argparse default is SUPPRESS). Any mistake is a one-line
ConfigError.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from spoa_mp import __version__
from spoa_mp.config import (
    MAX_FRAME_SIZE,
    MAX_WORKERS,
    MIN_FRAME_SIZE,
    RELOAD_MODES,
    ConfigError,
    ServerConfig,
    load_config,
)
from spoa_mp.event_loop import EVENT_LOOPS
from spoa_mp.logs import LOG_FORMATS

__all__ = ["PROG", "build_parser", "parse_serve_args"]

PROG = "spoa-mp"

_D = ServerConfig()  # the defaults, for the help text

_DESCRIPTION = f"""\
A pre-fork HAProxy SPOE agent: a supervisor forks worker processes that share
one listening socket. By default it serves the built-in IP-reputation agent on
{_D.host}:{_D.port} (loopback only: use --host to accept other machines).
"""

_EPILOG = f"""\
config file (--config FILE, TOML; flags given on the command line win):
  the keys are the long option names without the leading dashes, e.g.
    port = {_D.port}
    workers = 8
    max-frame-size = {_D.max_frame_size}
    reputation-file = "reputation.txt"   # relative to the file's directory
    blocklist = ["firehol_level1.netset", "drop.txt:10"]
    allow = ["10.0.0.0/24"]
    tls-cert = "agent.pem"
    pipelining = false

other commands:
  {PROG} bench --help           load generator and benchmark
  {PROG} check-config --help    validate a config file (and its app, reputation file)
  {PROG} haproxy-config --help  print the HAProxy configuration for these options
  {PROG} send --help            send one message to an agent and print its ACK
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ConfigErrors, not usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The serve command's parser; every option defaults to "not given"."""
    p = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # "--max" style abbreviations break when options are added
    )
    add = p.add_argument
    add("-V", "--version", action="version", version=f"{PROG} {__version__}")
    add("-d", "--debug", action="store_true", help="log every frame (very verbose)")
    add("--config", metavar="FILE", dest="config_file", help="read settings from this TOML file")
    add("--log-format", choices=LOG_FORMATS, help="text (default) or json: one object a line")

    listen = p.add_argument_group("listening")
    add = listen.add_argument
    add(
        "-p",
        "--port",
        type=_int,
        metavar="PORT",
        help=f"TCP port (default {_D.port}; 0 = any free port)",
    )
    add(
        "--host",
        metavar="HOST",
        help=f"address or name to listen on (default {_D.host}: loopback only; "
        "0.0.0.0 or :: to accept connections from other machines)",
    )
    add(
        "--unix",
        metavar="PATH",
        help="listen on this Unix socket instead of TCP (--host and --port are then ignored)",
    )
    add(
        "--backlog",
        type=_int,
        metavar="N",
        help=f"listen queue length (default {_D.backlog}; HAProxy opens connections in "
        "bursts, which the example agent's backlog of 10 drops; the kernel caps it at "
        "net.core.somaxconn)",
    )

    procs = p.add_argument_group("processes")
    add = procs.add_argument
    add(
        "-n",
        "--workers",
        type=_int,
        metavar="N",
        help=f"worker processes, 1..{MAX_WORKERS} (default: the CPUs this process may use, "
        f"{_D.workers} here)",
    )
    add(
        "--worker-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"kill a worker that sent no heartbeat for this long (default {_D.worker_timeout:g})",
    )
    add(
        "--graceful-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"time workers get to finish their work when stopping (default "
        f"{_D.graceful_timeout:g}; 0 = none)",
    )
    add(
        "--loop",
        choices=EVENT_LOOPS,
        help="the workers' event loop: auto (default) takes uvloop when it is installed "
        "(pip install 'spoa-mp[uvloop]'), else asyncio's own",
    )
    add(
        "--reload-mode",
        choices=RELOAD_MODES,
        help="what SIGHUP does once the new workers are ready: handover (default) moves "
        "every HAProxy connection to them, between two frames, losing nothing; rolling "
        "does it one worker at a time; drain lets the old workers finish and close "
        "their connections within --graceful-timeout",
    )
    add(
        "--max-requests",
        type=_int,
        metavar="N",
        help="replace a worker after it handled N messages, handing its connections to "
        "its successor (default 0: never)",
    )
    add(
        "--max-requests-jitter",
        type=_int,
        metavar="N",
        help="add a random 0..N to --max-requests per worker, so they do not all go at once",
    )
    add(
        "--max-rss",
        type=_int,
        metavar="MIB",
        help="replace a worker whose resident memory exceeds MIB (default 0: never)",
    )
    add("--user", metavar="USER", help="run as USER once the socket is bound (needs root)")
    add("--group", metavar="GROUP", help="run as GROUP (default: USER's primary group)")
    add("--pidfile", metavar="FILE", help="write the supervisor's pid to FILE")
    add(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (all workers summed) at http://HOST:PORT/metrics",
    )

    sec = p.add_argument_group("TLS and access")
    add = sec.add_argument
    add(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (chain): every listener speaks TLS 1.2+ (needs --tls-key); "
        "re-read on SIGHUP",
    )
    add("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    add(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA certificate(s): clients must present a certificate signed by one "
        "(mutual TLS: HAProxy's 'crt' on the agents' server line)",
    )
    add(
        "--allow",
        action="append",
        metavar="CIDR",
        help="accept TCP connections only from this network (repeatable; e.g. "
        "10.0.0.0/24, 2001:db8::/48); others are closed at accept. Unix-socket "
        "clients are always accepted",
    )

    job = p.add_argument_group("the job")
    add = job.add_argument
    add(
        "--app",
        metavar="MODULE:ATTR",
        help="serve this Agent (or factory returning one) instead of the built-in "
        "IP-reputation agent, e.g. myapp.handlers:agent",
    )
    add(
        "--reputation-file",
        metavar="FILE",
        help="'CIDR score' lines for the built-in agent (longest prefix wins); "
        "without one, every address gets a random score 0..100 like HAProxy's "
        "example agent",
    )
    add(
        "--blocklist",
        action="append",
        metavar="FILE[:SCORE]",
        help="one address or CIDR a line (FireHOL, Spamhaus DROP; '#' and ';' comments), "
        "scored SCORE (default 0); repeatable; a changed file is picked up by itself",
    )
    add(
        "--default-score",
        type=_int,
        metavar="N",
        help=f"score, 0..100, of addresses the reputation file does not list "
        f"(default {_D.default_score})",
    )

    proto = p.add_argument_group("protocol")
    add = proto.add_argument
    add(
        "--max-frame-size",
        type=_int,
        metavar="N",
        help=f"largest frame accepted, {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE} (default "
        f"{_D.max_frame_size}; the smaller of this and HAProxy's is used)",
    )
    add(
        "--pipelining",
        action=argparse.BooleanOptionalAction,
        help="offer pipelining to HAProxy (default: on)",
    )
    add(
        "--fragmentation",
        action=argparse.BooleanOptionalAction,
        help="accept fragmented NOTIFY frames (default: on)",
    )
    add(
        "--max-in-flight",
        type=_int,
        metavar="N",
        help=f"messages in flight on one connection before the worker stops reading "
        f"it (default {_D.max_in_flight})",
    )
    add(
        "--max-pending",
        type=_int,
        metavar="N",
        help=f"NOTIFYs awaiting a handler in one worker before it stops reading "
        f"(default {_D.max_pending})",
    )
    add(
        "--handler-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="deadline for handlers registered without timeout=: past it the stream is "
        "ACKed with the handler's on_timeout actions (default: none)",
    )
    add(
        "--blocking-threads",
        type=_int,
        metavar="N",
        help=f"threads per worker for blocking=True handlers (default {_D.blocking_threads})",
    )
    add(
        "--hello-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"close a connection that sent no HELLO for this long (default {_D.hello_timeout:g})",
    )
    add(
        "--max-connections",
        type=_int,
        metavar="N",
        help=f"open connections per worker; more are closed at accept (default "
        f"{_D.max_connections})",
    )
    return p


def parse_serve_args(argv: Sequence[str]) -> ServerConfig:
    """The ServerConfig for serve's command line (and its --config file).

    Raises ConfigError (one line) on any mistake; SystemExit(0) for --help/--version.
    """
    values = vars(build_parser().parse_args(list(argv)))
    config_file = values.pop("config_file", None)
    return load_config(values, config_file)

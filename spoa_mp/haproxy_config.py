"""``spoa-mp haproxy-config``: the HAProxy configuration for the agent as configured.

It takes the serve command's flags and ``--config FILE`` (parsed by
:func:`spoa_mp.flags.parse_serve_args`, so the result is the very ServerConfig
the server would run with) plus a few options of its own, and prints two
files: ``haproxy.cfg`` (a frontend with the SPOE filter and an example deny
rule, the application backend, the agents' backend) and the SPOE file
``spoe-<engine>.conf``, or writes them to ``--output-dir``::

    spoa-mp haproxy-config -p 12345 --max-frame-size 4096
    spoa-mp haproxy-config --config /etc/spoa-mp.toml --haproxy 3.x
    spoa-mp haproxy-config --unix /run/spoa-mp.sock --output-dir /etc/haproxy

What follows the agent's settings (spop.md §9):

* the agents' server line: ``host:port`` (``[v6]:port``; a wildcard listen
  address becomes the loopback address), or ``unix@/path`` for ``--unix``;
* ``max-frame-size`` in the SPOE file when the agent's is below HAProxy's
  default (16380; the smaller one is used anyway, but HAProxy 2.6 sizes the
  first NOTIFY with its configured value, §4.3);
* ``no option pipelining`` with ``--no-pipelining``;
* with ``--tls-cert``: ``check-ssl ssl verify required ca-file FILE`` on the
  server line, and ``crt FILE`` (HAProxy's client certificate) with
  ``--tls-client-ca``; the files are ``--ca-file`` and ``--crt``;
* the messages: ``check-client-ip`` with its ``args`` for the built-in agent,
  or the message names an ``--app`` agent registers (imported as the server
  would, :func:`spoa_mp.loader.build_agent`), each with a commented
  ``args`` line to fill in.

HAProxy 2.6 (and up to 3.0) and 3.1+ differ in two places: the agents'
backend is ``mode tcp`` with ``timeout server`` above the SPOE ``timeout
idle`` for 2.6 and ``mode spop`` for 3.x, and the SPOE file has ``timeout
hello`` and ``timeout idle`` only for 2.6 (3.x ignores them).

:func:`render` is the whole job as a pure function (tests call it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from spoa_mp.agent import AppLoadError
from spoa_mp.config import ConfigError, ServerConfig
from spoa_mp.flags import parse_serve_args
from spoa_mp.haproxy_agent import (
    DEFAULT_MESSAGE,
    DEFAULT_PROCESSING_TIMEOUT,
    WORD,
    agent_server_address,
    handler_deadline,
    haproxy_seconds,
    message_names,
    processing_timeout,
)
from spoa_mp.limits import DEFAULT_FRAME_SIZE
from spoa_mp.reputation import MAX_SCORE  # scores are 0..100

__all__ = [
    "DEFAULT_MESSAGE",
    "EVENTS",
    "HAPROXY_DEFAULT_MAX_FRAME_SIZE",
    "HAPROXY_VERSIONS",
    "Options",
    "agent_server_address",
    "build_parser",
    "handler_deadline",
    "haproxy_seconds",
    "main",
    "message_names",
    "processing_timeout",
    "render",
    "write_files",
]

PROG = "spoa-mp haproxy-config"
EXIT_USAGE = 2

HAPROXY_VERSIONS = ("2.6", "3.x")
EVENTS = ("on-client-session", "on-frontend-http-request")
# HAProxy's SPOE max-frame-size default: tune.bufsize (16384) - 4 (spop.md §4.3).
HAPROXY_DEFAULT_MAX_FRAME_SIZE = DEFAULT_FRAME_SIZE
# Where the printed haproxy.cfg says the SPOE file is, when --output-dir is not given.
DEFAULT_SPOE_DIR = "/etc/haproxy"

# Timeouts of spop.md §9.5.
TIMEOUT_HELLO = "2s"
TIMEOUT_IDLE = "2m"
BACKEND_TIMEOUT_CONNECT = "5s"  # above "timeout hello"
BACKEND_TIMEOUT_SERVER = "3m"  # above "timeout idle"
CHECK_INTER = "5s"
_PAD = " " * 12  # before a trailing comment

_VAR_PREFIX = re.compile(r"[A-Za-z0-9._]+\Z")  # HAProxy's variable name characters
_ENGINE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_TIMEOUT = re.compile(r"[0-9]+(?:us|ms|s|m|h|d)?\Z")
DEFAULT_CA_FILE = "/etc/haproxy/spoa-ca.pem"
DEFAULT_CRT = "/etc/haproxy/spoa-client.pem"


@dataclass(frozen=True, slots=True)
class Options:
    """haproxy-config's own settings (everything else comes from the ServerConfig)."""

    haproxy: str = "2.6"  # "2.6" (HAProxy 2.6..3.0) or "3.x" (3.1 and later)
    engine: str = "iprep"  # SPOE engine name: the [scope] of the SPOE file
    var_prefix: str = "iprep"  # option var-prefix: sess.<prefix>.ip_score
    frontend_bind: str = "127.0.0.1:8080"
    threshold: int = 20  # deny scores below this
    event: str = "on-client-session"
    arg_name: str | None = None  # None: "args src"; "ip": "args ip=src"
    upstream: str = "127.0.0.1:8000"  # the application server behind the frontend
    # SPOE "timeout processing"; None: above the handlers' longest deadline (100ms without)
    processing_timeout: str | None = None
    output_dir: str | None = None  # where the files go (the cfg names the SPOE file there)
    messages: tuple[str, ...] | None = None  # None: from the agent (build_agent for --app)
    # with --tls-cert: the CA HAProxy verifies the agent's certificate with, and
    # (with --tls-client-ca) HAProxy's client certificate + key, one PEM file
    ca_file: str = DEFAULT_CA_FILE
    crt: str = DEFAULT_CRT

    @property
    def spoe_filename(self) -> str:
        return f"spoe-{self.engine}.conf"

    @property
    def spoe_path(self) -> str:
        """The SPOE file's absolute path, as haproxy.cfg names it."""
        directory = os.path.abspath(self.output_dir) if self.output_dir else DEFAULT_SPOE_DIR
        return os.path.join(directory, self.spoe_filename)

    @property
    def backend(self) -> str:
        return f"{self.engine}-agents"

    def validate(self) -> None:
        """ConfigError (one line) for the first bad value."""
        if self.haproxy not in HAPROXY_VERSIONS:
            raise ConfigError(f"--haproxy must be one of {', '.join(HAPROXY_VERSIONS)}")
        if not _ENGINE.match(self.engine):
            raise ConfigError(f"--engine must match [A-Za-z0-9._-]+, got {self.engine!r}")
        if not _VAR_PREFIX.match(self.var_prefix):
            raise ConfigError(f"--var-prefix must match [A-Za-z0-9._]+, got {self.var_prefix!r}")
        if not WORD.match(self.frontend_bind):
            raise ConfigError(f"--frontend-bind must be an address, got {self.frontend_bind!r}")
        if not WORD.match(self.upstream):
            raise ConfigError(f"--upstream must be an address, got {self.upstream!r}")
        for flag, path in (("--ca-file", self.ca_file), ("--crt", self.crt)):
            if not WORD.match(path):
                raise ConfigError(f"{flag} must be a path without blanks or quotes, got {path!r}")
        if not 0 <= self.threshold <= MAX_SCORE:
            raise ConfigError(
                f"--threshold must be between 0 and {MAX_SCORE}, got {self.threshold}"
            )
        if self.event not in EVENTS:
            raise ConfigError(f"--event must be one of {', '.join(EVENTS)}")
        if self.arg_name is not None and not _ARG_NAME.match(self.arg_name):
            raise ConfigError(f"--arg-name must be a name like 'ip', got {self.arg_name!r}")
        if self.processing_timeout is not None and not _TIMEOUT.match(self.processing_timeout):
            raise ConfigError(
                f"--processing-timeout must be an HAProxy time (100ms, 1s), "
                f"got {self.processing_timeout!r}"
            )


# ------------------------------------------------------------------ rendering


def _haproxy_label(options: Options) -> str:
    return "HAProxy 2.6 (to 3.0)" if options.haproxy == "2.6" else "HAProxy 3.1 and later"


def _render_cfg(config: ServerConfig, options: Options, app: bool) -> str:
    address, note = agent_server_address(config)
    v26 = options.haproxy == "2.6"
    prefix = options.var_prefix
    deny = f"http-request deny if {{ var(sess.{prefix}.ip_score) -m int lt {options.threshold} }}"
    lines = [
        f"# haproxy.cfg for {_haproxy_label(options)} and the spoa-mp agent at",
        f"# {config.listen_description()}; generated by `{PROG}`.",
        "# Merge the frontend lines and the two backends into your configuration,",
        "# or run it as it is: haproxy -f haproxy.cfg",
        "",
        "global",
        "    log stdout format raw local0",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 5s",
        "    timeout client  30s",
        "    timeout server  30s",
        "",
        "frontend www",
        f"    bind {options.frontend_bind}",
        f"    # the agent sets {'variables' if app else f'sess.{prefix}.ip_score'}; "
        f"txn.{prefix}.error says why it failed",
        f"    filter spoe engine {options.engine} config {options.spoe_path}",
    ]
    if app:
        lines += [
            "    # an example rule: use the variables your handlers set",
            f"    # {deny}",
        ]
    else:
        lines += [f"    {deny}"]
    lines += [
        "    default_backend app",
        "",
        "backend app",
        "    # your application",
        f"    server app1 {options.upstream}",
        "",
        f"backend {options.backend}",
    ]
    if v26:
        lines += [
            "    mode tcp",
            f"    timeout connect {BACKEND_TIMEOUT_CONNECT}{_PAD}# above the SPOE timeout hello",
            f"    timeout server  {BACKEND_TIMEOUT_SERVER}{_PAD}# above the SPOE timeout idle",
        ]
    else:
        lines += [
            "    mode spop",
            f"    timeout connect {BACKEND_TIMEOUT_CONNECT}",
            f"    timeout server  {BACKEND_TIMEOUT_SERVER}",
        ]
    lines += ["    option spop-check"]
    if note:
        lines += [f"    # {note}"]
    tls, tls_notes = tls_server_options(config, options)
    lines += [f"    # {n}" for n in tls_notes]
    lines += [f"    server agent1 {address} check inter {CHECK_INTER}{tls}", ""]
    return "\n".join(lines)


def tls_server_options(config: ServerConfig, options: Options) -> tuple[str, list[str]]:
    """The server line's TLS words (" check-ssl ssl verify required ca-file ...
    crt ...") and comments on them; ("", []) when the agent speaks in clear."""
    if not config.tls_cert:
        return "", []
    words = f" check-ssl ssl verify required ca-file {options.ca_file}"
    notes = [
        "TLS to the agent (its --tls-cert); health checks over TLS too (check-ssl):",
        "ca-file: the CA that signed the agent's certificate",
    ]
    if config.tls_client_ca:
        words += f" crt {options.crt}"
        notes.append(
            "crt: HAProxy's client certificate and key in one PEM file, signed by the "
            "agent's --tls-client-ca"
        )
    return words, notes


def _render_spoe(
    config: ServerConfig, options: Options, messages: tuple[str, ...], app: bool
) -> str:
    v26 = options.haproxy == "2.6"
    agent_lines = [
        f"    messages {' '.join(messages)}",
        f"    option var-prefix {options.var_prefix}",
        "    option set-on-error error",
    ]
    if app:
        agent_lines += [
            "    # HAProxy keeps only the variables it knows: name those your handlers set",
            "    # register-var-names <name> ...",
        ]
    if config.max_frame_size < HAPROXY_DEFAULT_MAX_FRAME_SIZE:
        agent_lines += [f"    max-frame-size {config.max_frame_size}"]
    if not config.pipelining:
        agent_lines += ["    no option pipelining"]
    if v26:
        agent_lines += [
            f"    timeout hello      {TIMEOUT_HELLO}",
            f"    timeout idle       {TIMEOUT_IDLE}",
        ]
    agent_lines += [
        f"    timeout processing {options.processing_timeout}",
        f"    use-backend {options.backend}",
        "    log global",
    ]
    lines = [
        f"# SPOE file of engine {options.engine!r} for {_haproxy_label(options)},",
        f"# generated by `{PROG}`; haproxy.cfg names it in its filter line.",
        f"[{options.engine}]",
        f"spoe-agent {options.engine}-agent",
        *agent_lines,
    ]
    sample = f"{options.arg_name}=src" if options.arg_name else "src"
    for name in messages:
        lines += ["", f"spoe-message {name}"]
        if app:
            lines += [f"    # args {sample} ...    <- fill in: the arguments the handler reads"]
        else:
            lines += [f"    args {sample}"]
        lines += [f"    event {options.event}"]
    lines += [""]
    return "\n".join(lines)


def render(config: ServerConfig, options: Options | None = None) -> dict[str, str]:
    """``{"haproxy.cfg": text, "spoe-<engine>.conf": text}`` for `config`.

    Raises ConfigError for bad options (or an agent port of 0), AppLoadError
    when an --app agent cannot be imported.
    """
    options = options or Options()
    options.validate()
    app = bool(config.app)
    messages = options.messages if options.messages is not None else message_names(config)
    if not messages:
        raise ConfigError("no SPOE message to send")
    # explicit messages: the app is not imported, only --handler-timeout is known
    deadline = handler_deadline(config) if options.messages is None else config.handler_timeout
    if options.processing_timeout is None:
        options = replace(options, processing_timeout=processing_timeout(deadline))
    elif deadline is not None and haproxy_seconds(options.processing_timeout) <= deadline:
        raise ConfigError(
            f"--processing-timeout {options.processing_timeout} is not above the handlers' "
            f"deadline of {deadline:g} s: HAProxy would give up before the fallback ACK"
        )
    return {
        "haproxy.cfg": _render_cfg(config, options, app),
        options.spoe_filename: _render_spoe(config, options, tuple(messages), app),
    }


def write_files(files: dict[str, str], directory: str | os.PathLike[str]) -> list[Path]:
    """Write `files` (name -> text) into `directory` (created if needed)."""
    out = Path(directory).absolute()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


def format_stdout(files: dict[str, str], options: Options) -> str:
    """Both files, each under a comment header naming where it goes."""
    directory = os.path.dirname(options.spoe_path)
    return "\n".join(
        f"# {'=' * 16} {os.path.join(directory, name)} {'=' * 16}\n{text}"
        for name, text in files.items()
    )


# ------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """haproxy-config's own options; the rest of the command line is serve's."""
    d = Options()
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [serve options...] [options]",
        description="Print the HAProxy configuration (haproxy.cfg and the SPOE file) "
        "for spoa-mp started with the same serve options (-p, --host, --unix, "
        "--max-frame-size, --no-pipelining, --app, --config FILE...).",
        epilog="Every option of the serve command is accepted too (spoa-mp --help).",
        allow_abbrev=False,
    )
    add = p.add_argument
    add(
        "--haproxy",
        choices=HAPROXY_VERSIONS,
        default=d.haproxy,
        help="2.6: HAProxy 2.6 to 3.0 (mode tcp, timeout hello/idle); "
        "3.x: HAProxy 3.1 and later (mode spop) (default %(default)s)",
    )
    add("--engine", default=d.engine, help="SPOE engine name (default %(default)s)")
    add(
        "--var-prefix",
        default=d.var_prefix,
        help="SPOE option var-prefix: the agent's variables are sess.PREFIX.NAME "
        "(default %(default)s)",
    )
    add(
        "--frontend-bind",
        default=d.frontend_bind,
        metavar="ADDR:PORT",
        help="the example frontend's bind address (default %(default)s)",
    )
    add(
        "--upstream",
        default=d.upstream,
        metavar="ADDR:PORT",
        help="the application server behind the frontend (default %(default)s)",
    )
    add(
        "--threshold",
        type=int,
        default=d.threshold,
        metavar="N",
        help="deny requests whose ip_score is below N (default %(default)s)",
    )
    add(
        "--event",
        choices=EVENTS,
        default=d.event,
        help="when HAProxy sends the message (default %(default)s)",
    )
    add(
        "--arg-name",
        default=None,
        metavar="NAME",
        help="send the client address as a named argument (args NAME=src) "
        "instead of a positional one (args src)",
    )
    add(
        "--processing-timeout",
        default=None,
        metavar="TIME",
        help="SPOE timeout processing (default: above the handlers' longest deadline, "
        f"--handler-timeout or timeout=; {DEFAULT_PROCESSING_TIMEOUT} without one)",
    )
    add(
        "--ca-file",
        default=d.ca_file,
        metavar="FILE",
        help="with --tls-cert: the CA file HAProxy verifies the agent's certificate "
        "with (default %(default)s)",
    )
    add(
        "--crt",
        default=d.crt,
        metavar="FILE",
        help="with --tls-client-ca: HAProxy's client certificate and key, one PEM file "
        "(default %(default)s)",
    )
    add(
        "--output-dir",
        metavar="DIR",
        help="write haproxy.cfg and spoe-ENGINE.conf into DIR (the cfg names the "
        "SPOE file by its absolute path) instead of printing them",
    )
    return p


def main(argv: Sequence[str]) -> int:
    """``spoa-mp haproxy-config ...``: 0 done, 2 bad options or app."""
    try:
        args, rest = build_parser().parse_known_args(list(argv))
        config = parse_serve_args(rest)
        options = Options(
            haproxy=args.haproxy,
            engine=args.engine,
            var_prefix=args.var_prefix,
            frontend_bind=args.frontend_bind,
            threshold=args.threshold,
            event=args.event,
            arg_name=args.arg_name,
            upstream=args.upstream,
            processing_timeout=args.processing_timeout,
            output_dir=args.output_dir,
            ca_file=os.path.abspath(args.ca_file),
            crt=os.path.abspath(args.crt),
        )
        files = render(config, options)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except (ConfigError, AppLoadError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    if options.output_dir is None:
        sys.stdout.write(format_stdout(files, options))
        return 0
    try:
        written = write_files(files, options.output_dir)
    except OSError as e:
        print(f"{PROG}: error: {options.output_dir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(f"wrote {path}")
    print(f"check it with: haproxy -c -f {written[0]}")
    return 0

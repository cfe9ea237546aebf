"""The ``spoa-mp`` command: ``spoa-mp [serve] [options]``, ``spoa-mp bench ...``,
``spoa-mp check-config ...``, ``spoa-mp haproxy-config ...`` or ``spoa-mp send ...``.

The serve flags are in flags.py. Any bad flag or config value ends the
process with exactly one line on stderr, ``spoa-mp: error: ...``, and exit
status 2; there is no usage dump to scroll past in a journal.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from spoa_mp.config import ConfigError
from spoa_mp.flags import PROG, build_parser, parse_serve_args
from spoa_mp.logs import set_role, setup_logging

__all__ = ["build_parser", "main", "parse_serve_args"]

EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("spoa_mp.bench")
    except ModuleNotFoundError as e:
        if e.name != "spoa_mp.bench":
            raise
        return _error("the bench command is not available (spoa_mp.bench is missing)")
    result: int = bench.main(argv)
    return result


_SUBCOMMANDS = {
    "check-config": "spoa_mp.check_config",
    "haproxy-config": "spoa_mp.haproxy_config",
    "send": "spoa_mp.send",
}


def _subcommand(name: str, argv: list[str]) -> int:
    module = importlib.import_module(_SUBCOMMANDS[name])
    result: int = module.main(argv)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spoa-mp`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:
        return _bench(args[1:])
    if args and args[0] in _SUBCOMMANDS:
        return _subcommand(args[0], args[1:])
    if args[:1] == ["serve"]:
        args = args[1:]
    try:
        config = parse_serve_args(args)
    except SystemExit as e:  # --help, --version: argparse printed and exits 0
        return e.code if isinstance(e.code, int) else 0
    except ConfigError as e:
        return _error(str(e))

    setup_logging(config.debug, log_format=config.log_format)
    set_role("supervisor")
    try:
        from spoa_mp.server import serve  # noqa: PLC0415 - --help must work without it
    except ModuleNotFoundError as e:
        if e.name != "spoa_mp.server":
            raise
        return _error("the server is not available (spoa_mp.server is missing)")
    return serve(config)

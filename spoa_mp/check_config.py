"""``spoa-mp check-config``: validate a configuration without starting anything.

::

    spoa-mp check-config /etc/spoa-mp.toml
    spoa-mp check-config --config /etc/spoa-mp.toml --app myagent:agent
    spoa-mp check-config --app myagent:agent        # the app alone, default settings

It checks, and reports every problem it finds rather than the first one:

* the TOML file, key by key, with the rules of :func:`spoa_mp.config.load_config`
  (unknown keys, types, ranges, paths relative to the file);
* the app (the file's ``app`` or ``--app``): imported as the server would
  (:func:`spoa_mp.loader.build_agent`: the current directory is on the
  import path), and it must register at least one message handler;
* the TLS files (``tls-cert``, ``tls-key``, ``tls-client-ca``): readable PEM,
  the key matching the certificate, every certificate within its dates;
* the reputation file: loaded (:meth:`ReputationTable.load`), every bad line
  reported as ``FILE:LINE: reason`` (up to :data:`MAX_REPUTATION_ERRORS`).

Problems go to stderr, one line each, ``WHERE: problem``; on success one line
``OK: <summary>`` goes to stdout. Exit status 0 when valid, 2 otherwise. No
socket is bound and no process is forked (importing the app does run its
module-level code, as the server would).
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from spoa_mp.agent import AppLoadError
from spoa_mp.blocklist import load_table
from spoa_mp.config import TOML_KEYS, ConfigError, ServerConfig, file_value, load_config
from spoa_mp.loader import build_agent
from spoa_mp.reputation import ReputationFileError, ReputationTable
from spoa_mp.tls import TLSFiles, file_problems

__all__ = ["MAX_REPUTATION_ERRORS", "Report", "check", "main"]

PROG = "spoa-mp check-config"
EXIT_OK = 0
EXIT_INVALID = 2
MAX_REPUTATION_ERRORS = 20


@dataclass
class Report:
    """What `check` found: problems (one line each) or a summary of a valid setup."""

    problems: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------ the file


def _key_problem(path: str, key: str, message: str) -> str:
    """load_config's "--key reason" for a file key, as "FILE: 'key' reason"."""
    flag = f"--{key} "
    reason = message[len(flag) :] if message.startswith(flag) else message
    return f"{path}: {key!r} {reason}"


def _check_file(path: str, report: Report) -> dict[str, object]:
    """The file's valid keys as load_config field names -> values (paths made
    absolute against the file's directory); a problem for every bad key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        # load_config words these (file:line:column for syntax errors)
        try:
            load_config({}, path)
        except ConfigError as e:
            report.problems.append(str(e))
        else:  # pragma: no cover - it read what we could not
            report.problems.append(f"{path}: cannot be read")
        return {}

    base = os.path.dirname(os.path.abspath(path))
    valid: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if "_" in key or key not in TOML_KEYS:
            hint = difflib.get_close_matches(key.replace("_", "-"), TOML_KEYS, n=1)
            suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
            report.problems.append(f"{path}: unknown key {key!r}{suffix}")
            continue
        # one key at a time through load_config: the very same type and value rules
        try:
            value = file_value(name, value, f"--{key}", base)  # noqa: PLW2901
            load_config({name: value}, together=False)
        except ConfigError as e:
            report.problems.append(_key_problem(path, key, str(e)))
            continue
        valid[name] = value
    return valid


# ------------------------------------------------------------------ the app


def _check_app(spec: str, where: str, report: Report) -> None:
    try:
        agent = build_agent(ServerConfig(app=spec, workers=1))
    except AppLoadError as e:
        report.problems.append(f"{where} {spec!r}: {e}")
        return
    names = list(agent.handlers)
    if not names:
        report.problems.append(
            f"{where} {spec!r}: agent {agent.name!r} has no message handler "
            "(register one with @agent.on_message(NAME) at import time)"
        )
        return
    report.summary.append(f"app {spec} ({len(names)} handlers: {', '.join(names)})")


# ------------------------------------------------------------------ the reputation file


def _lines_after(path: str, skip: int) -> Iterator[str]:
    """The file's lines with the first `skip` blanked (line numbers are kept)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from itertools.repeat("", skip)
        yield from itertools.islice(f, skip, None)


def _check_reputation(path: str, report: Report) -> None:
    try:
        table = ReputationTable.load(path)
    except OSError as e:
        report.problems.append(f"{path}: cannot read the reputation file: {e.strerror or e}")
        return
    except ReputationFileError as e:
        # The loader stops at the first bad line: go on after it, so that every
        # bad line is reported (a bounded number of times).
        report.problems.append(str(e))
        lineno = e.lineno
        for _ in range(MAX_REPUTATION_ERRORS - 1):
            try:
                ReputationTable.from_lines(_lines_after(path, lineno), path)
            except ReputationFileError as more:
                report.problems.append(str(more))
                lineno = more.lineno
            except OSError:  # pragma: no cover - it was readable a moment ago
                return
            else:
                return
        report.problems.append(f"{path}: more bad lines after line {lineno} (not checked)")
        return
    report.summary.append(f"reputation table {table.summary()}")


# ------------------------------------------------------------------ together


def check(config_file: str | None, app: str | None = None) -> Report:
    """Check the config file (if any) and the app (`app` overrides the file's)."""
    report = Report()
    values = _check_file(config_file, report) if config_file is not None else {}
    app_origin = f"{config_file}: app"
    cli: dict[str, object] = {}
    if app is not None:
        app_origin = "--app"
        values.pop("app", None)
        try:
            load_config({"app": app})
        except ConfigError as e:
            report.problems.append(str(e))
        else:
            cli["app"] = values["app"] = app

    blocklists: tuple[tuple[str, int], ...] = ()
    if not report.problems:
        _check_tls(values, config_file or "", report)
    if not report.problems:
        # every key passed on its own: the whole must load too (the server's path)
        try:
            config = load_config(cli, config_file)
        except ConfigError as e:
            report.problems.append(str(e))
        else:
            report.summary.append(f"listen {config.listen_description()}, {config.workers} workers")
            blocklists = config.blocklist  # resolved as the server will read them

    spec = values.get("app")
    if isinstance(spec, str):
        _check_app(spec, app_origin, report)
    else:
        report.summary.append("the built-in IP-reputation agent")
    reputation = values.get("reputation_file")
    if isinstance(reputation, str):
        _check_reputation(reputation, report)
    for path, score in blocklists:
        _check_blocklist(path, score, report)
    return report


def _check_blocklist(path: str, score: int, report: Report) -> None:
    """Parsed as the server will (its first bad line, if any, reported)."""
    try:
        table = load_table(None, [(path, score)])
    except OSError as e:
        report.problems.append(f"{path}: cannot read the blocklist: {e.strerror or e}")
    except ReputationFileError as e:
        report.problems.append(str(e))
    else:
        report.summary.append(f"blocklist {table.summary()}")


def _check_tls(values: dict[str, object], path: str, report: Report) -> None:
    """Every problem of the TLS files (readable, PEM, key matching, dates)."""
    cert, key, ca = (values.get(k) for k in ("tls_cert", "tls_key", "tls_client_ca"))
    if not isinstance(cert, str) or not isinstance(key, str):
        return  # alone, or neither: load_config says which is missing
    files = TLSFiles(cert, key, ca if isinstance(ca, str) else None)
    for which, reason in file_problems(files):
        report.problems.append(f"{path}: {'tls-' + which.replace('_', '-')!r} {reason}")
    if not report.problems:
        auth = ", client certificates required" if files.client_ca else ""
        report.summary.append(f"TLS {os.path.basename(cert)}{auth}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Validate a spoa-mp TOML configuration, its app and its reputation "
        "file without starting the server. Prints every problem on stderr (one line "
        "each) and exits 2, or prints 'OK: ...' and exits 0.",
        allow_abbrev=False,
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="the TOML file to check")
    p.add_argument("--config", metavar="FILE", dest="config_file", help="the same as FILE")
    p.add_argument(
        "--app", metavar="MODULE:ATTR", help="check this app (overrides the file's 'app')"
    )
    return p


def main(argv: Sequence[str]) -> int:
    """``spoa-mp check-config ...``: 0 valid, 2 invalid (or bad usage)."""
    try:
        args = build_parser().parse_args(list(argv))
        if args.file and args.config_file and args.file != args.config_file:
            raise ConfigError("give the file once: FILE or --config FILE")
        config_file = args.file or args.config_file
        if config_file is None and args.app is None:
            raise ConfigError("nothing to check: give a FILE (or --config FILE) or --app")
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_INVALID

    report = check(config_file, args.app)
    if not report.ok:
        for line in report.problems:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    subject = f"{config_file}: " if config_file else ""
    print(f"OK: {subject}{'; '.join(report.summary)}")
    return EXIT_OK

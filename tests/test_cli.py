"""spoa_mp.cli (flags, errors, subcommands, the serve handoff) and spoa_mp.logs."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from support.logging_state import restored_logging

from spoa_mp import __version__, cli, logs
from spoa_mp.config import ServerConfig
from spoa_mp.logs import RateLimitedLog

# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() and setup_logging() change the root logger and the role: undo it."""
    with restored_logging():
        yield


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------- flags -> ServerConfig

FLAGS = [
    (["-d"], "debug", True),
    (["--debug"], "debug", True),
    (["-p", "2000"], "port", 2000),
    (["--port", "0"], "port", 0),
    (["--port=2001"], "port", 2001),
    (["-n", "3"], "workers", 3),
    (["--workers", "4"], "workers", 4),
    (["--host", "0.0.0.0"], "host", "0.0.0.0"),
    (["--host", "::1"], "host", "::1"),
    (["--unix", "/tmp/spoa-test.sock"], "unix", "/tmp/spoa-test.sock"),
    (["--backlog", "10"], "backlog", 10),
    (["--app", "pkg.mod:agent"], "app", "pkg.mod:agent"),
    (["--max-frame-size", "4096"], "max_frame_size", 4096),
    (["--default-score", "0"], "default_score", 0),
    (["--no-pipelining"], "pipelining", False),
    (["--pipelining"], "pipelining", True),
    (["--no-fragmentation"], "fragmentation", False),
    (["--fragmentation"], "fragmentation", True),
    (["--max-in-flight", "1"], "max_in_flight", 1),
    (["--worker-timeout", "2.5"], "worker_timeout", 2.5),
    (["--worker-timeout", "7"], "worker_timeout", 7.0),
    (["--graceful-timeout", "0"], "graceful_timeout", 0.0),
]


@pytest.mark.parametrize(("argv", "name", "value"), FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_each_flag(argv: list[str], name: str, value: object) -> None:
    config = cli.parse_serve_args(argv)
    assert config == dataclasses.replace(ServerConfig(), **{name: value})
    assert type(getattr(config, name)) is type(value)


def test_reputation_file_flag(tmp_path: Path) -> None:
    rep = tmp_path / "rep.txt"
    rep.write_text("10.0.0.0/8 1\n")
    assert cli.parse_serve_args(["--reputation-file", str(rep)]).reputation_file == str(rep)


def test_no_flags_is_the_defaults() -> None:
    assert cli.parse_serve_args([]) == ServerConfig()


def test_every_long_option_is_a_config_key_or_a_command_option() -> None:
    from spoa_mp.config import TOML_KEYS

    longs = {
        s[2:]
        for action in cli.build_parser()._actions
        for s in action.option_strings
        if s.startswith("--") and not s.startswith("--no-")
    }
    assert longs == set(TOML_KEYS) | {"help", "version", "config"}


def test_seed_compatible_short_flags() -> None:
    # HAProxy's example agent: spoa -h -d -p <port> -n <workers>
    config = cli.parse_serve_args(["-d", "-p", "4000", "-n", "2"])
    assert (config.debug, config.port, config.workers) == (True, 4000, 2)


def test_many_flags_together(tmp_path: Path) -> None:
    config = cli.parse_serve_args(
        ["-p", "1", "-n", "2", "--backlog", "3", "--max-in-flight", "4", "--no-pipelining"]
    )
    assert (config.port, config.workers, config.backlog, config.max_in_flight) == (1, 2, 3, 4)
    assert config.pipelining is False
    assert config.cli_values == (
        ("port", 1),
        ("workers", 2),
        ("backlog", 3),
        ("max_in_flight", 4),
        ("pipelining", False),
    )


def test_last_repeated_flag_wins() -> None:
    assert cli.parse_serve_args(["-p", "1", "--port", "2"]).port == 2
    assert cli.parse_serve_args(["--no-pipelining", "--pipelining"]).pipelining is True


def test_serve_subcommand_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServerConfig] = []
    fake = types.ModuleType("spoa_mp.server")
    fake.serve = lambda config: seen.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spoa_mp.server", fake)
    assert cli.main(["serve", "-p", "7"]) == 0
    assert cli.main(["-p", "8"]) == 0
    assert [c.port for c in seen] == [7, 8]


# -------------------------------------------------------- the config file


def test_config_file_values(tmp_path: Path) -> None:
    path = tmp_path / "spoa.toml"
    path.write_text("port = 2000\nworkers = 3\npipelining = false\nmax-frame-size = 1024\n")
    config = cli.parse_serve_args(["--config", str(path)])
    assert (config.port, config.workers, config.pipelining, config.max_frame_size) == (
        2000,
        3,
        False,
        1024,
    )
    assert config.config_file == str(path)


def test_flags_override_the_file_and_only_given_flags(tmp_path: Path) -> None:
    path = tmp_path / "spoa.toml"
    path.write_text("port = 2000\nworkers = 3\npipelining = false\ndebug = true\n")
    config = cli.parse_serve_args(["-p", "2500", "--config", str(path), "--pipelining"])
    assert (config.port, config.workers, config.pipelining, config.debug) == (
        2500,
        3,
        True,
        True,
    )
    config = cli.parse_serve_args(["--config", str(path), "--no-fragmentation"])
    assert (config.port, config.pipelining, config.fragmentation) == (2000, False, False)


# ----------------------------------------------------------------- errors

ERRORS = [
    (["--port", "nope"], "argument -p/--port: expected an integer, got 'nope'"),
    (["-n", "two"], "argument -n/--workers: expected an integer, got 'two'"),
    (["--worker-timeout", "1s"], "argument --worker-timeout: expected a number of seconds"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["-n", "0"], "--workers must be between 1 and 1024, got 0"),
    (["--max-frame-size", "100"], "--max-frame-size must be between 256 and 16777216"),
    (["--default-score", "101"], "--default-score must be between 0 and 100, got 101"),
    (["--max-in-flight", "0"], "--max-in-flight must be at least 1, got 0"),
    (["--worker-timeout", "0"], "--worker-timeout must be more than 0 seconds, got 0"),
    (["--graceful-timeout", "-1"], "--graceful-timeout must be 0 or more seconds, got -1"),
    (["--worker-timeout", "nan"], "--worker-timeout must be a finite number of seconds"),
    (["--app", "nocolon"], "--app must look like 'module:attribute'"),
    (["--reputation-file", "/nonexistent/rep.txt"], "--reputation-file cannot be read: "),
    (["--unix", "/nonexistent/dir/s.sock"], "--unix is in a directory that does not exist"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["extra"], "unrecognized arguments: extra"),
    (["-p"], "argument -p/--port: expected one argument"),
    (["--max", "5"], "unrecognized arguments: --max 5"),  # no abbreviations
    (["--no-debug"], "unrecognized arguments: --no-debug"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml: cannot read config file: "),
]


@pytest.mark.parametrize(("argv", "expected"), ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run_main(capsys, argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("spoa-mp: error: " + expected)


def test_config_file_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "spoa.toml"
    for text, expected in [
        ("port = 'x'\n", f"{path}: 'port' must be an integer, got string"),
        ("prot = 1\n", f"{path}: unknown key 'prot' (did you mean 'port'?)"),
        ("port = = 1\n", f"{path}:1:8: Invalid value"),
        ("workers = 0\n", f"{path}: 'workers' must be between 1 and 1024, got 0"),
    ]:
        path.write_text(text)
        code, _, err = run_main(capsys, ["--config", str(path)])
        assert (code, err) == (2, f"spoa-mp: error: {expected}\n")


def test_error_as_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "spoa_mp", "--port", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "spoa-mp: error: argument -p/--port: expected an integer, got 'nope'"
    ]


# ------------------------------------------------------ help and version


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, ["--help"])
    assert (code, err) == (0, "")
    assert "12345" in out
    assert "127.0.0.1" in out
    assert "loopback only" in out
    for flag in ("-d, --debug", "-p PORT, --port PORT", "-n N, --workers N", "--backlog N"):
        assert flag in out
    assert "backlog of 10" in out
    assert "spoa-mp bench --help" in out
    assert out.startswith("usage: spoa-mp ")


def test_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, ["-h"])
    assert code == 0
    assert "12345" in out


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert run_main(capsys, [flag]) == (0, f"spoa-mp {__version__}\n", "")


def test_help_works_without_the_supervisor(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "spoa_mp.server", None)  # import fails
    assert run_main(capsys, ["--help"])[0] == 0
    assert run_main(capsys, ["--port", "x"])[0] == 2


# ---------------------------------------------------------- bench command


def test_bench_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    fake = types.ModuleType("spoa_mp.bench")
    fake.main = lambda argv: calls.append(argv) or 5  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spoa_mp.bench", fake)
    assert cli.main(["bench", "--help", "-p", "1"]) == 5
    assert calls == [["--help", "-p", "1"]]


def test_bench_missing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spoa_mp.bench", None)
    code, out, err = run_main(capsys, ["bench", "-n", "3"])
    assert (code, out) == (2, "")
    assert err == "spoa-mp: error: the bench command is not available (spoa_mp.bench is missing)\n"


def test_bench_with_a_broken_import_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spoa_mp.bench", None)

    def broken(name: str) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="numpy"):
        cli.main(["bench"])


# ---------------------------------------------------------- serve handoff


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ServerConfig, str, int]]:
    """Replace spoa_mp.server.serve; records (config, role, root level) per call."""
    calls: list[tuple[ServerConfig, str, int]] = []

    def serve(config: ServerConfig) -> int:
        calls.append((config, logs.get_role(), logging.getLogger().level))
        return 3

    fake = types.ModuleType("spoa_mp.server")
    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spoa_mp.server", fake)
    return calls


def test_serve_handoff(fake_serve: list[tuple[ServerConfig, str, int]]) -> None:
    assert cli.main(["-p", "2000", "-n", "2"]) == 3
    [(config, role, level)] = fake_serve
    assert (config.port, config.workers, config.debug) == (2000, 2, False)
    assert role == "supervisor"
    assert level == logging.INFO
    assert logs._handler in logging.getLogger().handlers


def test_serve_handoff_debug(fake_serve: list[tuple[ServerConfig, str, int]]) -> None:
    assert cli.main(["-d"]) == 3
    assert fake_serve[0][2] == logging.DEBUG


def test_no_serve_on_a_config_error(
    capsys: pytest.CaptureFixture[str], fake_serve: list[tuple[ServerConfig, str, int]]
) -> None:
    assert run_main(capsys, ["-n", "0"])[0] == 2
    assert fake_serve == []


def test_supervisor_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "spoa_mp.server", None)
    code, _, err = run_main(capsys, [])
    assert code == 2
    assert err == "spoa-mp: error: the server is not available (spoa_mp.server is missing)\n"


def test_app_is_found_in_the_current_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--app myapp:agent finds ./myapp.py, even from the console script."""
    from spoa_mp.loader import build_agent

    (tmp_path / "cwd_app_probe.py").write_text(
        "from spoa_mp.agent import Agent\nagent = Agent('probe')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_app_probe", raising=False)
    agent = build_agent(ServerConfig(app="cwd_app_probe:agent"))
    assert agent.name == "probe"
    assert sys.path[0] == str(tmp_path)


# ------------------------------------------------------------------- logs


def make_record(msg: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    return logging.LogRecord("spoa_mp.test", logging.INFO, __file__, 1, msg, args, None)


def test_role_in_formatted_records() -> None:
    stream = io.StringIO()
    logs.setup_logging(False, stream=stream)
    log = logging.getLogger("spoa_mp.test")
    logs.set_role("supervisor")
    log.info("hello %s", "world")
    logs.set_role("worker 3")
    log.warning("bye")
    lines = stream.getvalue().splitlines()
    pid = os.getpid()
    assert lines[0].endswith(f" {pid} supervisor INFO spoa_mp.test: hello world")
    assert lines[1].endswith(f" {pid} worker 3 WARNING spoa_mp.test: bye")
    assert len(lines) == 2


def test_setup_logging_levels_and_replacement() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging(False, stream=first)
    log = logging.getLogger("spoa_mp.test")
    log.debug("invisible")
    logs.setup_logging(True, stream=second)  # replaces the first handler
    log.debug("visible")
    assert first.getvalue() == ""
    assert second.getvalue().rstrip().endswith("DEBUG spoa_mp.test: visible")
    ours = [h for h in logging.getLogger().handlers if h is logs._handler]
    assert len(ours) == 1


def test_setup_logging_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging(False)
    logs.set_role("worker 1")
    logging.getLogger("spoa_mp.test").error("boom")
    assert capsys.readouterr().err.rstrip().endswith("worker 1 ERROR spoa_mp.test: boom")


def test_format_has_pid_and_role() -> None:
    logs.set_role("worker 7")
    record = make_record()
    logs._ROLE.filter(record)
    text = logging.Formatter(logs.FORMAT).format(record)
    assert f" {os.getpid()} worker 7 INFO spoa_mp.test: hello world" in text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ONE_SUPPRESSED = " (1 similar messages suppressed)"


class Limited(NamedTuple):
    """A RateLimitedLog (10 s interval) on a fake clock, and what it logged."""

    noisy: RateLimitedLog
    clock: FakeClock
    caplog: pytest.LogCaptureFixture


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> Limited:
    caplog.set_level(logging.DEBUG, logger="spoa_mp.test.rate")
    clock = FakeClock()
    noisy = RateLimitedLog(logging.getLogger("spoa_mp.test.rate"), 10.0, clock=clock)
    return Limited(noisy, clock, caplog)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spoa_mp.test.rate"]


def test_rate_limit_counts_suppressed(limited: Limited) -> None:
    noisy, clock, caplog = limited
    assert noisy.warning("proto", "protocol error %d", 1) is True
    for i in range(5):
        clock.now += 1
        assert noisy.warning("proto", "protocol error %d", i + 2) is False
    clock.now += 5.5  # 10.5 s after the first one
    assert noisy.warning("proto", "protocol error %d", 7) is True
    clock.now += 10
    assert noisy.warning("proto", "protocol error %d", 8) is True  # nothing suppressed since
    assert messages(caplog) == [
        "protocol error 1",
        "protocol error 7 (5 similar messages suppressed)",
        "protocol error 8",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_rate_limit_interval_is_per_key(limited: Limited) -> None:
    noisy, clock, caplog = limited
    assert noisy.warning("a", "a")
    assert noisy.warning("b", "b")
    assert not noisy.warning("a", "a")
    clock.now += 9.999
    assert not noisy.warning("b", "b")
    clock.now += 0.001
    assert noisy.warning("a", "a")
    assert noisy.warning("b", "b")
    assert messages(caplog) == ["a", "b", "a" + ONE_SUPPRESSED, "b" + ONE_SUPPRESSED]


def test_rate_limit_literal_percent_without_args(limited: Limited) -> None:
    noisy, clock, caplog = limited
    noisy.error("full", "queue 100% full")
    noisy.error("full", "queue 100% full")
    clock.now += 10
    noisy.error("full", "queue 100% full")
    assert messages(caplog) == ["queue 100% full", "queue 100% full" + ONE_SUPPRESSED]


def test_rate_limit_levels_and_exception(limited: Limited) -> None:
    noisy, _, caplog = limited
    noisy.debug("d", "d")
    noisy.info("i", "i")
    noisy.log(logging.CRITICAL, "c", "c %s", "!")
    try:
        raise RuntimeError("handler bug")
    except RuntimeError:
        noisy.exception("h", "handler %r failed", "check")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.DEBUG, "d"),
        (logging.INFO, "i"),
        (logging.CRITICAL, "c !"),
        (logging.ERROR, "handler 'check' failed"),
    ]
    exc_info = caplog.records[-1].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], RuntimeError)


def test_rate_limit_records_name_the_caller(limited: Limited) -> None:
    noisy, _, caplog = limited
    noisy.warning("w", "w")
    noisy.log(logging.WARNING, "l", "l")
    assert [r.funcName for r in caplog.records] == ["test_rate_limit_records_name_the_caller"] * 2


def test_rate_limit_disabled_level_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spoa_mp.test.rate")
    clock = FakeClock()
    noisy = RateLimitedLog(logging.getLogger("spoa_mp.test.rate"), clock=clock)
    assert noisy.info("k", "quiet") is False
    assert noisy.warning("k", "loud") is True
    assert messages(caplog) == ["loud"]


def test_rate_limit_bounded_keys(limited: Limited) -> None:
    _, clock, caplog = limited
    noisy = RateLimitedLog(logging.getLogger("spoa_mp.test.rate"), 10.0, max_keys=2, clock=clock)
    assert noisy.warning("a", "a")
    assert noisy.warning("b", "b")
    assert noisy.warning("c", "c")  # table full: "c" goes to the shared overflow limit
    assert not noisy.warning("d", "d")  # ... which "d" shares
    assert len(noisy._state) == 3
    clock.now += 10  # all expire, and are pruned when a new key arrives
    assert noisy.warning("e", "e")
    assert set(noisy._state) == {"e"}
    assert messages(caplog) == ["a", "b", "c", "e"]

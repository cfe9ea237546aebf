"""spoa_mp.config: defaults, the TOML file, command-line overrides, validation."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from spoa_mp import config as config_mod
from spoa_mp.config import (
    MAX_WORKERS,
    TOML_KEYS,
    ConfigError,
    ServerConfig,
    default_workers,
    load_config,
    reload_config,
)
from spoa_mp.config_checks import CHECKS


def write(tmp_path: Path, text: str, name: str = "spoa.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(cli: dict[str, object], config_file: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cli, config_file)
    message = str(info.value)
    assert "\n" not in message
    assert message
    return message


# ---------------------------------------------------------------- defaults


def test_defaults() -> None:
    c = ServerConfig()
    assert (c.host, c.port, c.unix, c.backlog) == ("127.0.0.1", 12345, None, 1024)
    assert 1 <= c.workers <= MAX_WORKERS
    assert (c.app, c.reputation_file, c.default_score) == (None, None, 100)
    assert (c.max_frame_size, c.pipelining, c.fragmentation, c.max_in_flight) == (
        16380,
        True,
        True,
        256,
    )
    assert (c.worker_timeout, c.graceful_timeout, c.debug, c.config_file) == (
        30.0,
        30.0,
        False,
        None,
    )


def test_default_workers_follows_cpu_affinity() -> None:
    assert default_workers() == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert ServerConfig().workers == default_workers()


def test_load_config_without_anything_is_the_defaults() -> None:
    assert load_config({}, None) == ServerConfig()


def test_config_is_frozen_and_slotted() -> None:
    c = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]
    assert not hasattr(c, "__dict__")


def test_key_tables_cover_every_field() -> None:
    names = {f.name for f in dataclasses.fields(ServerConfig)} - {"config_file", "cli_values"}
    assert set(config_mod._KINDS) == names
    assert set(CHECKS) <= names
    assert {k.replace("-", "_") for k in TOML_KEYS} == names


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "127.0.0.1:12345"),
        ({"host": "0.0.0.0", "port": 0}, "0.0.0.0:0"),
        ({"host": "::1", "port": 9000}, "[::1]:9000"),
        ({"host": "localhost"}, "localhost:12345"),
        ({"unix": "/run/spoa.sock"}, "unix:/run/spoa.sock"),
        ({"unix": "/run/spoa.sock", "host": "::", "port": 1}, "unix:/run/spoa.sock"),
    ],
)
def test_listen_description(kwargs: dict[str, object], expected: str) -> None:
    assert ServerConfig(**kwargs).listen_description() == expected  # type: ignore[arg-type]


def test_config_error_is_one_line() -> None:
    e = ConfigError("first\nsecond\r\nthird")
    assert str(e) == "first second third"
    assert isinstance(e, ValueError)


# ---------------------------------------------------------------- the file


def test_every_toml_key(tmp_path: Path) -> None:
    rep = tmp_path / "rep.txt"
    rep.write_text("10.0.0.0/8 5\n")
    path = write(
        tmp_path,
        f"""
        host = "0.0.0.0"
        port = 2000
        unix = "{tmp_path}/s.sock"
        backlog = 64
        workers = 3
        reputation-file = "{rep}"
        default-score = 42
        max-frame-size = 4096
        pipelining = false
        fragmentation = false
        max-in-flight = 9
        worker-timeout = 2.5
        graceful-timeout = 0
        debug = true
        """,
    )
    c = load_config({}, path)
    assert c == ServerConfig(
        host="0.0.0.0",
        port=2000,
        unix=f"{tmp_path}/s.sock",
        backlog=64,
        workers=3,
        reputation_file=str(rep),
        default_score=42,
        max_frame_size=4096,
        pipelining=False,
        fragmentation=False,
        max_in_flight=9,
        worker_timeout=2.5,
        graceful_timeout=0.0,
        debug=True,
        config_file=path,
    )
    assert type(c.graceful_timeout) is float  # an integer is fine where seconds go
    assert c.cli_values == ()
    # app: not beside the built-in agent's keys (test_built_in_agent_settings_...)
    assert load_config({}, write(tmp_path, 'app = "pkg.mod:agent"\n')).app == "pkg.mod:agent"


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert load_config({}, path) == dataclasses.replace(ServerConfig(), config_file=path)


def test_config_file_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "port = 1\n")
    monkeypatch.chdir(tmp_path)
    assert load_config({}, "spoa.toml").config_file == str(tmp_path / "spoa.toml")


def test_relative_paths_in_the_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rep.txt").write_text("")
    path = write(etc, 'reputation-file = "rep.txt"\nunix = "s.sock"\n')
    monkeypatch.chdir(tmp_path)  # not the file's directory
    c = load_config({}, path)
    assert c.reputation_file == str(etc / "rep.txt")
    assert c.unix == str(etc / "s.sock")


def test_relative_paths_on_the_command_line_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rep.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    c = load_config({"reputation_file": "rep.txt", "unix": "s.sock"})
    assert c.reputation_file == str(tmp_path / "rep.txt")
    assert c.unix == str(tmp_path / "s.sock")


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\nbogus = 2\n")
    assert error_of({}, path) == f"{path}: unknown key 'bogus'"


@pytest.mark.parametrize(
    ("key", "hint"),
    [("max_frame_size", "max-frame-size"), ("worker", "workers"), ("prot", "port")],
)
def test_unknown_key_suggests_the_close_one(tmp_path: Path, key: str, hint: str) -> None:
    path = write(tmp_path, f"{key} = 1\n")
    assert error_of({}, path) == f"{path}: unknown key '{key}' (did you mean '{hint}'?)"


def test_tables_are_unknown_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1\n")
    assert error_of({}, path) == f"{path}: unknown table [server]: settings are top-level keys"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('port = "12345"', "'port' must be an integer, got string"),
        ("port = true", "'port' must be an integer, got boolean"),
        ("port = 1.0", "'port' must be an integer, got float"),
        ("workers = [1]", "'workers' must be an integer, got array"),
        ("host = 1", "'host' must be a string, got integer"),
        ("app = {a = 1}", "'app' must be a string, got table"),
        ('pipelining = "no"', "'pipelining' must be a boolean, got string"),
        ("debug = 1", "'debug' must be a boolean, got integer"),
        ('worker-timeout = "30s"', "'worker-timeout' must be a number, got string"),
        ("graceful-timeout = false", "'graceful-timeout' must be a number, got boolean"),
        ("unix = 1979-05-27", "'unix' must be a string, got date"),
    ],
)
def test_wrong_types_in_the_file(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, line + "\n")
    assert error_of({}, path) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("port = 1\nworkers = = 2\n", ":2:11: "),
        ("port = 1\nport = 2\n", ":2:"),
        ("port 1\n", ":1:6: "),
    ],
)
def test_toml_syntax_error_is_one_line_with_position(
    tmp_path: Path, text: str, position: str
) -> None:
    path = write(tmp_path, text)
    assert error_of({}, path).startswith(path + position)


def test_toml_syntax_error_at_end_of_document(tmp_path: Path) -> None:
    path = write(tmp_path, "port = [1, 2")
    assert error_of({}, path).startswith(f"{path}: ")


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    assert error_of({}, path) == f"{path}: cannot read config file: No such file or directory"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    assert error_of({}, str(tmp_path)) == f"{tmp_path}: cannot read config file: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n")
    os.chmod(path, 0)
    assert error_of({}, path) == f"{path}: cannot read config file: Permission denied"


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spoa.toml"
    path.write_bytes(b'host = "\xff"\n')
    assert error_of({}, str(path)).startswith(f"{path}: not UTF-8 (byte 8)")


# ------------------------------------------------------- command-line values


def test_cli_values_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 2000\nworkers = 3\npipelining = false\nhost = '::'\n")
    c = load_config({"port": 3000, "pipelining": True}, path)
    assert (c.port, c.workers, c.pipelining, c.host) == (3000, 3, True, "::")
    assert c.cli_values == (("port", 3000), ("pipelining", True))


def test_cli_values_of_the_wrong_type() -> None:
    assert error_of({"port": "1"}) == "--port must be an integer, got string"
    assert error_of({"max_in_flight": True}) == "--max-in-flight must be an integer, got boolean"


def test_cli_none_clears_an_optional_value(tmp_path: Path) -> None:
    path = write(tmp_path, 'app = "a:b"\n')
    assert load_config({"app": None}, path).app is None
    assert error_of({"port": None}) == "--port must be an integer, got NoneType"


def test_unknown_cli_value() -> None:
    assert error_of({"config_file": "x"}) == "unknown option 'config_file'"


def test_reload_rereads_the_file_and_keeps_the_cli_values(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 2000\nworkers = 3\n")
    first = load_config({"workers": 5}, path)
    assert (first.port, first.workers) == (2000, 5)
    Path(path).write_text("port = 2001\nworkers = 4\ndebug = true\n")
    again = reload_config(first)
    assert (again.port, again.workers, again.debug) == (2001, 5, True)
    assert again.cli_values == first.cli_values


def test_reload_keeps_cli_paths_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rep.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    first = load_config({"reputation_file": "rep.txt"})
    monkeypatch.chdir("/")
    assert reload_config(first).reputation_file == str(tmp_path / "rep.txt")


def test_cli_values_do_not_take_part_in_equality() -> None:
    assert load_config({"port": 12345}) == ServerConfig()


# ---------------------------------------------------------------- validation

RANGE_ERRORS = [
    ("port", -1, "must be between 0 and 65535, got -1"),
    ("port", 65536, "must be between 0 and 65535, got 65536"),
    ("backlog", 0, "must be between 1 and 65535, got 0"),
    ("workers", 0, "must be between 1 and 1024, got 0"),
    ("workers", 1025, "must be between 1 and 1024, got 1025"),
    ("default_score", -1, "must be between 0 and 100, got -1"),
    ("default_score", 101, "must be between 0 and 100, got 101"),
    ("max_frame_size", 255, "must be between 256 and 16777216, got 255"),
    ("max_frame_size", 16777217, "must be between 256 and 16777216, got 16777217"),
    ("max_in_flight", 0, "must be at least 1, got 0"),
    ("worker_timeout", 0, "must be more than 0 seconds, got 0"),
    ("worker_timeout", -1.5, "must be more than 0 seconds, got -1.5"),
    ("graceful_timeout", -1, "must be 0 or more seconds, got -1"),
    ("host", "", "must be a host name or address, got ''"),
    ("host", " ::1", "must be a host name or address, got ' ::1'"),
    ("app", "module", "must look like 'module:attribute'"),
    ("app", "a-b:c", "must look like 'module:attribute'"),
    ("app", "a:", "must look like 'module:attribute'"),
    ("app", ":b", "must look like 'module:attribute'"),
    ("app", "a:b:c", "must look like 'module:attribute'"),
    ("unix", "", "must be a path, got ''"),
    ("reputation_file", "", "must be a path, got ''"),
]


@pytest.mark.parametrize(("name", "value", "reason"), RANGE_ERRORS)
def test_bad_values_on_the_command_line(name: str, value: object, reason: str) -> None:
    assert error_of({name: value}).startswith(f"--{name.replace('_', '-')} {reason}")


@pytest.mark.parametrize(("name", "value", "reason"), RANGE_ERRORS)
def test_bad_values_in_the_file(tmp_path: Path, name: str, value: object, reason: str) -> None:
    key = name.replace("_", "-")
    path = write(tmp_path, f"{key} = {value!r}\n".replace("'", '"'))
    assert error_of({}, path).startswith(f"{path}: '{key}' {reason}")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", 0),
        ("port", 65535),
        ("backlog", 65535),
        ("workers", 1),
        ("workers", 1024),
        ("default_score", 0),
        ("max_frame_size", 256),
        ("max_frame_size", 16777216),
        ("max_in_flight", 1),
        ("worker_timeout", 0.001),
        ("graceful_timeout", 0.0),
        ("host", "::"),
        ("host", "spoa.example.com"),
        ("app", "m:a"),
        ("app", "pkg.sub_mod:factory.agent"),
    ],
)
def test_limits_are_accepted(name: str, value: object) -> None:
    assert getattr(load_config({name: value}), name) == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["worker_timeout", "graceful_timeout"])
def test_seconds_must_be_finite(name: str, value: float) -> None:
    flag = "--" + name.replace("_", "-")
    assert error_of({name: value}) == f"{flag} must be a finite number of seconds, got {value}"


def test_nan_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "worker-timeout = nan\n")
    assert error_of({}, path) == (
        f"{path}: 'worker-timeout' must be a finite number of seconds, got nan"
    )


def test_a_cli_mistake_is_blamed_on_the_flag_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\n")
    assert error_of({"workers": 0}, path).startswith("--workers ")


def test_reputation_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "rep.txt"
    assert error_of({"reputation_file": str(missing)}) == (
        f"--reputation-file cannot be read: {missing}: No such file or directory"
    )


def test_reputation_file_missing_named_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'reputation-file = "rep.txt"\n')
    assert error_of({}, path) == (
        f"{path}: 'reputation-file' cannot be read: {tmp_path / 'rep.txt'}: "
        "No such file or directory"
    )


def test_reputation_file_is_a_directory(tmp_path: Path) -> None:
    assert error_of({"reputation_file": str(tmp_path)}) == (
        f"--reputation-file cannot be read: {tmp_path}: Is a directory"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_reputation_file_unreadable(tmp_path: Path) -> None:
    rep = tmp_path / "rep.txt"
    rep.write_text("")
    rep.chmod(0)
    assert error_of({"reputation_file": str(rep)}).endswith(": Permission denied")


def test_unix_path_too_long(tmp_path: Path) -> None:
    path = "/tmp/" + "x" * 103  # 108 bytes: one more than sun_path holds
    assert error_of({"unix": path}) == (
        f"--unix is too long for a Unix socket (108 bytes, at most 107): {path}"
    )
    assert load_config({"unix": path[:-1]}).unix == path[:-1]


def test_unix_directory_missing(tmp_path: Path) -> None:
    assert error_of({"unix": str(tmp_path / "no" / "s.sock")}) == (
        f"--unix is in a directory that does not exist: {tmp_path / 'no'}"
    )


def test_unix_wins_over_host_and_port(tmp_path: Path) -> None:
    path = write(tmp_path, 'host = "0.0.0.0"\nport = 2000\n')
    c = load_config({"unix": str(tmp_path / "s.sock")}, path)
    assert (c.host, c.port) == ("0.0.0.0", 2000)  # kept, but not used:
    assert c.listen_description() == f"unix:{tmp_path / 's.sock'}"


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"blocklist": ("/etc/hostname",)}, "--blocklist"),
        ({"reputation_file": "/etc/hostname"}, "--reputation-file"),
        ({"default_score": 5}, "--default-score"),
    ],
)
def test_built_in_agent_settings_are_refused_with_an_app(
    values: dict[str, object], flag: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{flag} is read by the built-in IP-reputation agent"):
        load_config({"app": "myapp:agent", **values})
    assert load_config(values).app is None  # without --app they are the agent's

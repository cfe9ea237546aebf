"""spoa_mp.check_config: `spoa-mp check-config FILE [--app MODULE:ATTR]`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.apps import importable_app

from spoa_mp import check_config, cli

GOOD_REPUTATION = "10.0.0.0/8 5\n192.0.2.7 90   # a host\n2001:db8::/32 80\n"


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, list[str]]:
    """cli.main(["check-config", *argv]): exit code, stdout, stderr lines."""
    code = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


HANDLER = """
@agent.on_message("check-token")
def check(msg):
    return None
"""


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """check-config never binds a socket nor forks."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check-config must not bind, listen or fork")

    class NoServerSocket(socket.socket):  # a subclass: ssl subclasses socket.socket at import
        bind = listen = refuse

    monkeypatch.setattr(socket, "socket", NoServerSocket)
    monkeypatch.setattr(os, "fork", refuse)


# ------------------------------------------------------------------ valid


def test_valid_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write(tmp_path / "rep.txt", GOOD_REPUTATION)
    config = write(
        tmp_path / "spoa.toml",
        'port = 2000\nworkers = 3\nreputation-file = "rep.txt"\nmax-frame-size = 4096\n',
    )
    code, out, err = run(capsys, [str(config)])
    assert (code, err) == (0, [])
    assert out.count("\n") == 1
    assert out.startswith(f"OK: {config}: listen 127.0.0.1:2000, 3 workers")
    assert "the built-in IP-reputation agent" in out
    assert f"{tmp_path}/rep.txt: 3 prefixes" in out


def test_valid_file_with_config_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "port = 2001\n")
    code, out, err = run(capsys, ["--config", str(config)])
    assert (code, err) == (0, [])
    assert out.startswith(f"OK: {config}: listen 127.0.0.1:2001")


def test_empty_file_is_valid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, [str(write(tmp_path / "empty.toml", ""))])
    assert code == 0
    assert out.startswith("OK: ")


def test_paths_are_relative_to_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    write(etc / "rep.txt", GOOD_REPUTATION)
    write(etc / "spoa.toml", 'reputation-file = "rep.txt"\nunix = "agent.sock"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run(capsys, [str(etc / "spoa.toml")])
    assert (code, err) == (0, [])
    assert f"listen unix:{etc}/agent.sock" in out


def test_valid_app(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, HANDLER)
    config = write(tmp_path / "spoa.toml", f'app = "{spec}"\n')
    code, out, err = run(capsys, [str(config)])
    assert (code, err) == (0, [])
    assert f"app {spec} (1 handlers: check-token)" in out


def test_app_flag_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, HANDLER)
    code, out, _ = run(capsys, ["--app", spec])
    assert code == 0
    assert out.startswith("OK: listen 127.0.0.1:12345")


def test_app_flag_overrides_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, HANDLER)
    config = write(tmp_path / "spoa.toml", 'app = "no_such_module_cc:agent"\n')
    code, out, err = run(capsys, [str(config), "--app", spec])
    assert (code, err) == (0, [])
    assert f"app {spec}" in out


def test_blocklists_are_parsed_relative_to_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    write(etc / "drop.txt", "; Spamhaus DROP\n192.0.2.0/24 ; SBL1\n198.51.100.7\n")
    write(etc / "spoa.toml", 'blocklist = ["drop.txt:5"]\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, [str(etc / "spoa.toml")])
    assert (code, err) == (0, [])
    assert f"blocklist {etc}/drop.txt:5: 2 prefixes (2 IPv4" in out


def test_a_blocklist_with_a_bad_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "192.0.2.0/24\n")
    bad = write(tmp_path / "bad.txt", "192.0.2.0/24\n10.0.0.1 10.0.0.2\n")
    config = write(tmp_path / "spoa.toml", 'blocklist = ["good.txt", "bad.txt:0"]\n')
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert err == [f"{bad}:2: expected one address or CIDR, got 2 fields"]


def test_built_in_agent_settings_with_an_app_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, HANDLER)
    write(tmp_path / "rep.txt", GOOD_REPUTATION)
    config = write(tmp_path / "spoa.toml", f'app = "{spec}"\nreputation-file = "rep.txt"\n')
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert err == [
        f"{config}: 'reputation-file' is read by the built-in IP-reputation agent only, "
        f"not by --app {spec}"
    ]


# ------------------------------------------------------------------ one problem each


def test_unknown_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "port = 2000\nwokers = 3\n")
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert err == [f"{config}: unknown key 'wokers' (did you mean 'workers'?)"]


def test_underscore_key_is_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "max_frame_size = 4096\n")
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert err == [f"{config}: unknown key 'max_frame_size' (did you mean 'max-frame-size'?)"]


def test_bad_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", 'port = "12345"\n')
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert err == [f"{config}: 'port' must be an integer, got string"]


def test_bad_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "max-frame-size = 10\n")
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert err == [f"{config}: 'max-frame-size' must be between 256 and 16777216, got 10"]


def test_messages_match_the_server(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Each problem is worded exactly as the server's own error for it."""
    for text in ('port = "x"\n', "default-score = 101\n", "wokers = 1\n", "debug = 1\n"):
        config = write(tmp_path / "spoa.toml", text)
        code, _, err = run(capsys, [str(config)])
        assert cli.main(["--config", str(config)]) == 2
        server_err = capsys.readouterr().err
        assert code == 2
        assert server_err == f"spoa-mp: error: {err[0]}\n"


def test_toml_syntax_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "port = 1\nworkers = \n")
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"{config}:2:")


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, [str(tmp_path / "nope.toml")])
    assert code == 2
    assert err == [f"{tmp_path}/nope.toml: cannot read config file: No such file or directory"]


def test_bad_app_import(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", 'app = "no_such_module_cc:agent"\n')
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert err == [f"{config}: app 'no_such_module_cc:agent': module 'no_such_module_cc' not found"]


def test_app_that_raises_at_import(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, "raise RuntimeError('no database')\n")
    code, _, err = run(capsys, ["--app", spec])
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"--app {spec!r}: error while importing")
    assert "RuntimeError: no database" in err[0]


def test_app_attribute_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, HANDLER).replace(":agent", ":nope")
    code, _, err = run(capsys, ["--app", spec])
    assert code == 2
    assert "attribute 'nope' not found" in err[0]


def test_app_without_handlers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, "")
    config = write(tmp_path / "spoa.toml", f'app = "{spec}"\n')
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert len(err) == 1
    assert err[0].startswith(f"{config}: app {spec!r}: agent 'x' has no message handler")


def test_malformed_app_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, ["--app", "nocolon"])
    assert code == 2
    assert err == ["--app must look like 'module:attribute' (e.g. 'myapp.handlers:agent'), "
                   "got 'nocolon'"]  # fmt: skip


def test_reputation_file_with_a_bad_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rep = write(tmp_path / "rep.txt", "10.0.0.0/8 5\n# fine\n192.0.2.1 500\n")
    config = write(tmp_path / "spoa.toml", 'reputation-file = "rep.txt"\n')
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert err == [f"{rep}:3: score 500 out of range 0..100"]


def test_every_bad_reputation_line_is_reported(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rep = write(
        tmp_path / "rep.txt",
        "10.0.0.0/8 5\nfoo 3\n10.0.0.0/8 50\n10.0.0.1/8 4\n\n::1 80\n1.2.3.4\n",
    )
    config = write(tmp_path / "spoa.toml", f'reputation-file = "{rep}"\n')
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert [line.split(": ")[0] for line in err] == [f"{rep}:2", f"{rep}:4", f"{rep}:7"]
    assert "host bits set in '10.0.0.1/8'" in err[1]


def test_bad_reputation_lines_are_capped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check_config, "MAX_REPUTATION_ERRORS", 3)
    rep = write(tmp_path / "rep.txt", "bad 1\n" * 10)
    code, _, err = run(capsys, ["--app", "x:y", "--config", str(write(
        tmp_path / "spoa.toml", f'reputation-file = "{rep}"\n'))])  # fmt: skip
    assert code == 2
    rep_lines = [line for line in err if line.startswith(str(rep))]
    assert rep_lines[:3] == [f"{rep}:{n}: invalid IPv4 address in 'bad'" for n in (1, 2, 3)]
    assert rep_lines[3] == f"{rep}: more bad lines after line 3 (not checked)"
    assert len(rep_lines) == 4


def test_unreadable_reputation_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", 'reputation-file = "missing.txt"\n')
    code, _, err = run(capsys, [str(config)])
    assert code == 2
    assert err == [
        f"{config}: 'reputation-file' cannot be read: {tmp_path}/missing.txt: "
        "No such file or directory"
    ]


# ------------------------------------------------------------------ several problems


def test_several_problems_are_reported_together(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rep = write(tmp_path / "rep.txt", "10.0.0.0/8 5\n10.1.0.0/16 x\n")
    config = write(
        tmp_path / "spoa.toml",
        'wokers = 3\nport = "x"\napp = "no_such_module_cc:agent"\n'
        'max-frame-size = 10\nreputation-file = "rep.txt"\n',
    )
    code, out, err = run(capsys, [str(config)])
    assert (code, out) == (2, "")
    assert err == [
        f"{config}: unknown key 'wokers' (did you mean 'workers'?)",
        f"{config}: 'port' must be an integer, got string",
        f"{config}: 'max-frame-size' must be between 256 and 16777216, got 10",
        f"{config}: app 'no_such_module_cc:agent': module 'no_such_module_cc' not found",
        f"{rep}:2: invalid score 'x': expected an integer 0..100",
    ]


def test_file_problem_and_bad_app_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "spoa.toml", "nope = 1\n")
    code, _, err = run(capsys, [str(config), "--app", "no_such_module_cc:agent"])
    assert code == 2
    assert err == [
        f"{config}: unknown key 'nope'",
        "--app 'no_such_module_cc:agent': module 'no_such_module_cc' not found",
    ]


# ------------------------------------------------------------------ usage


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to check"),
        (["a.toml", "--config", "b.toml"], "give the file once"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["a.toml", "b.toml"], "unrecognized arguments: b.toml"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, argv)
    assert (code, out) == (2, "")
    assert len(err) == 1
    assert err[0].startswith("spoa-mp check-config: error: ")
    assert message in err[0]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    assert "--app MODULE:ATTR" in out
    assert cli.main(["--help"]) == 0
    assert "spoa-mp check-config --help" in capsys.readouterr().out


def test_check_function_directly(tmp_path: Path) -> None:
    report = check_config.check(str(write(tmp_path / "c.toml", "port = 1\nbad = 2\n")))
    assert not report.ok
    assert report.problems == [f"{tmp_path}/c.toml: unknown key 'bad'"]


@pytest.mark.parametrize(
    ("text", "code"), [("port = 2000\n", 0), ("port = -1\n", 2), ("[table]\n", 2)]
)
def test_exit_status_of_the_command(tmp_path: Path, text: str, code: int) -> None:
    config = write(tmp_path / "spoa.toml", text)
    proc = subprocess.run(
        [sys.executable, "-m", "spoa_mp", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert proc.stdout.startswith("OK: ")
        assert proc.stderr == ""
    else:
        assert proc.stdout == ""
        assert proc.stderr.startswith(f"{config}: ")

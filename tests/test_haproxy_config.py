"""spoa_mp.haproxy_config: `spoa-mp haproxy-config` and render().

The 2.6 output is checked by the installed HAProxy (`haproxy -c -f`); no 3.x
binary is available here, so the 3.x output is checked as text only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.apps import importable_app

from spoa_mp import cli, haproxy_config
from spoa_mp.agent import AppLoadError
from spoa_mp.config import ConfigError, ServerConfig
from spoa_mp.haproxy_config import Options, render

SPOE = "spoe-iprep.conf"
CFG = "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def lines(text: str) -> list[str]:
    """Stripped lines (HAProxy does not care about indentation)."""
    return [line.strip() for line in text.splitlines()]


def cfg_and_spoe(config: ServerConfig, **options: object) -> tuple[list[str], list[str]]:
    files = render(config, Options(**options))  # type: ignore[arg-type]
    spoe_name = f"spoe-{options.get('engine', 'iprep')}.conf"
    assert set(files) == {CFG, spoe_name}
    return lines(files[CFG]), lines(files[spoe_name])


TWO_HANDLERS = """
@agent.on_message("check-token")
def token(msg):
    return None

@agent.on_message("score-request")
async def score(msg):
    return None
"""


# ------------------------------------------------------------------ versions


def test_default_is_26_with_the_readme_lines() -> None:
    cfg, spoe = cfg_and_spoe(ServerConfig())
    assert "mode tcp" in cfg
    assert "mode spop" not in cfg
    assert "timeout connect 5s            # above the SPOE timeout hello" in cfg
    assert "timeout server  3m            # above the SPOE timeout idle" in cfg
    assert "option spop-check" in cfg
    assert "server agent1 127.0.0.1:12345 check inter 5s" in cfg
    assert "filter spoe engine iprep config /etc/haproxy/spoe-iprep.conf" in cfg
    assert "http-request deny if { var(sess.iprep.ip_score) -m int lt 20 }" in cfg
    assert "backend iprep-agents" in cfg
    assert "bind 127.0.0.1:8080" in cfg

    assert spoe[spoe.index("[iprep]") :][:11] == [
        "[iprep]",
        "spoe-agent iprep-agent",
        "messages check-client-ip",
        "option var-prefix iprep",
        "option set-on-error error",
        "timeout hello      2s",
        "timeout idle       2m",
        "timeout processing 100ms",
        "use-backend iprep-agents",
        "log global",
        "",
    ]
    assert spoe[-3:] == ["spoe-message check-client-ip", "args src", "event on-client-session"]


def test_3x_uses_mode_spop_and_no_hello_or_idle_timeout() -> None:
    cfg, spoe = cfg_and_spoe(ServerConfig(), haproxy="3.x")
    assert "mode spop" in cfg
    assert "mode tcp" not in cfg
    assert "option spop-check" in cfg
    assert "server agent1 127.0.0.1:12345 check inter 5s" in cfg
    assert "timeout connect 5s" in cfg
    assert not any(line.startswith(("timeout hello", "timeout idle")) for line in spoe)
    assert "timeout processing 100ms" in spoe
    assert "use-backend iprep-agents" in spoe
    assert "args src" in spoe


@pytest.mark.parametrize("version", ["2.6", "3.x"])
def test_no_hello_timeout_text_outside_26(version: str) -> None:
    files = render(ServerConfig(), Options(haproxy=version))
    assert ("timeout hello" in files[SPOE]) is (version == "2.6")
    assert ("mode spop" in files[CFG]) is (version == "3.x")


# ------------------------------------------------------------------ the agent's address


@pytest.mark.parametrize(
    ("config", "server"),
    [
        (ServerConfig(port=2000), "server agent1 127.0.0.1:2000 check inter 5s"),
        (ServerConfig(host="::1", port=2001), "server agent1 [::1]:2001 check inter 5s"),
        (ServerConfig(host="localhost"), "server agent1 localhost:12345 check inter 5s"),
        (ServerConfig(host="0.0.0.0"), "server agent1 127.0.0.1:12345 check inter 5s"),
        (ServerConfig(host="::"), "server agent1 [::1]:12345 check inter 5s"),
        (
            ServerConfig(unix="/run/spoa-mp/agent.sock", port=0),
            "server agent1 unix@/run/spoa-mp/agent.sock check inter 5s",
        ),
    ],
)
@pytest.mark.parametrize("version", ["2.6", "3.x"])
def test_server_line(config: ServerConfig, server: str, version: str) -> None:
    cfg, _ = cfg_and_spoe(config, haproxy=version)
    assert [line for line in cfg if line.startswith("server agent1")] == [server]


def test_wildcard_listen_address_gets_a_comment() -> None:
    cfg, _ = cfg_and_spoe(ServerConfig(host="0.0.0.0"))
    i = cfg.index("server agent1 127.0.0.1:12345 check inter 5s")
    assert "0.0.0.0" in cfg[i - 1]
    assert cfg[i - 1].startswith("#")


def test_unix_server_line_has_no_port() -> None:
    cfg, _ = cfg_and_spoe(ServerConfig(unix="/tmp/a.sock", port=7000))
    assert "server agent1 unix@/tmp/a.sock check inter 5s" in cfg
    assert not any("7000" in line for line in cfg)


def test_port_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match="port is 0"):
        render(ServerConfig(port=0))


# ------------------------------------------------------------------ protocol settings


@pytest.mark.parametrize(
    ("size", "expected"),
    [(256, "max-frame-size 256"), (4096, "max-frame-size 4096"), (16379, "max-frame-size 16379")],
)
@pytest.mark.parametrize("version", ["2.6", "3.x"])
def test_smaller_max_frame_size_is_written(size: int, expected: str, version: str) -> None:
    _, spoe = cfg_and_spoe(ServerConfig(max_frame_size=size), haproxy=version)
    assert [line for line in spoe if line.startswith("max-frame-size")] == [expected]


@pytest.mark.parametrize("size", [16380, 65536, 16_777_216])
def test_default_or_larger_max_frame_size_is_not_written(size: int) -> None:
    _, spoe = cfg_and_spoe(ServerConfig(max_frame_size=size))
    assert not any("max-frame-size" in line for line in spoe)


@pytest.mark.parametrize("version", ["2.6", "3.x"])
def test_pipelining(version: str) -> None:
    _, on = cfg_and_spoe(ServerConfig(pipelining=True), haproxy=version)
    _, off = cfg_and_spoe(ServerConfig(pipelining=False), haproxy=version)
    assert not any("pipelining" in line for line in on)
    assert "no option pipelining" in off


# ------------------------------------------------------------------ options


def test_named_argument_and_http_event() -> None:
    _, spoe = cfg_and_spoe(ServerConfig(), arg_name="ip", event="on-frontend-http-request")
    assert spoe[-3:] == [
        "spoe-message check-client-ip",
        "args ip=src",
        "event on-frontend-http-request",
    ]


def test_engine_prefix_threshold_bind_upstream_timeout() -> None:
    cfg, spoe = cfg_and_spoe(
        ServerConfig(),
        engine="rep",
        var_prefix="rp",
        threshold=35,
        frontend_bind=":9090",
        upstream="10.0.0.5:80",
        processing_timeout="1s",
    )
    assert "filter spoe engine rep config /etc/haproxy/spoe-rep.conf" in cfg
    assert "http-request deny if { var(sess.rp.ip_score) -m int lt 35 }" in cfg
    assert "bind :9090" in cfg
    assert "server app1 10.0.0.5:80" in cfg
    assert "backend rep-agents" in cfg
    assert "[rep]" in spoe
    assert "spoe-agent rep-agent" in spoe
    assert "option var-prefix rp" in spoe
    assert "use-backend rep-agents" in spoe
    assert "timeout processing 1s" in spoe


def test_output_dir_names_the_spoe_file_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg, _ = cfg_and_spoe(ServerConfig(), output_dir="out")
    assert f"filter spoe engine iprep config {tmp_path}/out/spoe-iprep.conf" in cfg


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"haproxy": "2.4"}, "--haproxy"),
        ({"engine": "a b"}, "--engine"),
        ({"var_prefix": "a-b"}, "--var-prefix"),
        ({"threshold": 101}, "--threshold"),
        ({"threshold": -1}, "--threshold"),
        ({"event": "on-http-response"}, "--event"),
        ({"arg_name": "a=b"}, "--arg-name"),
        ({"frontend_bind": "a b"}, "--frontend-bind"),
        ({"upstream": ""}, "--upstream"),
        ({"processing_timeout": "soon"}, "--processing-timeout"),
    ],
)
def test_bad_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        render(ServerConfig(), Options(**options))  # type: ignore[arg-type]


# ------------------------------------------------------------------ --app agents


def test_app_messages_come_from_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importable_app(tmp_path, monkeypatch, TWO_HANDLERS)
    cfg, spoe = cfg_and_spoe(ServerConfig(app=spec), event="on-frontend-http-request")
    assert "messages check-token score-request" in spoe
    for name in ("check-token", "score-request"):
        i = spoe.index(f"spoe-message {name}")
        assert spoe[i + 1].startswith("# args src")
        assert spoe[i + 2] == "event on-frontend-http-request"
    assert "spoe-message check-client-ip" not in spoe
    assert not any(line.startswith("args ") for line in spoe)
    # the ip_score rule is only an example for an agent that may not set it
    assert "# http-request deny if { var(sess.iprep.ip_score) -m int lt 20 }" in cfg
    assert "http-request deny if { var(sess.iprep.ip_score) -m int lt 20 }" not in cfg


def test_app_without_handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importable_app(tmp_path, monkeypatch, "")
    with pytest.raises(ConfigError, match="no message handler"):
        render(ServerConfig(app=spec))


def test_app_that_cannot_be_imported() -> None:
    with pytest.raises(AppLoadError, match="not found"):
        render(ServerConfig(app="no_such_module_xyz:agent"))


def test_app_with_a_name_haproxy_cannot_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importable_app(tmp_path, monkeypatch, "agent.add_handler('two words', print)\n")
    with pytest.raises(ConfigError, match="two words"):
        render(ServerConfig(app=spec))


def test_explicit_messages_skip_the_import() -> None:
    files = render(ServerConfig(app="not_imported:agent"), Options(messages=("a", "b")))
    assert "messages a b" in lines(files[SPOE])


# ------------------------------------------------------------------ the command


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(["haproxy-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_prints_both_files_under_headers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, [])
    assert (code, err) == (0, "")
    headers = [line for line in out.splitlines() if line.startswith("# ====")]
    assert headers == [
        "# " + "=" * 16 + " /etc/haproxy/haproxy.cfg " + "=" * 16,
        "# " + "=" * 16 + " /etc/haproxy/spoe-iprep.conf " + "=" * 16,
    ]
    files = render(ServerConfig(), Options())
    assert files[CFG] in out
    assert files[SPOE] in out


def test_command_uses_the_serve_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        ["-p", "2345", "-n", "3", "--max-frame-size", "1024", "--no-pipelining", "--haproxy",
         "3.x", "--engine", "e", "--var-prefix", "p", "--threshold", "50", "--arg-name", "ip"],
    )  # fmt: skip
    assert code == 0
    out_lines = lines(out)
    assert "server agent1 127.0.0.1:2345 check inter 5s" in out_lines
    assert "max-frame-size 1024" in out_lines
    assert "no option pipelining" in out_lines
    assert "mode spop" in out_lines
    assert "http-request deny if { var(sess.p.ip_score) -m int lt 50 }" in out_lines
    assert "args ip=src" in out_lines


def test_command_reads_the_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "spoa.toml").write_text('unix = "agent.sock"\nmax-frame-size = 2048\n')
    code, out, _ = run(capsys, ["--config", str(tmp_path / "spoa.toml")])
    assert code == 0
    assert f"server agent1 unix@{tmp_path}/agent.sock check inter 5s" in lines(out)
    assert "max-frame-size 2048" in lines(out)


def test_command_output_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "new" / "dir"
    code, out, _ = run(capsys, ["--output-dir", str(out_dir), "-p", "4000"])
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [CFG, SPOE]
    cfg = (out_dir / CFG).read_text()
    assert f"filter spoe engine iprep config {out_dir}/{SPOE}\n" in cfg
    assert "server agent1 127.0.0.1:4000 check inter 5s" in cfg
    assert f"wrote {out_dir}/{CFG}" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--haproxy", "2.4"], "argument --haproxy: invalid choice"),
        (["--threshold", "x"], "argument --threshold: invalid int value"),
        (["--threshold", "200"], "--threshold must be between 0 and 100"),
        (["--port", "x"], "argument -p/--port: expected an integer"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-p", "0"], "port is 0"),
        (["--app", "no_such_module_xyz:agent"], "module 'no_such_module_xyz' not found"),
    ],
)
def test_command_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, argv)
    assert (code, out) == (2, "")
    assert err.startswith("spoa-mp haproxy-config: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    for flag in ("--haproxy", "--engine", "--var-prefix", "--frontend-bind", "--threshold",
                 "--event", "--arg-name", "--output-dir", "spoa-mp --help"):  # fmt: skip
        assert flag in out


def test_cli_help_lists_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "spoa-mp haproxy-config --help" in capsys.readouterr().out


def test_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "spoa_mp", "haproxy-config", "-p", "3456"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "server agent1 127.0.0.1:3456 check inter 5s" in proc.stdout


# ------------------------------------------------------------------ real HAProxy 2.6


def haproxy_check(directory: Path) -> None:
    assert HAPROXY is not None
    proc = subprocess.run(
        [HAPROXY, "-c", "-f", str(directory / CFG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{(directory / CFG).read_text()}"
    assert "Configuration file is valid" in proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout + proc.stderr


@needs_haproxy
@pytest.mark.parametrize(
    ("config", "options"),
    [
        (ServerConfig(), {}),
        (ServerConfig(host="::1", port=2000, max_frame_size=1024, pipelining=False), {}),
        (ServerConfig(unix="/tmp/spoa-mp-hc-test.sock"), {}),
        (ServerConfig(), {"arg_name": "ip", "event": "on-frontend-http-request"}),
        (ServerConfig(host="0.0.0.0"), {"engine": "rep", "var_prefix": "r.p", "threshold": 0}),
    ],
    ids=["default", "ipv6-small-frames-no-pipelining", "unix", "named-arg-http", "engine"],
)
def test_haproxy_26_accepts_the_generated_config(
    tmp_path: Path, config: ServerConfig, options: dict[str, object]
) -> None:
    opts = Options(output_dir=str(tmp_path), **options)  # type: ignore[arg-type]
    haproxy_config.write_files(render(config, opts), tmp_path)
    haproxy_check(tmp_path)


@needs_haproxy
def test_haproxy_26_accepts_the_app_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages without args (the commented placeholder) are valid too."""
    spec = importable_app(tmp_path, monkeypatch, TWO_HANDLERS)
    out = tmp_path / "out"
    haproxy_config.write_files(render(ServerConfig(app=spec), Options(output_dir=str(out))), out)
    haproxy_check(out)


# ------------------------------------------------------------ handler deadlines

DEADLINES = """
@agent.on_message("slow", timeout=0.2)
async def slow(msg):
    return None

@agent.on_message("quick")
def quick(msg):
    return None
"""


def processing_line(spoe: list[str]) -> str:
    (line,) = [x for x in spoe if x.startswith("timeout processing")]
    return line


@pytest.mark.parametrize(
    ("handler_timeout", "expected"),
    [(None, "timeout processing 100ms"), (0.05, "timeout processing 250ms")],
)
def test_processing_timeout_is_above_the_longest_deadline(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handler_timeout: float | None,
    expected: str,
) -> None:
    """Without --handler-timeout, "quick" has no deadline: the old default.
    With it, the longest is slow's 0.2 s, plus a quarter (at least 50 ms)."""
    app = importable_app(tmp_path, monkeypatch, DEADLINES)
    config = ServerConfig(app=app, handler_timeout=handler_timeout)
    _, spoe = cfg_and_spoe(config)
    assert processing_line(spoe) == expected


@pytest.mark.parametrize(
    ("deadline", "expected"), [(None, "100ms"), (0.01, "60ms"), (1.0, "1250ms"), (0.3, "375ms")]
)
def test_processing_timeout_margin(deadline: float | None, expected: str) -> None:
    assert haproxy_config.processing_timeout(deadline) == expected


def test_builtin_agent_uses_the_handler_timeout() -> None:
    _, spoe = cfg_and_spoe(ServerConfig(port=1, handler_timeout=1.0))
    assert processing_line(spoe) == "timeout processing 1250ms"


@pytest.mark.parametrize("given", ["100ms", "200ms", "0s"])
def test_processing_timeout_at_or_below_the_deadline_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    app = importable_app(tmp_path, monkeypatch, DEADLINES)
    with pytest.raises(ConfigError, match=r"not above the handlers' deadline of 0\.2 s"):
        render(ServerConfig(app=app, handler_timeout=0.1), Options(processing_timeout=given))


def test_explicit_processing_timeout_above_the_deadline_is_kept() -> None:
    _, spoe = cfg_and_spoe(ServerConfig(port=1, handler_timeout=0.2), processing_timeout="1s")
    assert processing_line(spoe) == "timeout processing 1s"


@pytest.mark.parametrize(("text", "seconds"), [("250", 0.25), ("1s", 1.0), ("500us", 5e-4)])
def test_haproxy_seconds(text: str, seconds: float) -> None:
    assert haproxy_config.haproxy_seconds(text) == pytest.approx(seconds)

"""--log-format json: the formatter, the config key, and a real process tree whose
every log line parses through -d, two reloads and a worker killed with SIGKILL."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from support.logging_state import restored_logging
from support.server import Server

from spoa_mp import logs
from spoa_mp.config import ConfigError, load_config
from spoa_mp.send import exchange

KEYS = {"time", "level", "pid", "role", "logger", "event", "message"}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with restored_logging():
        stream = io.StringIO()
        logs.setup_logging(True, stream, log_format="json")
        yield stream
        assert logs._handler is not None


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_fields_of_a_line(json_log: io.StringIO) -> None:
    logs.set_role("worker 3")
    logging.getLogger("spoa_mp.test").warning(
        "accept failed: %s after %d tries", OSError(24, "too many\nfiles"), 3, extra={"peer": "x"}
    )
    (rec,) = records(json_log)
    assert rec.keys() >= KEYS
    assert (rec["level"], rec["pid"], rec["role"], rec["worker"]) == (
        "warning",
        os.getpid(),
        "worker",
        3,
    )
    assert rec["event"] == "accept failed: %s after %d tries"
    assert rec["args"] == ["[Errno 24] too many\nfiles", 3]
    assert rec["message"] == "accept failed: [Errno 24] too many\nfiles after 3 tries"
    assert rec["peer"] == "x"
    assert str(rec["time"]).endswith("Z")
    assert len(json_log.getvalue().splitlines()) == 1  # the newline stayed escaped


def test_exceptions_and_bad_formats_stay_one_line(json_log: io.StringIO) -> None:
    log = logging.getLogger("spoa_mp.test")
    logs.set_role("supervisor")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed")
    log.info("a dict %(x)s", {"x": 1})
    sys.excepthook(RuntimeError, RuntimeError("uncaught"), None)
    exc, mapping, uncaught = records(json_log)
    assert exc["role"] == "supervisor"
    assert "worker" not in exc
    assert "ValueError: boom" in str(exc["exc"])
    assert mapping["message"] == "a dict 1"
    assert mapping["args"] == {"x": 1}
    assert (uncaught["level"], uncaught["event"]) == ("critical", "uncaught exception")
    assert "RuntimeError: uncaught" in str(uncaught["exc"])


def test_a_bad_format_string_still_gives_json() -> None:
    record = logging.makeLogRecord({"msg": "two args %s %s", "args": ("only one",)})
    assert "formatting failed" in json.loads(logs.JsonFormatter().format(record))["message"]


def test_config_key(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('log-format = "json"\n')
    assert load_config({}, str(toml)).log_format == "json"
    assert load_config({"log_format": "text"}, str(toml)).log_format == "text"
    toml.write_text('log-format = "xml"\n')
    with pytest.raises(ConfigError, match="'log-format' must be one of text, json"):
        load_config({}, str(toml))


def _ask(port: int) -> None:
    ex = exchange("check-client-ip", [("", IPv4Address("10.0.0.1"))], port=port)
    assert ex.ok, ex


@pytest.mark.e2e
def test_every_line_parses_through_reloads_and_a_kill(tmp_path: Path) -> None:
    with Server(tmp_path, "--log-format", "json", "-d", workers=2) as srv:
        _ask(srv.port)
        for gen in (2, 3):
            srv.signal(signal.SIGHUP)
            srv.wait_log(rf"reload: generation {gen} serving")
            _ask(srv.port)
        workers = srv.wait_workers(lambda w: len(w) == 2, what="2 workers")
        victim = workers[1]
        os.kill(victim, signal.SIGKILL)
        srv.wait_log(rf"worker 1 \(pid {victim}\) was killed by SIGKILL")
        srv.wait_workers(
            lambda w: len(w) == 2 and victim not in w.values(), what="a replacement worker"
        )
        srv.wait_log(r"worker 1 ready", count=4)  # generations 1, 2, 3, then the replacement
        _ask(srv.port)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit() == 0
        lines = srv.log().splitlines()
    parsed = []
    for n, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {n} is not JSON: {line!r}")
    assert len(parsed) > 20
    assert all(rec.keys() >= KEYS for rec in parsed)
    roles = {rec["role"] for rec in parsed}
    assert {"supervisor", "worker"} <= roles
    assert {"debug", "info", "warning"} <= {rec["level"] for rec in parsed}
    assert {rec["worker"] for rec in parsed if rec["role"] == "worker"} >= {1, 2}

"""The workers' event loop (spoa_mp/event_loop.py, --loop, TOML `loop`):
which loop each choice gives, the errors for a bad or missing one, and a real
server on each loop answering sync, awaiting and timed-out handlers and
handing a live connection over on SIGHUP."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest
from support.server import Server, started
from support.spop_peer import SpopClient

from spoa_mp import event_loop
from spoa_mp.codec import FrameType
from spoa_mp.config import ConfigError, load_config

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
    ),
]
SET_VAR, TXN = 1, 2

APP = """
import asyncio

from spoa_mp.agent import Agent
from spoa_mp.model import set_var

agent = Agent("loopapp")


@agent.on_message("loop")
def which_loop(msg):
    # the module of the loop class: asyncio's own is in asyncio.*, uvloop's in uvloop
    return set_var("txn", "loop", type(asyncio.get_running_loop()).__module__.split(".")[0])


@agent.on_message("sleep")
async def sleep(msg):
    await asyncio.sleep(0.01)
    return set_var("txn", "slept", 1)


@agent.on_message("stuck", timeout=0.05, on_timeout=set_var("txn", "late", 1))
async def stuck(msg):
    await asyncio.sleep(5)
"""


def _no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )


def test_auto_takes_uvloop_when_installed() -> None:
    assert event_loop.resolve("auto") == ("uvloop" if HAVE_UVLOOP else "asyncio")
    assert event_loop.resolve("asyncio") == "asyncio"
    assert event_loop.describe("asyncio") == "asyncio"


def test_auto_falls_back_to_asyncio_and_uvloop_asked_for_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_uvloop(monkeypatch)
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(ValueError, match=r"uvloop is not installed \(pip install"):
        event_loop.resolve("uvloop")
    toml = tmp_path / "spoa.toml"
    toml.write_text('loop = "uvloop"\n')
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        load_config({}, str(toml))


@pytest.mark.parametrize("value", ['"epoll"', "3"])
def test_a_bad_loop_in_toml_is_refused(tmp_path: Path, value: str) -> None:
    toml = tmp_path / "spoa.toml"
    toml.write_text(f"loop = {value}\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config({}, str(toml))


def _ack_vars(c: SpopClient, sid: int, name: str) -> list[tuple[object, ...]]:
    c.notify(sid, 1, [(name, [])])
    ack = c.read_frame(5.0)
    assert (ack.type, ack.sid, ack.fid) == (FrameType.ACK, sid, 1), ack
    return ack.actions


@pytest.mark.e2e
@pytest.mark.parametrize("loop", LOOPS)
def test_a_server_on_each_loop_answers_and_hands_over(
    loop: str, tmp_path: Path, servers: list[Server], clients: list[SpopClient]
) -> None:
    (tmp_path / "loopapp.py").write_text(APP)
    srv = started(servers, Server(tmp_path, "--app", "loopapp:agent", "--loop", loop, workers=1))
    assert f"event loop {event_loop.describe(loop)};" in srv.log()
    c = SpopClient(srv.port)
    clients.append(c)
    c.hello()
    assert _ack_vars(c, 1, "loop") == [(SET_VAR, TXN, "loop", loop.encode())]
    assert _ack_vars(c, 2, "sleep") == [(SET_VAR, TXN, "slept", 1)]
    assert _ack_vars(c, 3, "stuck") == [(SET_VAR, TXN, "late", 1)]  # the fallback, on time
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"reload: generation 2 serving")
    srv.wait_log(r"handed 1 connection\(s\) over")
    # the same connection, now served by the new worker on the same kind of loop
    assert _ack_vars(c, 4, "loop") == [(SET_VAR, TXN, "loop", loop.encode())]
    assert _ack_vars(c, 5, "sleep") == [(SET_VAR, TXN, "slept", 1)]

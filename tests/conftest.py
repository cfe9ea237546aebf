"""Shared fixtures and test data.

* The SPOP vectors of tests/data/spop-vectors.json (spop.md §12): tests that
  take a `frame_vector`, `varint_vector` or `truncated_varint_hex` argument
  are parametrized over every vector of that kind, one test id each.
* `processes`, `servers`, `clients` (and `client(port)`, which opens one):
  what a test starts or opens, killed or closed at teardown; when a test
  fails, the output of its `processes` is appended to the report.
* `sockdir`: a directory short enough for Unix sockets.

The tools behind them are in tests/support/.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from support.processes import Process
from support.server import Server
from support.spop_peer import VECTORS, VECTORS_PATH, SpopClient

from spoa_mp import codec
from spoa_mp.codec import Decoder, Encoder
from spoa_mp.model import Action, Scope, String

__all__ = ["VECTORS", "VECTORS_PATH"]  # re-exported for the codec tests

PROCESSES = pytest.StashKey[list[Process]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed:
        for proc in item.stash.get(PROCESSES, []):
            report.sections.append((f"{proc.name} output", proc.logs()))
    return report


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[list[Process]]:
    """Processes started by this test; their groups are killed at teardown."""
    started: list[Process] = []
    request.node.stash[PROCESSES] = started
    yield started
    for proc in reversed(started):
        proc.kill()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers appended here are killed (process group) at teardown and their
    output printed (pytest shows it when the test fails)."""
    started: list[Server] = []
    yield started
    for srv in started:
        srv.kill()
        print(f"----- {srv.name} output ({srv.stderr_path}) -----\n{srv.log()}")


@pytest.fixture
def sockdir(tmp_path: Path) -> Iterator[Path]:
    """A directory for Unix sockets (sun_path holds 107 bytes: keep it short)."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="spoa-sock-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def clients() -> Iterator[list[SpopClient]]:
    """Clients appended here are closed at teardown."""
    made: list[SpopClient] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def client(clients: list[SpopClient]) -> Callable[[int], SpopClient]:
    """client(port): a SpopClient connected to 127.0.0.1:port, closed at teardown."""

    def _client(port: int) -> SpopClient:
        c = SpopClient(port)
        clients.append(c)
        return c

    return _client


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "frame_vector" in metafunc.fixturenames:
        frames = VECTORS["frames"]
        metafunc.parametrize("frame_vector", frames, ids=[f["name"] for f in frames])
    if "varint_vector" in metafunc.fixturenames:
        varints = VECTORS["varints"]
        metafunc.parametrize("varint_vector", varints, ids=[str(v["value"]) for v in varints])
    if "truncated_varint_hex" in metafunc.fixturenames:
        truncated = VECTORS["truncated_varints_hex"]
        metafunc.parametrize(
            "truncated_varint_hex", truncated, ids=[h or "empty" for h in truncated]
        )


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """The whole vector file (about, varints, frames, truncated_varints_hex)."""
    return VECTORS


@pytest.fixture(scope="session")
def frame_bytes() -> dict[str, bytes]:
    """Every frame vector's wire bytes (length prefix included), by name."""
    return {f["name"]: bytes.fromhex(f["hex"]) for f in VECTORS["frames"]}


# ----------------------------------------------------------- frame "meaning"
#
# A frame's meaning is the vector file's "decoded" object with Python values:
# {"type", "flags", "sid", "fid"} plus one of
#   "kv":       [[key, type_code, value], ...]
#   "messages": [[name, [[arg_name, type_code, value], ...]], ...]
#   "actions":  [["set-var", scope, name, type_code, value] | ["unset-var", scope, name]]
#   "raw":      payload bytes (frames whose payload is not walked into items)
# Values are what spoa_mp decodes them to: None, bool, int, IPv4Address,
# IPv6Address, String (STRING) or bytes (BINARY). Compare with `tagged()` so
# that True != 1 and String(b"x") != b"x".

KV_TYPES = (1, 2, 101, 102)


def tagged(obj: Any) -> Any:
    """obj with every scalar paired with its exact type, for type-accurate ==."""
    if isinstance(obj, dict):
        return {k: tagged(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [tagged(v) for v in obj]
    return (type(obj).__name__, obj)


def json_value(type_code: int, value: Any) -> Any:
    """A value of the vector file as spoa_mp decodes it."""
    if type_code == 6:
        return IPv4Address(value)
    if type_code == 7:
        return IPv6Address(value)
    if type_code == 8:
        return String(value.encode())
    if type_code == 9:
        return bytes.fromhex(value["bytes_hex"])
    return value  # None, bool, int


def json_meaning(decoded: dict[str, Any]) -> dict[str, Any]:
    """A vector's "decoded" object converted to a meaning."""
    m = {k: decoded[k] for k in ("type", "flags", "sid", "fid")}
    if "kv" in decoded:
        m["kv"] = [[k, t, json_value(t, v)] for k, t, v in decoded["kv"]]
    if "messages" in decoded:
        m["messages"] = [
            [name, [[a, t, json_value(t, v)] for a, t, v in args]]
            for name, args in decoded["messages"]
        ]
    if "actions" in decoded:
        m["actions"] = [
            [a[0], a[1], a[2]] if a[0] == "unset-var" else [*a[:4], json_value(a[3], a[4])]
            for a in decoded["actions"]
        ]
    if "raw" in decoded:
        m["raw"] = bytes.fromhex(decoded["raw"]["bytes_hex"])
    return m


def frame_meaning(data: bytes, frame: tuple, items: list) -> dict[str, Any]:
    """The meaning of one frame record returned by Decoder.decode(data)."""
    m: dict[str, Any] = {
        "type": frame[codec.F_TYPE],
        "flags": frame[codec.F_FLAGS],
        "sid": frame[codec.F_SID],
        "fid": frame[codec.F_FID],
    }
    first, n = frame[codec.F_FIRST], frame[codec.F_NITEMS]
    own = items[first : first + n]
    if not frame[codec.F_PARSED]:
        assert n == 0
        m["raw"] = data[frame[codec.F_POFF] : frame[codec.F_POFF] + frame[codec.F_PLEN]]
    elif m["type"] in KV_TYPES:
        assert all(it[5] == codec.ItemKind.KV for it in own)
        m["kv"] = [
            [codec.item_name(data, it).decode(), it[6], codec.item_value(data, it)] for it in own
        ]
    elif m["type"] == 3:
        m["messages"] = [
            [msg.name, [[a, int(msg.type_of(i)), v] for i, (a, v) in enumerate(msg.items())]]
            for msg in codec.messages(data, frame, items)
        ]
        assert sum(1 + len(msg[1]) for msg in m["messages"]) == n
    else:
        assert m["type"] == 103
        actions: list[list[Any]] = []
        for it in own:
            assert it[5] == codec.ItemKind.ACTION
            name = codec.item_name(data, it).decode()
            if it[8] == 2:
                actions.append(["unset-var", it[9], name])
            else:
                assert it[8] == 1
                actions.append(["set-var", it[9], name, it[6], codec.item_value(data, it)])
        m["actions"] = actions
    return m


def notes_meaning(notes: Iterable[tuple[int, int, Iterable[Any]]]) -> Any:
    """Notifications (sid, fid, messages), as protocol.py hands them over, in
    the form [[sid, fid, [[name, [[arg, type_code, value], ...]], ...]], ...],
    tagged (see `tagged()`)."""
    return tagged(
        [
            [
                sid,
                fid,
                [
                    [m.name, [[a, int(m.type_of(i)), v] for i, (a, v) in enumerate(m.items())]]
                    for m in msgs
                ],
            ]
            for sid, fid, msgs in notes
        ]
    )


_DECODERS: dict[int, Decoder] = {}  # decoders keep no state between calls
_ENCODER = Encoder()  # nor do encoders; a new one allocates a 16 MiB output buffer


def decode_meanings(data: bytes, max_frame_size: int = 16380) -> tuple[list[dict], int, int]:
    """(meanings of the whole frames at the start of data, consumed, error)."""
    decoder = _DECODERS.get(max_frame_size)
    if decoder is None:
        decoder = _DECODERS[max_frame_size] = Decoder(max_frame_size=max(max_frame_size, 256))
    frames, items, consumed, error = decoder.decode(data, max_frame_size)
    return [frame_meaning(data, f, items) for f in frames], consumed, error


def typed_encoding(type_code: int, value: Any) -> tuple[int, int, bytes]:
    """The (DataType, num, raw) tuple that forces exactly this typed value."""
    if type_code == 0:
        return (0, 0, b"")
    if type_code == 1:
        return (1, int(value), b"")
    if 2 <= type_code <= 5:
        return (type_code, value & (2**64 - 1), b"")
    if type_code in (6, 7):
        return (type_code, 0, value.packed)
    return (type_code, 0, bytes(value))


def action_of(a: list[Any]) -> Any:
    """An Action object with exactly the meaning `a`."""
    if a[0] == "unset-var":
        return Action(2, Scope(a[1]), a[2].encode(), 0, 0, b"")
    return Action(1, Scope(a[1]), a[2].encode(), *typed_encoding(a[3], a[4]))


def encode_meaning(m: dict[str, Any], encoder: Any = None, **kw: Any) -> bytes:
    """The Encoder's *_frame(...) of a meaning (values forced to their exact types)."""
    enc = encoder or _ENCODER
    kw["flags"] = m["flags"]
    if "raw" in m:
        return enc.raw_frame(m["type"], m["sid"], m["fid"], payload=m["raw"], **kw)
    if "messages" in m:
        assert m["type"] == 3
        msgs = [
            (name, [(a, typed_encoding(t, v)) for a, t, v in args]) for name, args in m["messages"]
        ]
        return enc.notify_frame(m["sid"], m["fid"], messages=msgs, **kw)
    if "actions" in m:
        assert m["type"] == 103
        actions = [action_of(a) for a in m["actions"]]
        return enc.ack_frame(m["sid"], m["fid"], actions=actions, **kw)
    kv = [(k, typed_encoding(t, v)) for k, t, v in m.get("kv", ())]
    return enc.kv_frame(m["type"], m["sid"], m["fid"], kv=kv, **kw)

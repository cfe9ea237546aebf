"""``spoa-mp send``: a command-line SPOP client, HAProxy's side of one exchange.

::

    spoa-mp send -p 12345 check-client-ip ip=192.0.2.7
    spoa-mp send --unix /run/spoa.sock --json my-message user:str=42 =10.0.0.1
    spoa-mp send -p 12345 --healthcheck

It connects, sends a HAPROXY-HELLO as HAProxy 3.x does (version 2.0,
max-frame-size 16380, pipelining, a random engine-id), one NOTIFY (stream 1,
frame 1) with one message, and prints the ACK's actions, or the
AGENT-DISCONNECT and its status. ``--healthcheck`` sends the HELLO of
``option spop-check`` instead (empty capabilities, ``healthcheck`` true) and
checks the AGENT-HELLO the way HAProxy does. Exit status: 0 when an ACK (or a
good health-check HELLO) came, 1 when the agent refused, closed or timed out,
2 for a usage error. It works against any SPOA, HAProxy's example agent too.

Arguments are ``NAME=VALUE``, ``NAME:TYPE=VALUE`` or a bare ``VALUE`` (an
unnamed argument, as ``args src`` sends). Untyped values are guessed: an IPv4
or IPv6 address, an integer (UINT32 when it fits, else INT64 / UINT64),
``true`` / ``false``, ``null``, otherwise a string. TYPE is one of
:data:`TYPES`; ``bin`` takes hex.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, NoReturn

from spoa_mp.codec import (
    F_FID,
    F_FIRST,
    F_FLAGS,
    F_LENGTH,
    F_NITEMS,
    F_OFFSET,
    F_SID,
    F_TYPE,
    FLAG_FIN,
    CodecError,
    Decoder,
    Encoder,
    FrameType,
    ItemKind,
    Status,
    item_name,
    item_value,
    kv_items,
    status_reason,
)
from spoa_mp.model import (
    ACTION_SET_VAR,
    DataType,
    Int32,
    Int64,
    Scope,
    String,
    UInt32,
    UInt64,
    Value,
)

__all__ = ["TYPES", "Exchange", "Reply", "exchange", "main", "parse_argument", "parse_reply"]

PROG = "spoa-mp send"
EXIT_ACK, EXIT_NO_ACK, EXIT_USAGE = 0, 1, 2
FRAME_SIZE = 16380  # what HAProxy offers with the default tune.bufsize
READ_LIMIT = 1 << 24  # the largest frame we accept back

_BOOLS = {"true": True, "false": False}


def _int(kind: type[int]) -> Any:
    def convert(text: str) -> Value:
        return kind(int(text, 0))

    return convert


def _bin(text: str) -> Value:
    return bytes.fromhex(text)


def _null(text: str) -> Value:
    if text:
        raise ValueError("null takes no value")
    return None


def _bool(text: str) -> Value:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise ValueError("expected true or false") from None


#: Explicit argument types, NAME:TYPE=VALUE.
TYPES: dict[str, Any] = {
    "null": _null,
    "bool": _bool,
    "int32": _int(Int32),
    "uint32": _int(UInt32),
    "int64": _int(Int64),
    "uint64": _int(UInt64),
    "ipv4": IPv4Address,
    "ipv6": IPv6Address,
    "str": lambda text: String(text.encode()),
    "bin": _bin,
}
_ARG = re.compile(r"([A-Za-z0-9_.-]*)(?::([a-z0-9]+))?=(.*)\Z", re.DOTALL)


class UsageError(ValueError):
    """A bad command line; one line."""


def guess_value(text: str) -> Value:
    """An untyped argument's value: address, integer, boolean, null or string."""
    if text in _BOOLS:
        return _BOOLS[text]
    if text == "null":
        return None
    if re.fullmatch(r"-?[0-9]+", text):
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    if ":" in text or text.count(".") == 3:
        try:
            return ip_address(text)
        except ValueError:
            pass
    return String(text.encode())


def parse_argument(token: str) -> tuple[str, Value]:
    """``NAME=VALUE`` / ``NAME:TYPE=VALUE`` / ``VALUE`` -> (name, value)."""
    m = _ARG.match(token)
    if m is None:
        return "", guess_value(token)
    name, kind, text = m[1], m[2], m[3]
    if kind is None:
        return name, guess_value(text)
    convert = TYPES.get(kind)
    if convert is None:
        raise UsageError(f"unknown type {kind!r} in {token!r}: use one of {', '.join(TYPES)}")
    try:
        return name, convert(text)
    except ValueError as e:
        raise UsageError(f"bad {kind} value in {token!r}: {e}") from None


# ------------------------------------------------------------------ the exchange


@dataclass
class Reply:
    """One frame from the agent, decoded for printing."""

    type: int
    flags: int
    sid: int
    fid: int
    kv: dict[str, Value] = field(default_factory=dict)
    # (action, scope, name, data type, value) of each ACK action
    actions: list[tuple[int, int, str, int, Value]] = field(default_factory=list)


@dataclass
class Exchange:
    """What happened: the agent's HELLO answer, then its answer to the NOTIFY."""

    hello: Reply | None = None
    answer: Reply | None = None
    error: str | None = None  # connection refused, closed, timed out, bad frame
    elapsed: float = 0.0  # seconds from connect to the last frame read

    @property
    def ok(self) -> bool:
        if self.error is not None or self.hello is None:
            return False
        if self.answer is None:  # a health check: the HELLO is the answer
            return hello_problem(self.hello) is None
        return self.answer.type == FrameType.ACK


def hello_problem(r: Reply) -> str | None:
    """Why HAProxy's spop-check would refuse this AGENT-HELLO, or None."""
    if r.type == FrameType.AGENT_DISCONNECT:
        return "agent-disconnect"
    if r.type != FrameType.AGENT_HELLO:
        return "invalid frame received"
    if r.flags != FLAG_FIN:
        return "fragmentation not supported"
    version = r.kv.get("version")
    if not isinstance(version, String):
        return "version value not found"
    if version.text().strip() != "2.0":
        return "unsupported version"
    size = r.kv.get("max-frame-size")
    if not isinstance(size, int) or isinstance(size, bool):
        return "max-frame-size value not found"
    if not 256 <= size <= FRAME_SIZE:
        return "max-frame-size too big or too small"
    if not isinstance(r.kv.get("capabilities"), String):
        return "capabilities value not found"
    return None


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.decoder = Decoder(max_frames=1, max_frame_size=FRAME_SIZE)

    def read(self) -> Reply:
        while True:
            frames, items, _, error = self.decoder.decode(self.buf, FRAME_SIZE)
            if frames:
                return self._reply(frames[0], items)
            if error:
                raise ConnectionError(f"malformed frame from the agent ({status_reason(error)})")
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the agent in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no answer from the agent in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionError("the agent closed the connection")
            self.buf += data

    def _reply(self, f: Any, items: list[Any]) -> Reply:
        r = parse_reply(self.buf, f, items)
        self.buf = self.buf[f[F_OFFSET] + 4 + f[F_LENGTH] :]
        return r


def parse_reply(data: bytes, f: Any, items: list[Any]) -> Reply:
    """One decoded agent frame (a Decoder's frame record and items) as a Reply."""
    r = Reply(f[F_TYPE], f[F_FLAGS], f[F_SID], f[F_FID])
    if f[F_TYPE] in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT):
        r.kv = {k: item_value(data, it) for k, it in kv_items(data, f, items).items()}
    elif f[F_TYPE] == FrameType.ACK:
        for it in items[f[F_FIRST] : f[F_FIRST] + f[F_NITEMS]]:
            if it[5] != ItemKind.ACTION:
                continue
            name = item_name(data, it).decode("utf-8", "replace")
            setvar = it[8] == ACTION_SET_VAR
            value = item_value(data, it) if setvar else None
            r.actions.append((it[8], it[9], name, it[6] if setvar else -1, value))
    return r


def hello_frame(encoder: Encoder, *, healthcheck: bool) -> bytes:
    """HAPROXY-HELLO as HAProxy 3.x sends it (or its ``option spop-check`` one)."""
    kv: list[tuple[str, Value]] = [
        ("supported-versions", String(b"2.0")),
        ("max-frame-size", UInt32(FRAME_SIZE)),
    ]
    if healthcheck:
        kv += [("capabilities", String(b"")), ("healthcheck", True)]
    else:
        kv += [("capabilities", String(b"pipelining")), ("engine-id", str(uuid.uuid4()))]
    return encoder.frame(FrameType.HAPROXY_HELLO, 0, 0, kv=kv)


def connect(host: str, port: int, unix: str | None, timeout: float) -> socket.socket:
    if unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(unix)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(
    message: str | None,
    args: Sequence[tuple[str, Value]] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 12345,
    unix: str | None = None,
    timeout: float = 5.0,
) -> Exchange:
    """One HELLO (health check when `message` is None) and one NOTIFY; never raises
    for what the agent or the network does (Exchange.error says it)."""
    result = Exchange()
    start = time.monotonic()
    encoder = Encoder()
    try:
        sock = connect(host, port, unix, timeout)
    except OSError as e:
        result.error = f"cannot connect: {e.strerror or e}"
        return result
    try:
        conn = _Conn(sock, start + timeout)
        sock.sendall(hello_frame(encoder, healthcheck=message is None))
        result.hello = conn.read()
        if message is None or result.hello.type != FrameType.AGENT_HELLO:
            return result
        size = result.hello.kv.get("max-frame-size")
        size = size if isinstance(size, int) and 256 <= size <= FRAME_SIZE else FRAME_SIZE
        notify = encoder.frame(
            FrameType.NOTIFY, 1, 1, messages=[(message, list(args))], max_frame_size=size
        )
        sock.sendall(notify)
        result.answer = conn.read()
        # The polite end, as HAProxy closes an idle connection.
        bye = encoder.frame(
            FrameType.HAPROXY_DISCONNECT, 0, 0,
            kv=[("status-code", UInt32(Status.NORMAL)), ("message", String(b"normal"))],
        )  # fmt: skip
        sock.sendall(bye)
    except CodecError as e:
        result.error = f"cannot encode the NOTIFY: {e}"
    except (OSError, ConnectionError) as e:
        result.error = str(e) if not isinstance(e, TimeoutError) else "timed out"
    finally:
        result.elapsed = time.monotonic() - start
        sock.close()
    return result


# ------------------------------------------------------------------ printing

_TYPE_NAMES = {t: t.name.lower() for t in DataType}
_SCOPE_NAMES = {s: s.name.lower() for s in Scope}
_FRAME_NAMES: dict[int, str] = {
    FrameType.AGENT_HELLO: "agent-hello",
    FrameType.AGENT_DISCONNECT: "agent-disconnect",
    FrameType.ACK: "ack",
}


def _json_value(value: Value) -> Any:
    if isinstance(value, String):
        return value.text()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, IPv4Address | IPv6Address):
        return str(value)
    return value


def _text_value(value: Value) -> str:
    if isinstance(value, String):
        return json.dumps(value.text())
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _reply_json(r: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frame": _FRAME_NAMES.get(r.type, str(r.type)),
        "flags": r.flags,
        "stream_id": r.sid,
        "frame_id": r.fid,
    }
    if r.kv:
        out["kv"] = {k: _json_value(v) for k, v in r.kv.items()}
    if r.type == FrameType.ACK:
        out["actions"] = [
            {
                "action": "set-var" if a == ACTION_SET_VAR else "unset-var",
                "scope": _SCOPE_NAMES.get(s, str(s)),
                "name": name,
                **({"type": _TYPE_NAMES.get(t, str(t)), "value": _json_value(v)} if t >= 0 else {}),
            }
            for a, s, name, t, v in r.actions
        ]
    return out


def _disconnect_text(r: Reply) -> str:
    status = r.kv.get("status-code")
    text = r.kv.get("message")
    reason = text.text() if isinstance(text, String) else ""
    if isinstance(status, int) and not reason:
        reason = status_reason(status)
    return f"agent-disconnect: status {status}: {reason}"


def report_json(ex: Exchange, healthcheck: bool) -> str:
    out: dict[str, Any] = {"ok": ex.ok, "elapsed_ms": round(ex.elapsed * 1000, 3)}
    if ex.hello is not None:
        out["hello"] = _reply_json(ex.hello)
    if ex.answer is not None:
        out["answer"] = _reply_json(ex.answer)
    if ex.error is not None:
        out["error"] = ex.error
    if healthcheck:
        out["check"] = health_text(ex)
    return json.dumps(out, sort_keys=True)


def health_text(ex: Exchange) -> str:
    """What HAProxy's spop-check would report."""
    if ex.ok:
        return "SPOA server is ok"
    if ex.error is not None or ex.hello is None:
        return ex.error or "no answer"
    if ex.hello.type == FrameType.AGENT_DISCONNECT:
        return _disconnect_text(ex.hello)
    return hello_problem(ex.hello) or "invalid frame received"


def report_text(ex: Exchange, healthcheck: bool) -> str:
    if healthcheck:
        return health_text(ex)
    if ex.error is not None and ex.answer is None and ex.hello is None:
        return f"error: {ex.error}"
    lines = [
        _disconnect_text(r)
        for r in (ex.hello, ex.answer)
        if r is not None and r.type == FrameType.AGENT_DISCONNECT
    ]
    if ex.answer is not None and ex.answer.type == FrameType.ACK:
        a = ex.answer
        lines.append(f"ack stream {a.sid} frame {a.fid}: {len(a.actions)} action(s)")
        for action, scope, name, t, value in a.actions:
            var = f"{_SCOPE_NAMES.get(scope, scope)}.{name}"
            if action == ACTION_SET_VAR:
                lines.append(f"  set-var({var}) = {_text_value(value)} ({_TYPE_NAMES.get(t, t)})")
            else:
                lines.append(f"  unset-var({var})")
    elif ex.answer is not None and ex.answer.type != FrameType.AGENT_DISCONNECT:
        lines.append(f"unexpected frame type {ex.answer.type} instead of an ACK")
    if ex.error is not None:
        lines.append(f"error: {ex.error}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Send one SPOE message to an agent (HELLO, NOTIFY) and print its ACK.",
        epilog="arguments: NAME=VALUE, NAME:TYPE=VALUE or VALUE (unnamed); TYPE is one of "
        + ", ".join(TYPES)
        + ". Exit status 0 when an ACK came, 1 when not, 2 for a usage error.",
        allow_abbrev=False,
    )
    p.add_argument("-p", "--port", type=int, default=12345, help="TCP port (default 12345)")
    p.add_argument("--host", default="127.0.0.1", help="agent address (default 127.0.0.1)")
    p.add_argument("--unix", metavar="PATH", help="connect to this Unix socket instead")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for it all (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--healthcheck", action="store_true", help="do what HAProxy's option spop-check does"
    )
    p.add_argument("message", nargs="?", help="the SPOE message name")
    p.add_argument("args", nargs="*", metavar="NAME=VALUE", help="its arguments")
    return p


def main(argv: Sequence[str]) -> int:
    try:
        ns = _parser().parse_args(list(argv))
        if ns.healthcheck and (ns.message or ns.args):
            raise UsageError("--healthcheck sends no message")
        if not ns.healthcheck and not ns.message:
            raise UsageError("a MESSAGE name is required (or --healthcheck)")
        if not 0 <= ns.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {ns.port}")
        if not ns.timeout > 0:
            raise UsageError(f"--timeout must be more than 0, got {ns.timeout}")
        args = [parse_argument(a) for a in ns.args]
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    ex = exchange(
        None if ns.healthcheck else ns.message,
        args,
        host=ns.host,
        port=ns.port,
        unix=ns.unix,
        timeout=ns.timeout,
    )
    print(report_json(ex, ns.healthcheck) if ns.json else report_text(ex, ns.healthcheck))
    return EXIT_ACK if ex.ok else EXIT_NO_ACK

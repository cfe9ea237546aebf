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
import sys
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, NoReturn

from spoa_mp.codec import FrameType, status_reason
from spoa_mp.exchange import Exchange, Reply, exchange, hello_problem, parse_reply
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

_BOOLS = {"true": True, "false": False}


def _int(kind: type[int]) -> Callable[[str], Value]:
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
TYPES: dict[str, Callable[[str], Value]] = {
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


# ------------------------------------------------------------------ printing

_TYPE_NAMES: dict[int, str] = {t: t.name.lower() for t in DataType}
_SCOPE_NAMES: dict[int, str] = {s: s.name.lower() for s in Scope}
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
    code = status if status is None or isinstance(status, int) else _text_value(status)
    return f"agent-disconnect: status {code}: {reason}"


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

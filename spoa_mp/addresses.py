"""Network addresses given on the command line (--metrics HOST:PORT): parsed
and printed here, so the configuration checks them without importing the
metrics HTTP server."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["format_address", "parse_address"]

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for --metrics: an IPv4 address or a host name,
    ``[IPv6]:PORT``, or ``:PORT`` for every IPv4 interface; port 0 picks a
    free one. Raises ValueError with a one-line message."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9100 or [::1]:9100")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' after the IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, e.g. [::1]:9100, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9100, got {text!r}")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, e.g. [::1]:9100, got {text!r}")
        if host in ("", "*"):
            host = "0.0.0.0"
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

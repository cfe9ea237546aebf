"""The address allow-list (``--allow CIDR``, repeatable).

With no ``--allow`` every peer is let in. With some, a TCP peer whose address
is in none of the networks is closed at accept. Unix-socket peers are always
let in: who may connect is decided by the socket file's permissions. An
IPv4 peer reaching an IPv6 socket (``::ffff:10.0.0.1``) is matched as IPv4.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from spoa_mp.config import ServerConfig
    from spoa_mp.worker_options import ConnectionLimits

__all__ = ["AllowList", "parse_network"]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(text: str) -> Network:
    """'10.0.0.0/8', '2001:db8::/32' or a bare address (a /32 or /128).

    Raises ValueError with a one-line reason (host bits set: '10.0.0.1/8').
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"must be an address or CIDR network, got {text!r}: {e}") from None


def normalized_network(text: str) -> str:
    """--allow / TOML `allow`: one CIDR normalised ('10.1.2.3' -> '10.1.2.3/32')."""
    return str(parse_network(text))


class AllowList:
    """Networks a TCP peer must be in; empty: everyone."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[str | Network] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            parse_network(n) if isinstance(n, str) else n for n in networks
        )
        self._v4 = tuple(n for n in self.networks if n.version == 4)
        self._v6 = tuple(n for n in self.networks if n.version == 6)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, peer: object) -> bool:
        """`peer` is what ``accept()`` returned as the address: a tuple for
        TCP (v4 or v6), a str (or bytes) for a Unix socket."""
        if not self.networks or not isinstance(peer, tuple):
            return True
        try:
            address: Address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        nets = self._v4 if address.version == 4 else self._v6
        return any(address in n for n in nets)


def beyond_loopback(addresses: Iterable[object]) -> list[str]:
    """The listening addresses (getsockname() results) other machines can
    reach: TCP ones that are not loopback (0.0.0.0 and :: included)."""
    out = []
    for addr in addresses:
        if not isinstance(addr, tuple):
            continue  # a Unix socket
        try:
            ip = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        except ValueError:
            continue
        if not ip.is_loopback:
            out.append(f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}")
    return out


def exposure_warning(addresses: Iterable[object], tls: bool, allow: AllowList) -> str | None:
    """The startup line's plain warning when the agent can be reached from
    other machines with neither TLS nor an allow-list; None otherwise."""
    exposed = beyond_loopback(addresses)
    if not exposed or tls or allow:
        return None
    return (
        f"listening on {', '.join(exposed)} beyond loopback with neither TLS (--tls-cert) "
        "nor an allow-list (--allow): anyone who reaches the port can ask for verdicts, "
        "and they cross the network in clear"
    )


def log_startup(
    config: ServerConfig, limits: ConnectionLimits, listeners: Iterable[socket.socket]
) -> None:
    """The start-up lines on who may connect: TLS, the allow-list, or the
    plain warning when neither guards a listener beyond loopback."""
    log = logging.getLogger("spoa_mp.supervisor")
    if limits.tls is not None:
        auth = "client certificates required" if config.tls_client_ca else "no client auth"
        log.info("TLS on every listener (%s; %s)", config.tls_cert, auth)
    if limits.allow:
        log.info("allowed: %s", ", ".join(config.allow))
    warning = exposure_warning(
        (s.getsockname() for s in listeners), limits.tls is not None, limits.allow
    )
    if warning:
        log.warning("%s", warning)

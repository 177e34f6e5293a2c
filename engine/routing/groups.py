"""Address groups: servers whose addresses share a /24 (IPv4) or /48 (IPv6) count as one operator.

Pure functions. A client never lets one group vouch for itself: a server's output is checked on a replica of
another group, and colluders in one group give one opinion (:mod:`corolla.engine.routing.trust`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["address_group", "addrs_group"]


def address_group(host: str) -> str:
    """The group of an IP address: ``"1.2.3.0/24"`` for IPv4, ``"2001:db8:1::/48"`` for IPv6.

    A host name (not an IP address) is its own group, lower-cased. IPv4-mapped IPv6 addresses count as IPv4.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return host.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def addrs_group(addrs: Sequence[str]) -> str | None:
    """The group of the first direct ``/ip4/``, ``/ip6/`` or ``/dns*/`` multiaddr in ``addrs`` (None: none).

    Relayed addresses (``/p2p-circuit``) name the relay, not the peer, and are skipped.
    """
    for addr in addrs:
        parts = addr.split("/")
        if "p2p-circuit" in parts or len(parts) < 3:
            continue
        if parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
            return address_group(parts[2])
    return None

"""Address groups: the hosts one operator can cheaply hold many of (an IPv4 /24, an IPv6 /48).

Identities (peer ids) cost nothing to make, addresses in different networks do; limits and candidate sets
count per group. Pure.
"""

from __future__ import annotations

import ipaddress


def address_group(host: str) -> str:
    """The group of ``host``: ``"a.b.c.0/24"`` for IPv4 (IPv4-mapped IPv6 too), the /48 for IPv6, else the
    lower-cased host itself (a DNS name is its own group)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return host.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

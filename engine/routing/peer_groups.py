"""Which address group a peer is in, from the connections the p2p daemon saw, and candidate sets that hold
at most a few peers of any group (``groups.py`` has the pure ip → group function). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from corolla.engine.routing.groups import address_group

__all__ = ["cap_per_group", "connection_group", "peer_group"]

_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


def connection_group(addr: str, peer: str) -> str:
    """The address group of a connection seen coming from multiaddr ``addr`` (``/ip4/1.2.3.4/tcp/5``).

    A relayed connection (``/p2p-circuit``) shows the relay's address, not the peer's: it counts as the
    peer's own group (``relayed:<peer id>``). So does an address without an IP or DNS host.
    """
    parts = addr.split("/")
    if "p2p-circuit" in parts or len(parts) < 3 or parts[1] not in _HOST_PROTOCOLS:
        return f"relayed:{peer}"
    return address_group(parts[2])


def peer_group(addrs: Sequence[str], peer: str) -> str | None:
    """The group of a peer from the addresses of this side's connections to it; None if not connected."""
    groups = sorted({connection_group(a, peer) for a in addrs})
    return groups[0] if groups else None


def cap_per_group(peers: Sequence[str], groups: Mapping[str, str | None], per_group: int) -> list[str]:
    """``peers`` (best first) with at most ``per_group`` of any known address group; those of a known group
    come first (they are connected: alive), then those whose group is unknown, each in its order."""
    taken: dict[str, int] = {}
    known, unknown = [], []
    for peer in peers:
        group = groups.get(peer)
        if group is None:
            unknown.append(peer)
        elif taken.get(group, 0) < per_group:
            taken[group] = taken.get(group, 0) + 1
            known.append(peer)
    return known + unknown

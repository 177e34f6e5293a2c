"""Where a server listens and what it announces, so that the hosting command works as written.

With no ``--host`` a server joining peers on other machines listens on all IPv4 interfaces; one that
starts a new swarm or joins only loopback peers (tests, the demo) stays on 127.0.0.1. Listening on all
interfaces, it announces only addresses other machines can dial: never 127.x or 0.0.0.0. The choices
are pure functions over plain data; :func:`interface_addresses` and :func:`free_port` are the only
parts that look at this machine.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

import psutil
from hivemind.utils.multiaddr import Multiaddr

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"  # IPv4 only: the p2p daemon listens on one host maddr
_LOCAL_NAMES = {"localhost", "localhost.localdomain"}
_README_HINT = "see README: NAT / home routers"


def is_loopback_peer(peer: str) -> bool:
    """Whether a peer multiaddr names this machine (``/ip4/127.x``, ``/ip6/::1``, ``/dns*/localhost``)."""
    try:
        addr = Multiaddr(peer)
        for proto in addr.protocols():
            if proto.name in ("ip4", "ip6"):
                return ipaddress.ip_address(addr.value_for_protocol(proto.name)).is_loopback
            if proto.name in ("dns", "dns4", "dns6"):
                return str(addr.value_for_protocol(proto.name)).lower() in _LOCAL_NAMES
    except Exception:  # the multiaddr parser raises several types; the daemon's check names a bad address
        return False
    return False


def listen_host(host: str | None, initial_peers: Sequence[str], new_swarm: bool) -> str:
    """The address to listen on: ``host`` if given, else loopback for a swarm of this machine only.

    A new swarm, no peers, or only loopback peers: 127.0.0.1. Any peer elsewhere: 0.0.0.0.
    """
    if host:
        return host
    if new_swarm or all(is_loopback_peer(peer) for peer in initial_peers):
        return LOOPBACK
    return ALL_INTERFACES


def dialable(addresses: Iterable[str]) -> list[str]:
    """The IPv4 addresses others could dial: not loopback, unspecified, link-local or multicast; in order, once."""
    kept: list[str] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.version != 4 or ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast:
            continue
        if text not in kept:
            kept.append(text)
    return kept


def announce_maddrs(
    host: str,
    port: int,
    interfaces: Iterable[str],
    announce_host: str | None = None,
    announce_port: int | None = None,
) -> list[str]:
    """The multiaddrs to announce; empty: let the p2p daemon announce where it listens.

    ``--announce-host`` always wins. Listening on all interfaces, the dialable ``interfaces`` addresses.
    """
    if announce_host:
        return [f"/ip4/{announce_host}/tcp/{announce_port or port}"]
    if host == ALL_INTERFACES:
        return [f"/ip4/{ip}/tcp/{port}" for ip in dialable(interfaces)]
    return []


def reach_line(host: str, port: int, announced: Sequence[str]) -> str:
    """One line saying how this server can be reached (``announced``: the addresses others are told)."""
    if _is_local(host):
        return f"listening on {host} only (port {port}): reachable from this machine only (--host 0.0.0.0 to serve others)"  # fmt: skip
    where = "all interfaces" if host == ALL_INTERFACES else host
    if not announced:
        return f"listening on {where} (port {port}) but no address others can dial was found: give --announce-host PUBLIC_IP ({_README_HINT})"  # fmt: skip
    return f"listening on {where} (port {port}); announcing {' '.join(announced)}: other machines must be able to reach this address ({_README_HINT})"  # fmt: skip


def _is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() in _LOCAL_NAMES


def interface_addresses() -> list[str]:
    """The IPv4 addresses of this machine's network interfaces (:func:`dialable` filters them)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET]


def free_port() -> int:
    """A TCP port free on all interfaces now (announced before the daemon binds it, so it must be fixed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ALL_INTERFACES, 0))
        return int(sock.getsockname()[1])

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
from dataclasses import dataclass
from typing import Any

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


# ---- reachability check and relays ------------------------------------------------------------

MAX_DIAL_PORTS = 4  # ports one dial-back request may name
DIAL_BACK_TIMEOUT = 3.0  # seconds a peer waits for a TCP connection it was asked to try


@dataclass(frozen=True)
class RelayLimits:
    """What one server offering relaying gives the peers it relays (p2pd's relay service flags).

    Attributes:
        circuits_per_peer: relayed connections open at once, per relayed peer.
        reservations: peers that may hold a relay slot here at once.
        buffer_bytes: buffer per relayed connection and direction (memory: about 2 x this x circuits).
        data_bytes: bytes one relayed connection may carry per direction before it is reset.
        seconds: how long one relayed connection may last before it is reset (clients then fail over).
    """

    circuits_per_peer: int = 16
    reservations: int = 64
    buffer_bytes: int = 1 << 20
    data_bytes: int = 1 << 30
    seconds: int = 3600


RELAY_LIMITS = RelayLimits()


def relay_daemon_args(offer: bool, limits: RelayLimits = RELAY_LIMITS) -> dict[str, Any]:
    """p2pd flags: relay for others within ``limits`` (``offer``), or not at all."""
    if not offer:
        return {"relayService": 0}
    return {
        "relayService": 1,
        "relayMaxCircuits": limits.circuits_per_peer,
        "relayMaxReservations": limits.reservations,
        "relayBufferSize": limits.buffer_bytes,
        "relayDataLimit": limits.data_bytes,
        "relayTimeLimit": f"{limits.seconds}s",
    }


def is_circuit(maddr: str) -> bool:
    """Whether a multiaddr goes through a relay (``.../p2p/RELAY/p2p-circuit/...``)."""
    return "/p2p-circuit" in maddr


def relay_of(maddr: str) -> str | None:
    """The relay's peer id in a circuit multiaddr, else None."""
    if not is_circuit(maddr):
        return None
    before = maddr.split("/p2p-circuit", 1)[0]
    return before.rsplit("/p2p/", 1)[1] if "/p2p/" in before else None


def relays_in(maddrs: Iterable[str]) -> list[str]:
    """The relays' peer ids of the circuit addresses among ``maddrs``, in order, once."""
    found: list[str] = []
    for maddr in maddrs:
        relay = relay_of(maddr)
        if relay and relay not in found:
            found.append(relay)
    return found


def peer_ids(maddrs: Iterable[str]) -> list[str]:
    """The peer ids named at the end of ``maddrs`` (``.../p2p/ID``), in order, once."""
    found: list[str] = []
    for maddr in maddrs:
        if "/p2p/" in maddr and not is_circuit(maddr):
            peer = maddr.rsplit("/p2p/", 1)[1]
            if peer and peer not in found:
                found.append(peer)
    return found


def connected_ips(remote_addrs: Iterable[str]) -> list[str]:
    """The dialable IPv4 addresses a peer's direct connections come from.

    Relayed connections name the relay, and a loopback source is a proxy on this machine: both skipped.
    """
    ips: list[str] = []
    for maddr in remote_addrs:
        parts = maddr.split("/")
        if not is_circuit(maddr) and len(parts) >= 3 and parts[1] == "ip4":
            ips.append(parts[2])
    return dialable(ips)


def dial_targets(ports: Sequence[Any], ips: Sequence[str]) -> list[tuple[str, int]]:
    """Where a peer asked to be dialled back is tried: the ports it names, at the addresses it connects from.

    Never elsewhere, so nobody can make a server connect to a third machine. Raises ValueError on junk.
    """
    if not isinstance(ports, list | tuple) or not 0 < len(ports) <= MAX_DIAL_PORTS:
        raise ValueError(f"a dial-back request names 1 to {MAX_DIAL_PORTS} ports")
    if any(type(port) is not int or not 0 < port < 65536 for port in ports):
        raise ValueError("a dial-back port is an integer 1..65535")
    if not ips:  # answering "none reachable" would be a guess: say why there is no answer instead
        raise ValueError("cannot tell: your connection to me comes from no address I could dial back")
    return [(ip, port) for ip in ips[:MAX_DIAL_PORTS] for port in dict.fromkeys(ports)]


@dataclass(frozen=True)
class Reachability:
    """What peers found when asked to dial this server back.

    Attributes:
        asked: peers asked.
        answered: peers that answered.
        reachable: multiaddrs (``/ip4/IP/tcp/PORT``) at which some peer opened a fresh connection.
    """

    asked: int
    answered: int
    reachable: tuple[str, ...]

    @property
    def known(self) -> bool:
        """Whether any peer answered (else nothing is known: keep serving directly)."""
        return self.answered > 0

    @property
    def behind_nat(self) -> bool:
        """Peers answered and none could connect: only a relay can bring clients here."""
        return self.known and not self.reachable


def reachable_line(found: Reachability) -> str:
    """The line a server says after a check that found it reachable."""
    return f"reachable directly at {' '.join(found.reachable)} (checked by {found.answered} peer(s) dialling back)"


def unannounced(found: Reachability | None, announced: Sequence[str]) -> list[str]:
    """Addresses where peers dialled this server back that it does not announce (a port forwarded on a home
    router before it started: peers reach the router's address, the daemon announced its LAN one)."""
    if found is None or found.behind_nat:
        return []
    return [maddr for maddr in found.reachable if maddr not in announced]


def relayed_line(circuits: Sequence[str]) -> str:
    """The line a server that peers cannot dial says (``circuits``: its relay circuit addresses)."""
    if not circuits:
        return f"not reachable from outside and no relay took this server yet: open a TCP port or use --nat-port-map ({_README_HINT})"  # fmt: skip
    relays = ", ".join(relays_in(circuits))
    return f"not reachable from outside: serving through relay {relays} ({_README_HINT})"


def circuits_to_announce(visible: Sequence[str], previous: Sequence[str], connected: Iterable[str]) -> list[str]:
    """The circuit addresses a relayed server announces now.

    ``visible``: its daemon's circuits now; ``previous``: those it announced; ``connected``: peer ids it is
    connected to. After a relay dies the daemon may list no circuit for a few seconds while it settles on
    another: meanwhile the server keeps announcing its previous circuits through relays still connected.
    """
    if visible:
        return list(visible)
    live = set(connected)
    return [maddr for maddr in previous if relay_of(maddr) in live]


def switch_line(found: Reachability) -> str:
    """The line a server says when a re-check finds it the other way (behind a NAT now, or dialable now)."""
    if found.behind_nat:
        return "peers can no longer dial this server back (network changed?): restarting its p2p daemon to serve through a relay; open sessions fail over"  # fmt: skip
    return f"peers can dial this server directly now at {' '.join(found.reachable)}: restarting its p2p daemon to serve directly; open sessions fail over"  # fmt: skip

"""Initial peers: their addresses are checked before the p2p daemon starts, and when the swarm cannot be
joined through them the error names each one and why it could not be reached."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from hivemind.utils.multiaddr import Multiaddr

from corolla.engine.errors import InitialPeerError

_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
_JOIN_HINT = "copy the full address a swarm peer prints (`corolla server ... --new-swarm` or `corolla demo --serve`)"


def check_initial_peers(peers: Sequence[str]) -> None:
    """Raise :class:`InitialPeerError` naming the first address that is not a full peer multiaddr.

    A full address has a host, a TCP port and the peer id: ``/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW...``.
    """
    for peer in peers:
        try:
            names = [p.name for p in Multiaddr(peer).protocols()]
        except Exception as e:  # the multiaddr parser raises several types
            raise InitialPeerError(f"bad initial peer address {peer!r}: {e}. Expected /ip4/HOST/tcp/PORT/p2p/PEER_ID; {_JOIN_HINT}", [peer]) from e  # fmt: skip
        if "p2p" not in names:
            raise InitialPeerError(f"initial peer address {peer!r} lacks the peer id (/p2p/...): {_JOIN_HINT}", [peer])


def tcp_endpoint(peer: str) -> tuple[str, int] | None:
    """``(host, port)`` of a multiaddr with a host and a TCP port, else None."""
    try:
        addr = Multiaddr(peer)
        names = [p.name for p in addr.protocols()]
        host_proto = next(n for n in names if n in _HOSTS)
        return addr.value_for_protocol(host_proto), int(addr.value_for_protocol("tcp"))
    except Exception:
        return None


def probe(peer: str, timeout: float = 3.0) -> str | None:
    """Why ``peer`` cannot be reached over TCP (``"connection refused"``, ...), or None if it answers."""
    endpoint = tcp_endpoint(peer)
    if endpoint is None:
        return None  # not TCP: nothing to probe
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except OSError as e:
        return e.strerror.lower() if e.strerror else type(e).__name__


def unreachable_error(peers: Sequence[str], cause: BaseException) -> InitialPeerError:
    """The error for "the p2p daemon could not join through any initial peer", naming each and why."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(peers)))) as pool:
        reasons = list(pool.map(probe, peers))
    lines = [f"  {peer} ({reason or 'reachable, but it did not accept us as a peer'})" for peer, reason in zip(peers, reasons, strict=True)]  # fmt: skip
    return InitialPeerError(
        "could not join the swarm through any initial peer:\n"
        + "\n".join(lines)
        + "\nCheck that the swarm is up (a server or `corolla demo --serve` is running there) and that each "
        "address is current (a restarted peer has a new address). "
        f"The p2p daemon said: {cause}",
        peers,
    )

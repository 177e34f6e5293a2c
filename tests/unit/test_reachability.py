"""Where a server listens and what it announces when the user names no --host (issue #26 item 1)."""

from __future__ import annotations

import pytest

from corolla.engine.config import ServerConfig
from corolla.engine.server.reachability import announce_maddrs, dialable, listen_host, reach_line

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_the_default_config_leaves_the_host_to_be_chosen() -> None:
    cfg = ServerConfig()
    assert cfg.host is None
    assert listen_host(cfg.host, cfg.initial_peers, cfg.new_swarm) == "127.0.0.1"  # no peers: this machine


@pytest.mark.parametrize(
    "peer",
    [
        f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}",
        f"/ip4/127.5.0.1/tcp/1/p2p/{PEER_ID}",
        f"/ip6/::1/tcp/31337/p2p/{PEER_ID}",
        f"/dns/localhost/tcp/31337/p2p/{PEER_ID}",
        f"/dns4/localhost/tcp/31337/p2p/{PEER_ID}",
    ],
)
def test_loopback_peers_keep_the_server_on_loopback(peer: str) -> None:
    assert listen_host(None, [peer], new_swarm=False) == "127.0.0.1"


@pytest.mark.parametrize(
    "peer",
    [
        f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER_ID}",
        f"/ip4/192.168.1.20/tcp/31337/p2p/{PEER_ID}",
        f"/ip6/2001:db8::7/tcp/31337/p2p/{PEER_ID}",
        f"/dns/swarm.example.org/tcp/31337/p2p/{PEER_ID}",
        f"/dns6/swarm.example.org/tcp/31337/p2p/{PEER_ID}",
    ],
)
def test_a_peer_elsewhere_opens_all_interfaces(peer: str) -> None:
    loopback = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"
    assert listen_host(None, [loopback, peer], new_swarm=False) == "0.0.0.0"


def test_new_swarm_stays_on_loopback_and_an_explicit_host_always_wins() -> None:
    public = f"/ip4/203.0.113.7/tcp/31337/p2p/{PEER_ID}"
    assert listen_host(None, [], new_swarm=True) == "127.0.0.1"
    assert listen_host("127.0.0.1", [public], new_swarm=False) == "127.0.0.1"
    assert listen_host("0.0.0.0", [], new_swarm=True) == "0.0.0.0"
    assert listen_host("10.0.0.5", [public], new_swarm=False) == "10.0.0.5"


def test_only_addresses_others_can_dial_are_announced() -> None:
    interfaces = ["127.0.0.1", "0.0.0.0", "192.0.2.5", "169.254.3.4", "fe80::1", "::1", "10.1.2.3", "192.0.2.5"]
    assert dialable(interfaces) == ["192.0.2.5", "10.1.2.3"]
    assert announce_maddrs("0.0.0.0", 4000, interfaces) == ["/ip4/192.0.2.5/tcp/4000", "/ip4/10.1.2.3/tcp/4000"]


def test_announce_host_wins_and_loopback_announces_what_it_listens_on() -> None:
    interfaces = ["127.0.0.1", "192.0.2.5"]
    assert announce_maddrs("0.0.0.0", 4000, interfaces, "203.0.113.9") == ["/ip4/203.0.113.9/tcp/4000"]
    assert announce_maddrs("0.0.0.0", 4000, interfaces, "203.0.113.9", 5000) == ["/ip4/203.0.113.9/tcp/5000"]
    assert announce_maddrs("127.0.0.1", 4000, interfaces) == []  # the daemon's own: 127.0.0.1
    assert announce_maddrs("0.0.0.0", 4000, ["127.0.0.1"]) == []  # nothing dialable: reach_line says so


def test_the_reach_line_says_who_can_reach_the_server() -> None:
    assert "reachable from this machine only" in reach_line("127.0.0.1", 4000, ["/ip4/127.0.0.1/tcp/4000"])
    line = reach_line("0.0.0.0", 4000, ["/ip4/192.0.2.5/tcp/4000"])
    assert line.startswith("listening on all interfaces (port 4000); announcing /ip4/192.0.2.5/tcp/4000")
    assert "127.0.0.1" not in line
    assert "--announce-host" in reach_line("0.0.0.0", 4000, [])

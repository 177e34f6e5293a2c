"""Where a server listens and what it announces when the user names no --host (issue #26 item 1)."""

from __future__ import annotations

import pytest

from corolla.engine.config import ServerConfig
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.server.reachability import (
    RELAY_LIMITS,
    Reachability,
    announce_maddrs,
    circuits_to_announce,
    connected_ips,
    dial_targets,
    dialable,
    is_circuit,
    listen_host,
    peer_ids,
    reach_line,
    reachable_line,
    relay_daemon_args,
    relay_of,
    relayed_line,
    relays_in,
    switch_line,
    unannounced,
)

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


# ---- reachability check and relays (items 2-3) -------------------------------------------------------

RELAY = "12D3KooWRKuQw8Rsd1LL2GhiqAhP6bGr12buHiqKaGXwz1oebzG4"
CIRCUIT = f"/ip4/11.26.0.3/tcp/31337/p2p/{RELAY}/p2p-circuit/p2p/{PEER_ID}"


def test_a_peer_dials_back_only_the_address_the_asker_connects_from() -> None:
    ips = connected_ips(["/ip4/203.0.113.7/tcp/51234", CIRCUIT, "/ip6/2001:db8::1/tcp/1", "/ip4/127.0.0.1/tcp/9"])
    assert ips == ["203.0.113.7"]  # relayed (names the relay) and loopback (a local proxy) connections: skipped
    assert dial_targets([31337, 31337, 4000], ips) == [("203.0.113.7", 31337), ("203.0.113.7", 4000)]
    with pytest.raises(ValueError, match="cannot tell"):  # no direct connection: no answer, not "unreachable"
        dial_targets([31337], connected_ips(["/ip4/127.0.0.1/tcp/9", CIRCUIT]))


@pytest.mark.parametrize("ports", [[], [0], [70000], ["80"], [1.5], [1, 2, 3, 4, 5], "31337", None])
def test_a_malformed_dial_back_request_is_refused(ports: object) -> None:
    with pytest.raises(ValueError):
        dial_targets(ports, ["203.0.113.7"])  # type: ignore[arg-type]


def test_circuit_addresses_name_their_relay() -> None:
    assert is_circuit(CIRCUIT) and relay_of(CIRCUIT) == RELAY
    assert relay_of(f"/ip4/11.26.0.3/tcp/31337/p2p/{PEER_ID}") is None
    assert relays_in([CIRCUIT, CIRCUIT, "/ip4/1.2.3.4/tcp/1"]) == [RELAY]
    assert peer_ids([f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_ID}", CIRCUIT, "/ip4/1.2.3.4/tcp/1"]) == [PEER_ID]


def test_the_verdict_and_its_line() -> None:
    nobody = Reachability(asked=2, answered=0, reachable=())
    assert not nobody.known and not nobody.behind_nat  # nobody answered: keep serving directly
    natted = Reachability(asked=2, answered=2, reachable=())
    assert natted.behind_nat
    public = Reachability(asked=1, answered=1, reachable=("/ip4/11.26.0.2/tcp/31337",))
    assert not public.behind_nat
    assert reachable_line(public).startswith("reachable directly at /ip4/11.26.0.2/tcp/31337")
    assert relayed_line([CIRCUIT]).startswith(f"not reachable from outside: serving through relay {RELAY}")
    assert "no relay took this server yet" in relayed_line([])


def test_a_relayed_server_keeps_its_live_circuits_while_the_daemon_lists_none() -> None:
    other = "12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust"
    second = f"/ip4/11.26.0.5/tcp/31337/p2p/{other}/p2p-circuit/p2p/{PEER_ID}"
    # The daemon lists circuits: those, whatever was announced before.
    assert circuits_to_announce([second], [CIRCUIT, second], [other]) == [second]
    # It lists none for a moment after a relay died: the previous circuits through relays still connected.
    assert circuits_to_announce([], [CIRCUIT, second], [other, PEER_ID]) == [second]
    assert circuits_to_announce([], [CIRCUIT], [other]) == []  # the only relay is gone: nothing to keep


def test_a_flip_found_by_a_re_check_says_what_happens() -> None:
    natted = Reachability(asked=2, answered=1, reachable=())
    public = Reachability(asked=2, answered=1, reachable=("/ip4/11.26.0.3/tcp/31337",))
    assert "restarting its p2p daemon to serve through a relay" in switch_line(natted)
    assert switch_line(public).startswith("peers can dial this server directly now at /ip4/11.26.0.3/tcp/31337")


def test_relaying_is_bounded_or_off() -> None:
    args = relay_daemon_args(offer=True)
    assert args["relayService"] == 1
    assert args["relayMaxCircuits"] == RELAY_LIMITS.circuits_per_peer
    assert args["relayDataLimit"] == RELAY_LIMITS.data_bytes
    assert args["relayTimeLimit"] == f"{RELAY_LIMITS.seconds}s"
    assert relay_daemon_args(offer=False) == {"relayService": 0}
    assert ServerConfig().no_relay is False  # servers relay unless told not to


def test_records_say_whether_a_server_is_relayed() -> None:
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=2, relayed=True, relay=RELAY)
    back = ServerRecord.from_dht(record.to_dict())
    assert back is not None and back.relayed and back.relay == RELAY
    old = {k: v for k, v in record.to_dict().items() if k not in ("relayed", "relay")}  # an older server's
    assert ServerRecord.from_dht(old) == record.model_copy(update={"relayed": False, "relay": None})
    assert ServerRecord.from_dht({**record.to_dict(), "relay": "x" * 65}) is None  # bounded


def test_health_and_the_monitor_show_relayed_servers() -> None:
    from corolla.engine.apps.health import ModelHealth, ServerHealth, format_table
    from corolla.engine.apps.monitor.state import server_entry

    record = ServerRecord(state=ServerState.ONLINE, start=0, end=2, relayed=True, relay=RELAY)
    entry = server_entry(PEER_ID, record)
    assert entry["relayed"] is True and entry["relay"] == RELAY
    assert server_entry(PEER_ID, record.model_copy(update={"relayed": False, "relay": None}))["relayed"] is False
    row = dict(peer_id=PEER_ID, public_name=None, start=0, end=2, state="online", throughput=1.0)
    row.update(cache_tokens_left=1, version="", dtype="float32")
    servers = [ServerHealth(**row, relayed=True, relay=RELAY), ServerHealth(**{**row, "peer_id": "direct"})]  # type: ignore[arg-type]
    table = format_table([ModelHealth("m", 2, servers, [2, 2])])
    assert f"relayed via …{RELAY[-8:]}" in table
    assert table.count("relayed via") == 1


def test_an_address_peers_dialled_but_not_announced_is_found() -> None:
    forwarded = Reachability(asked=2, answered=2, reachable=("/ip4/11.26.0.3/tcp/31337",))
    lan = ["/ip4/192.168.7.2/tcp/31337"]
    assert unannounced(forwarded, lan) == ["/ip4/11.26.0.3/tcp/31337"]  # the router's forwarded port
    assert unannounced(forwarded, ["/ip4/11.26.0.3/tcp/31337", *lan]) == []  # announced already
    assert unannounced(Reachability(asked=2, answered=1, reachable=()), lan) == []  # behind a NAT: relays
    assert unannounced(None, lan) == []  # not checked

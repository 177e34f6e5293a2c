"""Address groups: identities are free, addresses are not. The pure group function and the server's caps and
session reclaim that count per group and per progress."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import LlamaConfig

from corolla.engine.apps.tiny_models import TINY_DEFAULTS
from corolla.engine.config import ServerConfig
from corolla.engine.errors import CacheFullError, SessionClosedError
from corolla.engine.models.span import BlockSpan
from corolla.engine.routing.groups import address_group
from corolla.engine.routing.peer_groups import cap_per_group, connection_group, peer_group
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.frames import FrameLimits, StreamCounter
from corolla.engine.server.limits import PeerBudget


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("127.0.2.1", "127.0.2.0/24"),
        ("127.0.2.254", "127.0.2.0/24"),
        ("10.1.2.3", "10.1.2.0/24"),
        ("2001:db8:1:2::5", "2001:db8:1::/48"),
        ("2001:db8:1:ffff::1", "2001:db8:1::/48"),
        ("::ffff:1.2.3.4", "1.2.3.0/24"),
        ("Example.COM", "example.com"),
    ],
)
def test_address_group(host: str, group: str) -> None:
    assert address_group(host) == group


def test_neighbouring_networks_are_other_groups() -> None:
    assert address_group("127.0.1.1") != address_group("127.0.2.1")
    assert address_group("2001:db8:1::1") != address_group("2001:db8:2::1")


def test_connection_group_from_observed_multiaddrs() -> None:
    assert connection_group("/ip4/127.0.2.1/tcp/4001", "QmA") == "127.0.2.0/24"
    assert connection_group("/ip6/2001:db8:1:2::5/udp/1/quic", "QmA") == "2001:db8:1::/48"
    # A relayed connection shows the relay's address: the peer is its own group.
    assert connection_group("/ip4/1.2.3.4/tcp/1/p2p/QmR/p2p-circuit", "QmA") == "relayed:QmA"
    assert connection_group("", "QmA") == "relayed:QmA"


def test_candidates_hold_a_few_of_each_known_group() -> None:
    groups = {"a1": "g1", "a2": "g1", "a3": "g1", "h1": "g0", "d1": None, "d2": None}
    peers = ["a1", "d1", "a2", "a3", "d2", "h1"]  # best first: the attacker's identities claim to be fastest
    assert cap_per_group(peers, groups, 2) == ["a1", "a2", "h1", "d1", "d2"]
    assert peer_group(["/ip4/127.0.2.1/tcp/1", "/ip4/127.0.2.9/tcp/2"], "a1") == "127.0.2.0/24"
    assert peer_group([], "a1") is None


def test_peer_budget_caps_each_group() -> None:
    budget = PeerBudget("tokens in flight", per_peer=10, total=100, per_group=15)
    budget.acquire("a", 10, "g1")
    with pytest.raises(CacheFullError, match="address group g1"):
        budget.acquire("b", 6, "g1")  # another identity of the same group
    budget.acquire("b", 5, "g1")
    budget.acquire("c", 10, "g2")  # another group is not affected
    assert budget.held_by_group("g1") == 15 and budget.held() == 25
    budget.release("a", 10, "g1")
    budget.acquire("b", 5, "g1")
    assert budget.held_by_group("g1") == 10


def test_stream_counter_caps_each_group() -> None:
    counter = StreamCounter(FrameLimits(1024, max_streams_per_peer=2, max_streams=10, max_streams_per_group=3))
    for peer in ("a", "a", "b"):
        counter.open(peer, "g1")
    with pytest.raises(CacheFullError, match="address group g1"):
        counter.open("c", "g1")
    counter.open("c", "g2")
    counter.close("a", "g1")
    counter.open("c", "g1")
    assert counter.by_group == {"g1": 3, "g2": 1} and counter.total == 4


def make_backend(**cfg: float) -> SpanBackend:
    config = LlamaConfig(**TINY_DEFAULTS)
    torch.manual_seed(0)
    return SpanBackend(BlockSpan(config, 0, 2).eval(), config, ServerConfig(**cfg), torch.float32)  # type: ignore[arg-type]


def test_sessions_are_capped_per_group() -> None:
    b = make_backend(max_sessions=10, max_sessions_per_peer=2, max_sessions_per_group=3)
    try:
        for i, peer in enumerate(["a", "a", "b"]):
            b.open_session(f"s{i}", 0, 2, 8, 1, peer, group="g1")
        with pytest.raises(CacheFullError, match="address group g1"):
            b.open_session("s3", 0, 2, 8, 1, "c", group="g1")
        b.open_session("s3", 0, 2, 8, 1, "c", group="g2")
    finally:
        b.shutdown()


def test_full_server_reclaims_the_session_with_the_least_recent_progress() -> None:
    """A step that rewrites a position it already holds keeps a session alive but is not progress."""
    b = make_backend(max_sessions=2, session_reclaim_idle=1.0)
    x = torch.randn(1, 1, TINY_DEFAULTS["hidden_size"])
    try:
        kept_alive = b.open_session("kept", 0, 2, 8, 1, "mallory", group="g2")
        busy = b.open_session("busy", 0, 2, 8, 1, "alice", group="g1")
        asyncio.run(b.inference_step(kept_alive, 0, x))  # its first token: progress
        kept_alive.last_progress -= 30.0
        asyncio.run(b.inference_step(kept_alive, 0, x))  # the same position again: alive, no progress
        assert time.monotonic() - kept_alive.last_used < 1.0 and time.monotonic() - kept_alive.last_progress > 29
        asyncio.run(b.inference_step(busy, 0, x))
        busy.last_progress -= 5.0  # also past the bound, but more recent progress than the kept-alive one
        b.open_session("new", 0, 2, 8, 1, "bob", group="g3")
        assert set(b.sessions) == {"busy", "new"}
        with pytest.raises(SessionClosedError, match=r"added no tokens for 3\d s while the server was full"):
            asyncio.run(b.inference_step(kept_alive, 1, x))
        busy.last_progress = time.monotonic()
        with pytest.raises(CacheFullError, match="open sessions"):  # nobody is stale any more: refused
            b.open_session("late", 0, 2, 8, 1, "carol", group="g4")
    finally:
        b.shutdown()

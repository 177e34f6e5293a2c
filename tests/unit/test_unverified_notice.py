"""The "output is unverified" warning: once per process and span, and only for servers that are not the user's own."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from corolla.engine.client import notices
from corolla.engine.client.context import ClientContext
from corolla.engine.config import ClientConfig
from corolla.engine.routing.trust import on_this_machine, warn_unverified

PEER = "12D3KooWStranger"


def test_only_loopback_connections_count_as_this_machine() -> None:
    assert on_this_machine(["/ip4/127.0.0.1/tcp/4000"])
    assert on_this_machine(["/ip6/::1/tcp/4000", "/ip4/127.0.0.5/tcp/1"])
    assert not on_this_machine([])  # unknown: a stranger
    assert not on_this_machine(["/ip4/127.0.0.1/tcp/4000", "/ip4/203.0.113.7/tcp/4000"])
    assert not on_this_machine(["/ip4/192.168.1.5/tcp/4000"])
    assert not on_this_machine(["/ip4/127.0.0.1/tcp/4000/p2p/QmRelay/p2p-circuit"])  # a local relay, remote peer


def test_a_span_is_warned_about_once_and_never_for_own_servers() -> None:
    span = ("smollm2", 0, 15)
    assert warn_unverified(span, own_servers=False, warned=set())
    assert not warn_unverified(span, own_servers=False, warned={span})
    assert warn_unverified(("smollm2", 15, 30), own_servers=False, warned={span})
    assert warn_unverified(("other", 0, 15), own_servers=False, warned={span})
    assert not warn_unverified(span, own_servers=True, warned=set())


class _P2P:
    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs

    async def list_peers(self) -> list[Any]:
        return [
            SimpleNamespace(peer_id=PEER, addrs=self.addrs),
            SimpleNamespace(peer_id="other", addrs=["/ip4/1.2.3.4"]),
        ]


def _warnings(caplog: pytest.LogCaptureFixture, addrs: list[str], sessions: int, **config: Any) -> list[str]:
    manager = SimpleNamespace(model="smollm2")
    for _ in range(sessions):
        context = ClientContext(ClientConfig(**config), manager, _P2P(addrs), None)  # type: ignore[arg-type]
        for start, end in ((0, 15), (15, 30)):
            why = f"only {PEER} serves blocks {start}:{end}"
            asyncio.run(notices.NOTICES.report(context, PEER, start, end, why))
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _fresh_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "NOTICES", notices.UnverifiedNotices())


def test_a_public_swarm_warns_once_per_span_across_sessions(caplog: pytest.LogCaptureFixture) -> None:
    found = _warnings(caplog, ["/ip4/203.0.113.7/tcp/31337"], sessions=3)
    assert len(found) == 2, found  # one per span, not one per session and hop
    assert "blocks 0:15" in found[0] and "blocks 15:30" in found[1]


def test_servers_on_this_machine_or_in_a_private_swarm_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    assert _warnings(caplog, ["/ip4/127.0.0.1/tcp/31337"], sessions=2) == []  # corolla demo's own swarm
    assert _warnings(caplog, ["/ip4/203.0.113.7/tcp/1"], sessions=1, swarm_key_file="team.key") == []


class _CountingP2P(_P2P):
    def __init__(self, addrs: list[str]) -> None:
        super().__init__(addrs)
        self.calls = 0

    async def list_peers(self) -> list[Any]:
        self.calls += 1
        return await super().list_peers()


@pytest.mark.parametrize("addrs", [["/ip4/203.0.113.7/tcp/31337"], ["/ip4/127.0.0.1/tcp/31337"]])
def test_the_daemon_is_asked_only_while_the_answer_can_change_the_notice(addrs: list[str]) -> None:
    """A span already warned about, or a server already seen on this machine, costs no daemon round trip at the
    next session's report (every first token of a span with a single server reports it)."""
    p2p = _CountingP2P(addrs)
    context = ClientContext(ClientConfig(), SimpleNamespace(model="smollm2"), p2p, None)  # type: ignore[arg-type]
    for _ in range(3):
        asyncio.run(notices.NOTICES.report(context, PEER, 0, 15, "only one server"))
    assert p2p.calls == 1
    asyncio.run(notices.NOTICES.report(context, "another-peer", 15, 30, "only one server"))
    assert p2p.calls == 2  # another server of another span: asked again

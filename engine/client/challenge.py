"""A new server's probe carries real work: it must run one one-token step of its first block, with a valid
answer, within the probe's time bound. A server that answers ``info`` but never serves inference (a cheap
identity that only takes up room in routes) fails here, before any session relies on it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.remote import HopStream
from corolla.engine.client.verify import output_problem
from corolla.engine.errors import ProtocolError, short_peer
from corolla.engine.routing.peer_groups import peer_group

logger = logging.getLogger(__name__)

PEERS_TIMEOUT_S = 2.0  # seconds to ask this client's p2p daemon for its connections
MAX_HIDDEN = 1 << 16  # a hidden size larger than this in a server's info is a lie (no model has one)


async def challenge(context: ClientContext, peer: str, start: int, info: Mapping[str, Any], timeout: float) -> None:
    """Run one token of random hidden states through block ``start`` of ``peer``; raise a PeerError if the
    server refuses, answers something that cannot be a block's output, or is silent (the caller bounds the time).
    """
    hidden = info.get("hidden_size")
    if not isinstance(hidden, int) or not 0 < hidden <= MAX_HIDDEN:
        raise ProtocolError(f"server {short_peer(peer)} sent hidden size {hidden!r}", peer_id=peer)
    stream = HopStream(peer, start, start + 1)
    session_id = f"probe-{uuid.uuid4().hex[:16]}"
    try:
        await stream.open(
            context.p2p,
            session_id,
            1,
            1,
            timeout,
            timeout,
            proof=context.proof(peer),
            adapter=context.config.active_adapter,
        )
        # [batch, new, hidden], from a private generator: the user's seeded sampling (torch's global RNG) must
        # not depend on how many servers were probed
        noise = torch.Generator().manual_seed(secrets.randbits(63))
        x = torch.randn(1, 1, hidden, generator=noise)
        out = await stream.step(session_id, x, 0, 0, timeout)
        problem = output_problem(out, x.shape, x.dtype)
        if problem is not None:
            raise ProtocolError(f"server {short_peer(peer)} {problem} to a probe step", peer_id=peer)
    finally:
        await stream.close(session_id)


async def observed_groups(context: ClientContext) -> dict[str, str | None]:
    """The address group of every peer this client is connected to, from the addresses the p2p daemon saw
    (``{}`` if the daemon does not answer: then every peer's group is unknown)."""
    try:
        peers = await asyncio.wait_for(context.p2p.list_peers(), PEERS_TIMEOUT_S)
    except Exception as e:
        logger.debug("listing connected peers: %s", e)
        return {}
    return {str(p.peer_id): peer_group([str(a) for a in p.addrs], str(p.peer_id)) for p in peers}

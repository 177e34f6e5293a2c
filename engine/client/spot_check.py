"""Spot checks: recompute one hop's step on independent replicas and judge who told the truth.

The shell around the pure parts (:mod:`corolla.engine.client.verify` compares tensors,
:mod:`corolla.engine.routing.trust` schedules checks and judges): it plans routes over the hop's
blocks that avoid every peer already heard, runs the hop's whole history through them as a stateless
forward, and stops once two independent sources agree.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch

from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.remote import remote_forward
from corolla.engine.client.verify import output_problem, outputs_agree, tolerance
from corolla.engine.config import ClientConfig
from corolla.engine.errors import PeerError, short_peer
from corolla.engine.routing.sequence_manager import SequenceManager
from corolla.engine.routing.trust import MAX_OPINIONS, Judgement, Opinion, judge, settled, silent_bound

logger = logging.getLogger(__name__)


async def recompute(
    manager: SequenceManager, p2p: object, config: ClientConfig, route: list[tuple[str, int, int]], x: torch.Tensor
) -> torch.Tensor:
    """Stateless forward of ``x`` [batch, length, hidden] through ``route`` ((peer, start, end) hops)."""
    for peer, start, end in route:
        timeout = silent_bound(
            manager.rtt.get(peer),
            x.shape[0] * x.shape[1],
            end - start,
            manager.believed_block_s(peer),
            floor_s=config.stall_timeout,
            ceiling_s=config.request_timeout,
        )
        proof = credentials_for(config).proof(p2p.peer_id.to_base58(), peer)  # type: ignore[attr-defined]
        out = await remote_forward(
            p2p,  # type: ignore[arg-type]
            peer,
            start,
            end,
            x,
            config.max_chunk_bytes,
            timeout,
            proof=proof,
            adapter=config.active_adapter,
        )
        problem = output_problem(out, x.shape, x.dtype)
        if problem is not None:
            raise PeerError(f"server {short_peer(peer)} {problem}", peer_id=peer)
        x = out
    return x


async def spot_check(
    manager: SequenceManager,
    p2p: object,
    config: ClientConfig,
    server: str,
    blocks: tuple[int, int],
    inputs: torch.Tensor,
    output: torch.Tensor,
    avoid: Collection[str],
) -> Judgement:
    """Judge ``server``'s ``output`` [batch, new, hidden] for blocks ``blocks`` given the hop's ``inputs``.

    Args:
        manager: Knows the swarm (replicas of the hop's blocks) and the measurements.
        p2p: The client's P2P instance.
        config: Timeouts and chunk sizes.
        server: Peer id whose output is checked.
        blocks: The hop's ``(start, end)``.
        inputs: Every input the hop has held, this step's last: [batch, position + new, hidden].
        output: What the server answered for this step's ``new`` positions.
        avoid: Peers never to ask (already convicted or suspected in this session).
    """
    start, end = blocks
    new = output.shape[1]
    opinions = [Opinion((server,), 0)]
    outputs = [output]
    used = {server, *avoid}
    dtypes = {_dtype(manager, server)}
    while not settled(opinions) and len(opinions) < MAX_OPINIONS:
        route = manager.plan_replica(
            start, end, exclude=used, adapter=config.active_adapter, quant=_quant(manager, server)
        )
        if route is None:
            break
        peers = tuple(h.peer_id for h in route)
        used.update(peers)
        try:
            full = await recompute(manager, p2p, config, [(h.peer_id, h.start, h.end) for h in route], inputs)
        except PeerError as e:  # a replica that fails is no opinion; try another
            culprit = e.peer_id if e.peer_id in peers else peers[0]
            manager.ban(culprit, f"spot check: {e}")
            continue
        dtypes.update(_dtype(manager, p) for p in peers)
        mine = full[:, -new:]
        rel_tol = tolerance(dtypes)
        group = next((g for g, seen in enumerate(outputs) if outputs_agree(mine, seen, rel_tol)), None)
        if group is None:
            outputs.append(mine)
            group = len(outputs) - 1
        opinions.append(Opinion(peers, group))
    judgement = judge(opinions)
    logger.debug(
        "spot check of %s on %d:%d: %s (%d opinions)", short_peer(server), start, end, judgement.verdict, len(opinions)
    )
    return judgement


def _dtype(manager: SequenceManager, peer: str) -> str:
    span = manager.spans.get(peer)
    return span.record.dtype if span is not None else "unknown"


def _quant(manager: SequenceManager, peer: str) -> str:
    span = manager.spans.get(peer)
    return span.record.quant if span is not None else "none"

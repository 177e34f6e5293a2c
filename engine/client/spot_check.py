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

from corolla.engine.client.context import ClientContext
from corolla.engine.client.remote import remote_forward
from corolla.engine.client.verify import output_problem, outputs_agree, tolerance
from corolla.engine.errors import PeerError, short_peer
from corolla.engine.routing.sequence_manager import SequenceManager
from corolla.engine.routing.trust import MAX_OPINIONS, Judgement, Opinion, judge, settled, silent_bound

logger = logging.getLogger(__name__)


async def recompute(context: ClientContext, route: list[tuple[str, int, int]], x: torch.Tensor) -> torch.Tensor:
    """Stateless forward of ``x`` [batch, length, hidden] through ``route`` ((peer, start, end) hops)."""
    manager, config = context.manager, context.config
    for peer, start, end in route:
        timeout = silent_bound(
            manager.round_trip(peer),
            x.shape[0] * x.shape[1],
            end - start,
            manager.believed_block_s(peer),
            floor_s=config.stall_timeout,
            ceiling_s=config.request_timeout,
        )
        out = await remote_forward(
            context.p2p,
            peer,
            start,
            end,
            x,
            config.max_chunk_bytes,
            timeout,
            proof=context.proof(peer),
            adapter=config.active_adapter,
        )
        problem = output_problem(out, x.shape, x.dtype)
        if problem is not None:
            raise PeerError(f"server {short_peer(peer)} {problem}", peer_id=peer)
        x = out
    return x


async def spot_check(
    context: ClientContext,
    server: str,
    blocks: tuple[int, int],
    inputs: torch.Tensor,
    output: torch.Tensor,
    avoid: Collection[str],
) -> Judgement:
    """Judge ``server``'s ``output`` [batch, new, hidden] for blocks ``blocks`` given the hop's ``inputs``.

    Args:
        context: The client: its routes (replicas of the hop's blocks, measurements), P2P peer, timeouts.
        server: Peer id whose output is checked.
        blocks: The hop's ``(start, end)``.
        inputs: Every input the hop has held, this step's last: [batch, position + new, hidden].
        output: What the server answered for this step's ``new`` positions.
        avoid: Peers never to ask (already convicted or suspected in this session).
    """
    manager, config = context.manager, context.config
    start, end = blocks
    new = output.shape[1]
    opinions = [Opinion((server,), 0)]
    outputs = [output]
    used = {server, *avoid, *manager.failed_within(config.update_period)}
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
            full = await recompute(context, [(h.peer_id, h.start, h.end) for h in route], inputs)
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
    span = manager.span(peer)
    return span.record.dtype if span is not None else "unknown"


def _quant(manager: SequenceManager, peer: str) -> str:
    span = manager.span(peer)
    return span.record.quant if span is not None else "none"

"""Failover: a fresh route over a broken hop's blocks, its history replayed into the new servers' caches."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.hops import RETRYABLE, Hop, chunks, close_hops, culprit, describe_hops, step_timeout
from corolla.engine.client.opening import open_route
from corolla.engine.client.verify import output_problem
from corolla.engine.errors import ProtocolError, short_peer

logger = logging.getLogger(__name__)


async def replay(
    context: ClientContext,
    session_id: str,
    hops: list[Hop],
    history: torch.Tensor | None,
    next_step_id: Callable[[], int],
) -> None:
    """Send the inputs of every position the session holds through ``hops`` (rebuilding their caches)."""
    x = history
    for hop in hops:
        if x is None:
            return
        outputs: list[torch.Tensor] = []
        position = 0
        for chunk in chunks(x, context.config.max_chunk_bytes):
            step_id = next_step_id()
            timeout = step_timeout(context, hop.stream.peer_id, chunk.shape[0] * chunk.shape[1], hop.end - hop.start)
            out = await hop.stream.step(session_id, chunk, position, step_id, timeout)
            problem = output_problem(out, chunk.shape, chunk.dtype)
            if problem is not None:
                raise ProtocolError(f"server {short_peer(hop.stream.peer_id)} {problem}", peer_id=hop.stream.peer_id)
            outputs.append(out)
            position += chunk.shape[1]
        hop.inputs = [x]
        x = torch.cat(outputs, dim=1)


async def replace_hop(
    context: ClientContext,
    session_id: str,
    broken: Hop,
    *,
    position: int,
    max_length: int,
    batch_size: int,
    avoid: Collection[str],
    next_step_id: Callable[[], int],
) -> list[Hop]:
    """Close ``broken``, open a fresh route over its blocks and replay its first ``position`` inputs into it.

    Returns the new hops, which take ``broken``'s place in the session's route.
    """
    config = context.config
    await broken.stream.close(session_id)
    history = broken.history(position)
    began = time.perf_counter()
    exclude = {broken.stream.peer_id, *avoid}
    for attempt in range(config.max_retries + 1):
        new_hops = await open_route(
            context,
            session_id,
            broken.start,
            broken.end,
            max_length=max_length,
            batch_size=batch_size,
            exclude=exclude,
            avoid=avoid,
        )
        try:
            await replay(context, session_id, new_hops, history, next_step_id)
        except RETRYABLE as e:
            await close_hops(new_hops, session_id)
            failed = culprit(e, new_hops)
            context.manager.ban(failed, str(e))
            exclude.add(failed)
            if attempt == config.max_retries:
                raise
            continue
        break
    logger.info(
        "failover: blocks %d:%d moved to %s, replayed %d tokens in %.2f s",
        broken.start,
        broken.end,
        describe_hops(new_hops),
        position,
        time.perf_counter() - began,
    )
    return new_hops

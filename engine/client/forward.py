"""The stateless inference forward: hidden states through every remote block, retrying other servers."""

from __future__ import annotations

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.remote import remote_forward
from corolla.engine.errors import PeerUnavailableError


def stateless_forward(context: ClientContext, hidden: torch.Tensor) -> torch.Tensor:
    """Outputs of the last block for ``hidden`` [batch, length, hidden] (wire form), no cache, no gradients.

    Each try takes a load-spreading route; a server that fails is banned and the whole forward is
    re-planned, up to ``max_retries`` times.
    """
    cfg, manager = context.config, context.manager
    for attempt in range(cfg.max_retries + 1):
        route = manager.plan_forward()
        x = hidden
        try:
            for hop in route:
                x = context.loop.run(
                    remote_forward(
                        context.p2p,
                        hop.peer_id,
                        hop.start,
                        hop.end,
                        x,
                        cfg.max_chunk_bytes,
                        cfg.request_timeout,
                        proof=context.proof(hop.peer_id),
                        adapter=cfg.active_adapter,
                    )
                )
                manager.mark_ok(hop.peer_id)  # it answered well: forget its past failures
            return x
        except PeerUnavailableError as e:
            if attempt == cfg.max_retries:
                raise
            manager.ban(hop.peer_id, str(e))  # the peer we talked to, whatever the error says
    raise AssertionError("unreachable")

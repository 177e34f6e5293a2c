"""Opening a session's route: plan blocks, probe servers never heard from, open a stream on every hop.

A server carries a session only once it answered its probe with this client's protocol version, this
model and a span that holds the hop's blocks; every server that fails (probe or open) is left out and
planning goes on while untried servers remain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from corolla.engine.client.context import ClientContext
from corolla.engine.client.hops import RETRYABLE, Hop, close_hops, step_timeout
from corolla.engine.client.remote import HopStream, remote_info
from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.errors import (
    CacheFullError,
    MissingBlocksError,
    NoRouteError,
    PeerError,
    ProtocolError,
    short_peer,
)
from corolla.engine.routing.trust import probe_problem, silent_bound

PROBE_BATCH = 16
"""Servers probed at once when a route needs a new one (the route's own, then other candidates)."""


def probe_timeout(context: ClientContext) -> float:
    """Seconds a new server may take to answer its probe: tied to the round trips measured so far.

    Five times the median round trip of the servers already probed (at least ``stall_timeout``);
    ``connect_timeout`` before any was measured.
    """
    config = context.config
    typical = context.manager.typical_ping()
    if typical is None:
        return config.connect_timeout
    return silent_bound(typical, 0, 0, 0.0, floor_s=config.stall_timeout, ceiling_s=config.connect_timeout)


async def probe(
    context: ClientContext, hops: list[Hop], start: int, end: int, exclude: set[str]
) -> list[tuple[Hop, PeerError]]:
    """Ask every server of ``hops`` not yet probed for its info; the hops whose server failed, and why.

    A server carries a session only once it answered with this client's protocol version, this model
    and a span that holds the hop's blocks (a record alone is a claim anyone could make). Up to
    :data:`PROBE_BATCH` other unprobed servers of the same blocks are probed at the same time, so a
    swarm full of fake records costs a few rounds of probes, not one round per fake; those that fail
    join ``exclude``.
    """
    manager = context.manager
    new = [hop for hop in hops if not manager.is_probed(hop.stream.peer_id)]
    if not new:
        return []
    extra = manager.unprobed(start, end, exclude | {h.stream.peer_id for h in hops}, PROBE_BATCH - len(new))
    candidates = [*new, *(Hop(HopStream(p, max(start, s), min(end, e))) for p, s, e in extra)]

    async def probe_one(hop: Hop) -> None:
        peer = hop.stream.peer_id
        began = time.perf_counter()
        info = await remote_info(context.p2p, peer, probe_timeout(context), proof=context.proof(peer))
        problem = probe_problem(info, version=PROTOCOL_VERSION, model=manager.model, start=hop.start, end=hop.end)
        if problem is not None:
            raise ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer)
        manager.record_probe(peer, time.perf_counter() - began)
        if info.get("forwarding") is True:  # servers of older versions relay through the client only
            manager.note_forwarder(peer)

    results = await asyncio.gather(*(probe_one(hop) for hop in candidates), return_exceptions=True)
    failed = []
    for i, (hop, result) in enumerate(zip(candidates, results, strict=True)):
        if isinstance(result, PeerError):
            if i < len(new):
                failed.append((hop, result))
            else:
                manager.ban(hop.stream.peer_id, str(result))
                exclude.add(hop.stream.peer_id)
        elif isinstance(result, BaseException):
            raise result
    return failed


async def open_route(
    context: ClientContext,
    session_id: str,
    start: int,
    end: int,
    *,
    max_length: int,
    batch_size: int,
    exclude: Collection[str],
    avoid: Collection[str],
) -> list[Hop]:
    """Plan blocks ``start..end-1`` and open a stream on every hop, retrying other servers on failure.

    Every server that fails (its probe or its open) is left out for the rest of this call, and
    planning goes on while untried servers remain: fifty fake records cost fifty quick failures,
    not the whole generation. The sequence manager re-reads the swarm (fresh from the DHT) before
    it reports blocks as missing, so a server that joined since the last read is found here. When
    only servers we already failed announce some blocks (NoRouteError: their records outlive them
    for the record TTL, and a busy server may have missed one deadline), every one of them gets one
    last try after a short pause, bans aside; if those fail too, the blocks are unreachable and
    NoRouteError (a MissingBlocksError) says so, with the last failure as its cause, instead of
    retrying dead servers for minutes.
    Peers in ``avoid`` (caught lying in this session) are never tried.
    """
    manager, config = context.manager, context.config
    loop = asyncio.get_running_loop()
    last_chance = False
    cache_full: CacheFullError | None = None  # servers that answered but had no room are not "missing"
    tried: set[str] = set()
    last_error: BaseException | None = None  # the last failure of a tried server: the cause we report
    left_out = {*exclude, *avoid}
    while True:  # each round leaves out at least one more server, so it ends
        try:
            route = await loop.run_in_executor(
                None,
                manager.plan_inference,
                start,
                end,
                max_length,
                frozenset(left_out),
                last_chance,
                config.active_adapter,
            )
        except MissingBlocksError as e:
            if cache_full is not None:
                raise CacheFullError(
                    f"no server of blocks {start}:{end} has room: {cache_full}", peer_id=cache_full.peer_id
                ) from e
            if not isinstance(e, NoRouteError):
                raise
            if last_chance:  # every candidate failed twice, bans aside
                if last_error is None:
                    raise
                raise NoRouteError(manager.model, e.blocks, sorted(tried), manager.source) from last_error
            last_chance, left_out = True, set(avoid)
            await asyncio.sleep(config.min_backoff)
            continue
        hops = [Hop(HopStream(h.peer_id, h.start, h.end)) for h in route]
        tried.update(h.peer_id for h in route)
        failed: list[tuple[Hop, BaseException]] = list(await probe(context, hops, start, end, left_out))
        if not failed:
            # Open every hop at once: one round trip for the whole route, not one per server.
            results = await asyncio.gather(
                *(
                    hop.stream.open(
                        context.p2p,
                        session_id,
                        max_length,
                        batch_size,
                        config.connect_timeout,
                        step_timeout(context, hop.stream.peer_id, 0, 0),
                        proof=context.proof(hop.stream.peer_id),
                        contributor=context.claim(hop.stream.peer_id),
                        adapter=config.active_adapter,
                    )
                    for hop in hops
                ),
                return_exceptions=True,
            )
            failed = [(hop, r) for hop, r in zip(hops, results, strict=True) if isinstance(r, BaseException)]
            if not failed:
                return hops
            await close_hops(hops, session_id)
        for hop, error in failed:
            if not isinstance(error, RETRYABLE):
                raise error
            manager.ban(hop.stream.peer_id, str(error))
            left_out.add(hop.stream.peer_id)
            last_error = error
            if isinstance(error, CacheFullError):
                cache_full = error

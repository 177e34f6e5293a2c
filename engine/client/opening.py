"""Opening a session's route: plan blocks, probe servers never heard from, open a stream on every hop.

A server carries a session only once it answered its probe with this client's protocol version, this
model and a span that holds the hop's blocks; every server that fails (probe or open) is left out and
planning goes on while untried servers remain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

from corolla.engine.client.challenge import challenge, observed_groups
from corolla.engine.client.context import ClientContext
from corolla.engine.client.hops import RETRYABLE, Hop, close_hops, step_timeout
from corolla.engine.client.remote import HopStream, remote_info
from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.errors import (
    CacheFullError,
    MissingBlocksError,
    NoRouteError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    short_peer,
)
from corolla.engine.routing.peer_groups import cap_per_group
from corolla.engine.routing.trust import probe_problem, silent_bound

PROBE_BATCH = 16
"""Servers probed at once when a route needs a new one (the route's own, then other candidates)."""
RACE_GRACE_S = 0.05
"""Seconds the route's own probes get, at least, once other candidates passed theirs (then as long again as
the probing took so far) before the route is planned through servers already probed instead."""

HEAD_START_S = 0.25
"""Seconds at most the route's own servers are probed alone (see :func:`head_start`); as long again, each
further batch of candidates waits for one of the running probes to pass before the next batch starts."""
MAX_PROBE_BATCHES = 4
"""Batches of other candidates probed at most for one route (the route's own probes bound the rest)."""

_BACKGROUND: set[asyncio.Task[None]] = set()  # probes left running by a race (each bounded by its timeout)
logger = logging.getLogger(__name__)


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


def head_start(context: ClientContext) -> float:
    """Seconds the route's own servers get to pass their probes before other candidates are probed beside them:
    twice the median round trip measured so far, at least :data:`RACE_GRACE_S`, at most :data:`HEAD_START_S`."""
    typical = context.manager.typical_ping()
    return HEAD_START_S if typical is None else min(HEAD_START_S, max(RACE_GRACE_S, 2 * typical))


def _ban_if_failed(context: ClientContext, task: asyncio.Task[None]) -> None:
    """A probe left running ended: ban its server if it failed (it is then left out of later routes)."""
    _BACKGROUND.discard(task)
    if task.cancelled():
        return
    error = task.exception()
    if isinstance(error, PeerError) and error.peer_id is not None:
        context.manager.ban(error.peer_id, str(error))
    elif error is not None:
        logger.debug("probe failed: %s", error)


async def probe(
    context: ClientContext, hops: list[Hop], start: int, end: int, exclude: set[str]
) -> tuple[list[tuple[Hop, PeerError]], bool]:
    """Probe every server of ``hops`` not yet probed; the hops whose server failed and why, and whether the
    route's own probes were left running because servers already probed cover the blocks.

    A server carries a session only once it answered its info with this client's protocol version, this
    model and a span that holds the hop's blocks (a record alone is a claim anyone could make), and ran one
    real one-token step within the probe's time bound (``challenge.py``: a server that answers info but
    never serves inference fails here). Up to :data:`PROBE_BATCH` other unprobed servers of the same blocks
    are probed too, at most ``probe_per_group`` of any address group the client is connected to (identities
    are free, addresses are not), so a swarm full of fake or silent identities costs one round of parallel
    probes, not one silence per identity; those that fail are banned and join ``exclude``. They start once
    the route's own servers had a short head start (:func:`head_start`): when those passed within it, the
    others are probed in the background (found for audits and failover) and this returns at once. While
    nobody passes, a further batch starts every head start (:data:`MAX_PROBE_BATCHES` in all). When probed
    servers (these candidates, or those of an earlier round probed in the background) cover the blocks while
    the route's own probes are still running, this returns without waiting for a silent server (True): the
    caller plans through probed servers; the probes left running ban their servers if they fail.
    """
    manager, config = context.manager, context.config
    new = [hop for hop in hops if not manager.is_probed(hop.stream.peer_id)]
    if not new:
        return [], False
    timeout = probe_timeout(context)

    async def probe_one(hop: Hop) -> None:
        peer = hop.stream.peer_id
        manager.begin_probe(peer)
        try:
            async with asyncio.timeout(timeout):
                began = time.perf_counter()
                info = await remote_info(context.p2p, peer, timeout, proof=context.proof(peer))
                ping = time.perf_counter() - began
                problem = probe_problem(
                    info, version=PROTOCOL_VERSION, model=manager.model, start=hop.start, end=hop.end
                )
                if problem is not None:
                    raise ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer)
                await challenge(context, peer, hop.start, info, timeout)
        except TimeoutError as e:
            raise PeerUnavailableError(
                peer, f"it did not answer its probe (info and a one-token step) within {timeout:.1f} s"
            ) from e
        finally:
            manager.end_probe(peer)
        manager.record_probe(peer, ping)
        if info.get("forwarding") is True:  # servers of older versions relay through the client only
            manager.note_forwarder(peer)

    ours = [asyncio.ensure_future(probe_one(hop)) for hop in new]
    loop = asyncio.get_running_loop()
    began = loop.time()
    # The route's own servers get a head start: when they pass within it, the other candidates are probed in
    # the background (for audits and failover) instead of competing with them for this client's daemon.
    await asyncio.wait(ours, timeout=head_start(context))
    head_passed = all(t.done() and t.exception() is None for t in ours)
    route_peers = {h.stream.peer_id for h in hops}
    candidates = list(new)
    theirs: list[asyncio.Task[None]] = []

    async def widen() -> None:
        """Probe up to :data:`PROBE_BATCH` more candidates (never probed nor being probed) beside those running."""
        room = PROBE_BATCH - len(new) if len(candidates) == len(new) else PROBE_BATCH
        tried = [h.stream.peer_id for h in candidates[len(new) :]]
        others = manager.unprobed(start, end, exclude | route_peers | set(tried), 4 * PROBE_BATCH)
        groups = await observed_groups(context)
        # the candidates of earlier batches count towards their group's cap
        capped = cap_per_group([*tried, *(p for p, _, _ in others)], groups, config.probe_per_group)
        keep = [p for p in capped if p not in tried][:room]
        spans = {p: (s, e) for p, s, e in others}
        extra = [Hop(HopStream(p, max(start, spans[p][0]), min(end, spans[p][1]))) for p in keep]
        candidates.extend(extra)
        theirs.extend(asyncio.ensure_future(probe_one(hop)) for hop in extra)

    await widen()
    batches, widened_at = 1, loop.time()
    period = head_start(context)
    raced = False
    while not head_passed and not all(t.done() for t in ours):
        pending = [t for t in (*ours, *theirs) if not t.done()]
        wait = max(0.0, widened_at + period - loop.time()) if batches < MAX_PROBE_BATCHES else period
        await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if any(t.done() and t.exception() is not None for t in ours):
            # The route fails anyway: give the other candidates a moment (the next plan prefers those that
            # passed), then re-plan.
            waiting = [t for t in theirs if not t.done()]
            if waiting:
                await asyncio.wait(waiting, timeout=max(RACE_GRACE_S, loop.time() - began))
            break
        silent = {h.stream.peer_id for h, t in zip(new, ours, strict=True) if not t.done()}
        if silent and manager.plan_probed(start, end, exclude | silent, config.active_adapter) is not None:
            # Servers that passed (these candidates, or an earlier round's still probed in the background)
            # cover the blocks: the route's own get as long again, then the route goes through those.
            await asyncio.wait([t for t in ours if not t.done()], timeout=max(RACE_GRACE_S, loop.time() - began))
            silent = {h.stream.peer_id for h, t in zip(new, ours, strict=True) if not t.done()}
            if silent and manager.plan_probed(start, end, exclude | silent, config.active_adapter) is not None:
                raced = True
                break
        elif batches < MAX_PROBE_BATCHES and loop.time() >= widened_at + period:
            # Nobody passed within the bound (silent identities hold their probes open): more candidates.
            await widen()
            batches, widened_at = batches + 1, loop.time()
    tasks = [*ours, *theirs]
    failed = []
    for i, (hop, task) in enumerate(zip(candidates, tasks, strict=True)):
        if not task.done():
            _BACKGROUND.add(task)
            task.add_done_callback(lambda t: _ban_if_failed(context, t))
            continue
        error = task.exception()
        if isinstance(error, PeerError):
            if i < len(new):
                failed.append((hop, error))
            else:
                manager.ban(hop.stream.peer_id, str(error))
                exclude.add(hop.stream.peer_id)
        elif error is not None:
            raise error
    return failed, raced


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
    probed_only = False  # a race left the route's probes running: plan through probed servers while they cover
    while True:  # each round leaves out at least one more server (or plans through probed ones only), so it ends
        try:
            if probed_only:
                planned = manager.plan_probed(start, end, left_out, config.active_adapter, max_length)
            else:  # from the last read, here (no worker thread) unless the DHT must be read first
                planned = manager.plan_known(start, end, max_length, left_out, last_chance, config.active_adapter)
            probed_only = False
            route = (
                planned
                if planned is not None
                else await loop.run_in_executor(
                    None,
                    manager.plan_inference,
                    start,
                    end,
                    max_length,
                    frozenset(left_out),
                    last_chance,
                    config.active_adapter,
                )
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
        probe_failed, raced = await probe(context, hops, start, end, left_out)
        failed: list[tuple[Hop, BaseException]] = list(probe_failed)
        probed_only = raced or bool(failed)  # a server failed its probe: plan through probed ones first
        if raced:
            continue
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

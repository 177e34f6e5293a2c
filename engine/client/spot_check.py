"""Audits: recompute a hop's run of unaudited steps on independent replicas and judge who told the truth.

The shell around the pure parts (:mod:`corolla.engine.client.verify` compares tensors,
:mod:`corolla.engine.routing.trust` schedules audits, picks auditors and judges,
:mod:`corolla.engine.routing.groups` groups addresses): it asks replicas of address groups not yet heard,
runs the hop's whole history through them as one stateless forward, and stops once two groups agree.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection
from dataclasses import dataclass

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.remote import remote_forward
from corolla.engine.client.verify import output_problem, outputs_agree, tolerance
from corolla.engine.errors import PeerError, short_peer
from corolla.engine.routing.groups import addrs_group
from corolla.engine.routing.sequence_manager import SequenceManager
from corolla.engine.routing.trust import (
    MAX_OPINIONS,
    Judgement,
    Opinion,
    Verdict,
    choose_auditor,
    judge,
    settled,
    silent_bound,
    untried_auditors,
)

logger = logging.getLogger(__name__)

PEERS_TIMEOUT_S = 2.0
"""Seconds to ask the p2p daemon where its connections come from (else every peer is its own group)."""
AUDIT_RACE = 3
"""Replicas never probed that are asked at once when no probed replica of another address group is left."""
AUDIT_RACES = 2
"""Rounds of such replicas per audit at most: many silent identities cost two parallel waits, not one each."""
AUDIT_GRACE_S = 0.05
"""Seconds the other replicas of a round get, at least, once one answered (then as long again as it took)."""


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


_KNOWN_GROUPS: dict[str, str] = {}
"""Last address group seen for each peer in this process (a peer that hung up keeps its group)."""
MAX_KNOWN_GROUPS = 10_000
"""Peers remembered at most (the oldest are forgotten first)."""


async def peer_groups(context: ClientContext) -> dict[str, str]:
    """Address group of every peer this process has been connected to, from the addresses the p2p daemon
    connected to (the last seen; a peer whose connection closed keeps the group it had)."""
    try:
        peers = await asyncio.wait_for(context.p2p.list_peers(), PEERS_TIMEOUT_S)
    except Exception as e:  # unknown origins: each peer counts as its own group
        logger.debug("listing connected peers: %s", e)
        peers = []
    for info in peers:
        group = addrs_group([str(a) for a in info.addrs])
        if group is not None:
            _KNOWN_GROUPS.pop(str(info.peer_id), None)
            _KNOWN_GROUPS[str(info.peer_id)] = group
    while len(_KNOWN_GROUPS) > MAX_KNOWN_GROUPS:
        _KNOWN_GROUPS.pop(next(iter(_KNOWN_GROUPS)))
    return dict(_KNOWN_GROUPS)


@dataclass(frozen=True)
class AuditOutcome:
    """An audit's judgement and, when it convicts the server, the evidence a report carries."""

    judgement: Judgement
    truth: torch.Tensor | None = None  # the output two address groups agreed on, [batch, n, hidden]
    witnesses: tuple[str, ...] = ()  # the peers that computed it
    rel_tol: float = 0.0  # the tolerance the outputs were compared with


async def audit(
    context: ClientContext,
    server: str,
    blocks: tuple[int, int],
    inputs: torch.Tensor,
    claimed: torch.Tensor,
    avoid: Collection[str],
    rng: random.Random,
) -> AuditOutcome:
    """Judge ``server``'s ``claimed`` outputs [batch, n, hidden] of the last ``n`` positions of ``inputs``.

    The hop's whole history ``inputs`` [batch, position, hidden] goes through an independent replica in one
    stateless forward (a prefill: far cheaper per token than the decode steps it checks). The replica is
    never of the server's address group; among the others that passed their probe, one with the longest
    honest record is picked at random (:func:`~corolla.engine.routing.trust.choose_auditor`). When no probed
    replica qualifies, a few never probed, one per address group, are asked at once
    (:func:`~corolla.engine.routing.trust.untried_auditors`), at most :data:`AUDIT_RACES` such rounds: a swarm
    of silent identities costs a couple of parallel waits, not one silence each, and a replica that failed
    is never asked again while its failure is recent. A disagreement asks further replicas of yet other
    groups until two groups agree (:func:`~corolla.engine.routing.trust.settled`).

    Args:
        context: The client: its routes (replicas of the hop's blocks, records), P2P peer, timeouts.
        server: Peer id whose outputs are checked.
        blocks: The hop's ``(start, end)``.
        inputs: Every input the hop has held, [batch, position, hidden].
        claimed: What the server answered for the last ``n`` positions.
        avoid: Peers never to ask (already convicted or suspected in this session).
        rng: The session's generator (auditor choice).

    Returns:
        The judgement, with the agreed output and who computed it when the server is convicted.
    """
    manager, config = context.manager, context.config
    start, end = blocks
    n = claimed.shape[1]
    used = {server, *avoid, *manager.failed_within(config.update_period)}
    adapter, quant = config.active_adapter, _quant(manager, server)
    if not _any_replica(manager, start, end, used, adapter, quant):
        # Nobody else could give an opinion: unverified, without asking the p2p daemon where peers are (a round
        # trip at every step of a span with a single server, and at the end of every generation).
        logger.debug("audit of %s on %d:%d: no replica to ask", short_peer(server), start, end)
        return AuditOutcome(judge([Opinion((server,), 0)]))
    groups = await peer_groups(context)
    operator = groups.get(server, server)
    opinions = [Opinion((server,), 0, operator)]
    outputs = [claimed]
    heard = {operator}
    dtypes = {_dtype(manager, server)}
    rel_tol = tolerance(dtypes)
    untried_rounds = 0  # rounds that asked servers never probed (bounded: AUDIT_RACES)
    while not settled(opinions) and len(opinions) < MAX_OPINIONS:
        candidates = manager.replicas(start, end, used, adapter=adapter, quant=quant)
        probed = [p for p in candidates if manager.is_probed(p)]
        record = {p: manager.checks_passed(p) for p in probed}
        pick = choose_auditor(probed, record=record, groups=groups, exclude_groups=heard, rng=rng)
        probing = manager.probing()  # a silent one holds its probe open: not asked again meanwhile
        untried = untried_auditors(
            [p for p in candidates if p not in record and p not in probing],
            groups=groups,
            exclude_groups=heard,
            rng=rng,
            limit=min(AUDIT_RACE, MAX_OPINIONS - len(opinions)),
        )
        if pick is not None:
            routes = [[(pick, start, end)]]
        elif untried and untried_rounds < AUDIT_RACES:
            untried_rounds += 1
            routes = [[(p, start, end)] for p in untried]
        else:  # no single server of another group holds the whole hop: a route of several, if any
            hops = manager.plan_replica(start, end, exclude=used, adapter=adapter, quant=quant)
            if hops is None or any(groups.get(h.peer_id, h.peer_id) in heard for h in hops):
                break
            if not all(manager.is_probed(h.peer_id) for h in hops):
                if untried_rounds >= AUDIT_RACES:
                    break
                untried_rounds += 1
            routes = [[(h.peer_id, h.start, h.end) for h in hops]]
        for route in routes:
            used.update(p for p, _, _ in route)
        answers = await _first_answers(context, routes, inputs)
        if answers:
            groups = await peer_groups(context)  # now connected: where the replicas really are
        for peers, full in answers:
            who = "+".join(sorted({groups.get(p, p) for p in peers}))
            if any(groups.get(p, p) in heard for p in peers):
                logger.debug("audit of %s: %s shares an address group already heard", short_peer(server), who)
                continue  # one operator's second opinion is no opinion
            heard.update(groups.get(p, p) for p in peers)
            dtypes.update(_dtype(manager, p) for p in peers)
            mine = full[:, -n:]
            rel_tol = tolerance(dtypes)
            group = next((g for g, seen in enumerate(outputs) if outputs_agree(mine, seen, rel_tol)), None)
            if group is None:
                outputs.append(mine)
                group = len(outputs) - 1
            opinions.append(Opinion(peers, group, who))
    judgement = judge(opinions)
    logger.debug(
        "audit of %s on %d:%d, %d steps: %s (%d opinions)",
        short_peer(server),
        start,
        end,
        n,
        judgement.verdict,
        len(opinions),
    )
    if judgement.verdict is not Verdict.SERVER_LIED:
        return AuditOutcome(judgement, rel_tol=rel_tol)
    others = [o.group for o in opinions[1:]]
    truth = next((g for g in others if others.count(g) >= 2), None)
    if truth is None:
        return AuditOutcome(judgement, rel_tol=rel_tol)
    witnesses = tuple(p for o in opinions[1:] if o.group == truth for p in o.peers)
    return AuditOutcome(judgement, outputs[truth], witnesses, rel_tol)


def _any_replica(
    manager: SequenceManager, start: int, end: int, used: Collection[str], adapter: str | None, quant: str
) -> bool:
    """Whether some server outside ``used`` (alone, or on a route of several) computes blocks ``start..end-1``
    with the same adapter and quantization: the candidates an audit's first opinion could come from."""
    if manager.replicas(start, end, used, adapter=adapter, quant=quant):
        return True
    return manager.plan_replica(start, end, exclude=used, adapter=adapter, quant=quant) is not None


async def _first_answers(
    context: ClientContext, routes: list[list[tuple[str, int, int]]], inputs: torch.Tensor
) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Recompute ``inputs`` through every route at once; the answers of those that answered by the time the
    first did, plus a grace as long again (at least :data:`AUDIT_GRACE_S`): a silent replica holds the audit
    no longer than its bound, and only when no other answers. A replica that fails is banned (no opinion)."""
    manager = context.manager
    tasks = [asyncio.ensure_future(recompute(context, route, inputs)) for route in routes]
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        pending = set(tasks)
        while pending and not any(t.done() and t.exception() is None for t in tasks):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending, timeout=max(AUDIT_GRACE_S, loop.time() - began))
    finally:
        for task in tasks:
            task.cancel()  # no-op for those done
        await asyncio.gather(*tasks, return_exceptions=True)
    answers = []
    for route, task in zip(routes, tasks, strict=True):
        peers = tuple(p for p, _, _ in route)
        if task.cancelled():
            continue  # still computing when others had answered: no opinion, no blame
        error = task.exception()
        if isinstance(error, PeerError):  # a replica that fails is no opinion
            culprit = error.peer_id if error.peer_id in peers else peers[0]
            manager.ban(culprit, f"audit: {error}")
        elif error is not None:
            raise error
        else:
            answers.append((peers, task.result()))
    return answers


def _dtype(manager: SequenceManager, peer: str) -> str:
    span = manager.span(peer)
    return span.record.dtype if span is not None else "unknown"


def _quant(manager: SequenceManager, peer: str) -> str:
    span = manager.span(peer)
    return span.record.quant if span is not None else "none"

"""Route planning: which server runs which blocks, chosen from the spans currently announced.

Pure functions over plain data; the sequence manager (the networked shell) measures round-trip
times, keeps the ban list and calls these.

* :func:`plan_inference_route` is for generation, where every token goes through the whole route:
  it finds the route with the least expected seconds per token.
* :func:`plan_forward_route` is for batched forward passes, where the aim is to spread load: it
  picks servers at random, in proportion to their throughput.

Both accept a sub-range ``[start, end)`` so that failover can re-plan only the broken part.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from corolla.engine.errors import MissingBlocksError, NoRouteError
from corolla.engine.routing.spans import RemoteSpan, missing_blocks
from corolla.engine.routing.trust import believed_block_seconds

__all__ = [
    "CACHE_PENALTY_S",
    "DEFAULT_RTT_S",
    "HOP_OVERHEAD_S",
    "UNKNOWN_BLOCK_S",
    "RouteHop",
    "block_seconds",
    "plan_forward_route",
    "plan_inference_route",
    "relay_leg_seconds",
]

DEFAULT_RTT_S = 0.05
"""Round-trip time assumed for a server that has not been pinged yet, in seconds."""
HOP_OVERHEAD_S = 0.005
"""Fixed cost of one more hop (serialization, scheduling), in seconds."""
CACHE_PENALTY_S = 100.0
"""Added to a hop on a server without enough free attention cache, in seconds: used only if nothing else."""
UNKNOWN_BLOCK_S = 1.0
"""Seconds per block assumed for a server that announces no speed at all."""


@dataclass(frozen=True)
class RouteHop:
    """One hop of a route: ``peer_id`` runs blocks ``[start, end)``."""

    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of blocks run on this hop."""
        return self.end - self.start


def block_seconds(span: RemoteSpan, measured_s: float | None = None) -> float:
    """Expected seconds for one token through one block of ``span``'s server.

    The announced single-token speed (``inference_rps``), else the batch throughput, else
    :data:`UNKNOWN_BLOCK_S`; an announcement is a claim, so it is capped by plausibility and by
    ``measured_s`` (what this client measured) with :func:`~corolla.engine.routing.trust.believed_block_seconds`.
    """
    announced = UNKNOWN_BLOCK_S
    for speed in (span.record.inference_rps, span.record.throughput):
        if math.isfinite(speed) and speed > 0:
            announced = 1.0 / speed
            break
    return believed_block_seconds(announced, measured_s)


def _usable_spans(
    spans: Mapping[str, RemoteSpan], start: int, end: int, banned: Collection[str], model: str
) -> list[RemoteSpan]:
    """Non-banned spans overlapping ``[start, end)``, in peer id order; raise if a block is uncovered.

    Raises MissingBlocksError (naming every uncovered block) if some block has no server at all, else
    NoRouteError (naming the avoided servers) when every server of the uncovered blocks is banned.
    """
    if not 0 <= start < end:
        raise ValueError(f"cannot plan a route over blocks {start}:{end}; need 0 <= start < end")
    banned_set = set(banned)
    usable = [
        spans[peer_id]
        for peer_id in sorted(spans)
        if peer_id not in banned_set and spans[peer_id].start < end and spans[peer_id].end > start
    ]
    missing = [b for b in missing_blocks({s.peer_id: s for s in usable}, end) if b >= start]
    if missing:
        avoided = [
            p for p in sorted(banned_set & set(spans)) if any(spans[p].start <= b < spans[p].end for b in missing)
        ]
        if any(not any(spans[p].start <= b < spans[p].end for p in avoided) for b in missing):
            raise MissingBlocksError(model, missing)
        raise NoRouteError(model, missing, avoided)
    return usable


def relay_leg_seconds(span: RemoteSpan, rtt: Mapping[str, float], default_rtt: float) -> float:
    """The extra cost of reaching a relayed server: one more network leg (via its relay), in seconds.

    A measured round trip to it already went through the relay: then nothing more. Unmeasured, it costs
    ``default_rtt`` on top of the ``default_rtt`` every unmeasured server gets.
    """
    return default_rtt if span.record.relayed and span.peer_id not in rtt else 0.0


def _rtt_seconds(peer_id: str, rtt: Mapping[str, float], default_rtt: float) -> float:
    value = rtt.get(peer_id, default_rtt)
    return value if math.isfinite(value) and value >= 0 else default_rtt


def plan_inference_route(
    spans: Mapping[str, RemoteSpan],
    start: int,
    end: int,
    *,
    model: str = "model",
    rtt: Mapping[str, float] | None = None,
    banned: Collection[str] = (),
    cache_tokens_needed: int = 0,
    default_rtt: float = DEFAULT_RTT_S,
    hop_overhead: float = HOP_OVERHEAD_S,
    cache_penalty: float = CACHE_PENALTY_S,
    measured_block_s: Mapping[str, float] | None = None,
) -> list[RouteHop]:
    """The route over blocks ``[start, end)`` with the least expected seconds per generated token.

    A shortest path over nodes (block boundary, server): entering a server costs its round-trip
    time plus ``hop_overhead`` (plus ``cache_penalty`` if its free cache is below
    ``cache_tokens_needed``); each block run on it costs :func:`block_seconds`. A hop may use only
    part of a server's span. Every edge goes from boundary ``b`` to ``b + 1``, so the graph is
    acyclic and one sweep over the blocks in order gives the same answer as Dijkstra, in
    ``O(blocks x servers)`` vectorized steps. Ties prefer staying on the same server (fewer hops),
    then the lower peer id.

    Args:
        spans: ``{peer_id: RemoteSpan}`` from :func:`~corolla.engine.routing.spans.spans_from_records`.
        start: First block of the route.
        end: One past the last block of the route.
        model: Model name, for the error message.
        rtt: Measured round-trip times in seconds; servers not in it get ``default_rtt``.
        banned: Peer ids not to use.
        cache_tokens_needed: Attention-cache room the session needs on each server, in tokens.
        default_rtt: Round-trip time assumed for unmeasured servers, in seconds.
        hop_overhead: Fixed cost of each hop, in seconds.
        cache_penalty: Extra cost of a hop on a server short of cache, in seconds.
        measured_block_s: Seconds per token per block this client measured on servers; an announced
            speed faster than the measurement (or than plausible) is not believed.

    Returns:
        Hops in block order; they cover ``[start, end)`` exactly and contiguously.

    Raises:
        MissingBlocksError: Some block in ``[start, end)`` has no server at all.
        NoRouteError: Every server of some block in ``[start, end)`` is banned.
        ValueError: ``[start, end)`` is empty or negative.
    """
    usable = _usable_spans(spans, start, end, banned, model)
    rtt = rtt or {}
    # Per server: the part of its span inside [start, end), the cost of entering it, and of a block.
    first = np.array([max(s.start, start) for s in usable], dtype=np.int64)
    last = np.array([min(s.end, end) for s in usable], dtype=np.int64)
    enter = np.array(
        [
            _rtt_seconds(s.peer_id, rtt, default_rtt)
            + relay_leg_seconds(s, rtt, default_rtt)
            + hop_overhead
            + (cache_penalty if s.record.cache_tokens_left < cache_tokens_needed else 0.0)
            for s in usable
        ]
    )
    measured = measured_block_s or {}
    per_block = np.array([block_seconds(s, measured.get(s.peer_id)) for s in usable])

    num_steps = end - start
    # dist[p]: least cost to reach the current boundary having run the previous block on server p.
    dist = np.full(len(usable), np.inf)
    entered = np.zeros((num_steps, len(usable)), dtype=bool)  # block k: did server p start a hop at k?
    came_from = np.full(num_steps, -1, dtype=np.int64)  # block k: server whose hop ended at k
    for step in range(num_steps):
        block = start + step
        if step == 0:
            between = 0.0
        else:
            came_from[step] = int(np.argmin(dist))
            between = float(dist[came_from[step]])
        start_here = between + enter
        entered[step] = start_here < dist
        dist = np.where(entered[step], start_here, dist) + per_block
        dist[(first > block) | (last <= block)] = np.inf

    hops: list[RouteHop] = []
    server = int(np.argmin(dist))
    hop_end = end
    step = num_steps - 1
    while True:
        while not entered[step, server]:
            step -= 1
        hops.append(RouteHop(usable[server].peer_id, start + step, hop_end))
        if step == 0:
            break
        hop_end = start + step
        server = int(came_from[step])
        step -= 1
    hops.reverse()
    return hops


def plan_forward_route(
    spans: Mapping[str, RemoteSpan],
    start: int,
    end: int,
    *,
    rng: random.Random,
    model: str = "model",
    banned: Collection[str] = (),
) -> list[RouteHop]:
    """A random route over blocks ``[start, end)`` that spreads batched forward passes across the swarm.

    From the current block, pick one of the servers hosting it at random, with probability
    proportional to its announced throughput (servers announcing none get a small weight), and
    run on it as far as its span reaches; repeat from there.

    Args:
        spans: ``{peer_id: RemoteSpan}``.
        start: First block of the route.
        end: One past the last block of the route.
        rng: Source of randomness (seed it for reproducible routes).
        model: Model name, for the error message.
        banned: Peer ids not to use.

    Returns:
        Hops in block order; they cover ``[start, end)`` exactly and contiguously.

    Raises:
        MissingBlocksError: Some block in ``[start, end)`` has no server at all.
        NoRouteError: Every server of some block in ``[start, end)`` is banned.
        ValueError: ``[start, end)`` is empty or negative.
    """
    usable = _usable_spans(spans, start, end, banned, model)
    speeds = [s.record.throughput if math.isfinite(s.record.throughput) else 0.0 for s in usable]
    floor = max(max(speeds) * 1e-3, 1e-9)
    weights = [max(speed, floor) for speed in speeds]
    hops: list[RouteHop] = []
    block = start
    while block < end:
        here = [i for i, s in enumerate(usable) if s.start <= block < s.end]
        pick = rng.choices(here, weights=[weights[i] for i in here])[0]
        hop_end = min(usable[pick].end, end)
        hops.append(RouteHop(usable[pick].peer_id, block, hop_end))
        block = hop_end
    return hops

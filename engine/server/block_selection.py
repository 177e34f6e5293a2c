"""Block selection: which span a server should host so that the swarm's weakest blocks get stronger.

Pure functions over plain data; the server shell reads the spans from the DHT, calls
:func:`choose_best_blocks` when it starts and :func:`should_choose_other_blocks` every minute or so.

The swarm's speed is bounded by its *bottleneck*: the block with the least total throughput
(the sum of the throughputs of the servers hosting it; zero where nobody does). A new server
takes the window that lifts the weakest blocks most; a running server moves only when it can
lift the weakest blocks by a clear margin without creating a new bottleneck where it leaves.

The array-level functions (:func:`choose_best_start`, :func:`better_start`) take per-block
throughputs directly, for callers that keep them up to date themselves (the swarm benchmark).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from corolla.engine.routing.spans import RemoteSpan

__all__ = [
    "better_start",
    "block_throughputs",
    "choose_best_blocks",
    "choose_best_start",
    "should_choose_other_blocks",
]

_RELATIVE_TOLERANCE = 1e-9
"""Throughputs closer than this (relative to the largest) count as equal, so ties are stable."""


def block_throughputs(spans: Mapping[str, RemoteSpan], num_blocks: int, *, exclude: Collection[str] = ()) -> np.ndarray:
    """Total announced throughput hosting each block.

    Args:
        spans: ``{peer_id: RemoteSpan}``.
        num_blocks: Number of blocks in the model; spans past it are clipped.
        exclude: Peer ids to leave out (e.g. the caller itself).

    Returns:
        Float array of shape ``(num_blocks,)``, in tokens/s.
    """
    skip = set(exclude)
    diff = np.zeros(num_blocks + 1)
    for peer_id, span in spans.items():
        first, last = max(span.start, 0), min(span.end, num_blocks)
        if peer_id in skip or last <= first:
            continue
        diff[first] += span.record.throughput
        diff[last] -= span.record.throughput
    return np.maximum(np.cumsum(diff[:-1]), 0.0)


def choose_best_start(throughputs: np.ndarray, num_blocks_to_serve: int, own_throughput: float) -> int:
    """Start of the window whose hosting lifts the swarm's weakest blocks most.

    Every window ``[s, s + n)`` is scored by the per-block throughputs the swarm would have after
    adding ``own_throughput`` to it, sorted from weakest up; the window with the best such list
    (compared weakest first) wins. So a window filling more uncovered blocks always wins, then one
    lifting the bottleneck more, and so on. Ties go to the window with the least throughput now,
    then to the earliest.

    Args:
        throughputs: Current per-block throughputs, shape ``(total_blocks,)``, without the caller.
        num_blocks_to_serve: Span length ``n``; clipped to the number of blocks.
        own_throughput: The caller's throughput, in tokens/s (a positive stand-in is used if 0).

    Returns:
        The start block ``s`` of the chosen window.
    """
    total = len(throughputs)
    n = min(max(num_blocks_to_serve, 1), total)
    if n == total:
        return 0
    base = np.asarray(throughputs, dtype=np.float64)
    scale = max(float(base.max(initial=0.0)), own_throughput, 1.0)
    bump = own_throughput if own_throughput > 0 else scale * 1e-6
    windows = np.arange(total - n + 1)
    blocks = np.arange(total)
    inside = (blocks[None, :] >= windows[:, None]) & (blocks[None, :] < windows[:, None] + n)
    after = base[None, :] + bump * inside  # (windows, total)
    ranked = np.round(np.sort(after, axis=1) / (scale * _RELATIVE_TOLERANCE))
    now = np.round((inside * base[None, :]).sum(axis=1) / (scale * _RELATIVE_TOLERANCE))
    # np.lexsort sorts by its last key first: weakest block after placement (descending), ...,
    # then the window's current total (ascending), then the window start (ascending).
    keys = (windows, now, *(-ranked[:, j] for j in range(total - 1, -1, -1)))
    return int(windows[np.lexsort(keys)[0]])


def better_start(
    others: np.ndarray, current_start: int, num_blocks: int, own_throughput: float, balance_quality: float
) -> int | None:
    """Where a running server should move, or ``None`` to stay.

    It moves to the window :func:`choose_best_start` picks only if the weakest block it would start
    hosting has, without this server, less than ``balance_quality`` times the throughput of the
    weakest block it would stop hosting (blocks in both windows do not count). Then the blocks left
    behind stay stronger than the ones joined, so the swarm's bottleneck cannot fall and the
    weakest of the blocks involved rises by a clear margin; the margin also stops a server from
    moving back and forth.

    Args:
        others: Per-block throughputs without this server, shape ``(total_blocks,)``.
        current_start: First block this server hosts now.
        num_blocks: Length of its span.
        own_throughput: Its throughput, in tokens/s.
        balance_quality: In ``(0, 1]``; lower means moving less readily.

    Returns:
        The new start block, or ``None``.
    """
    target = choose_best_start(others, num_blocks, own_throughput)
    if target == current_start or own_throughput <= 0:
        return None
    blocks = np.arange(len(others))
    now = (blocks >= current_start) & (blocks < current_start + num_blocks)
    then = (blocks >= target) & (blocks < target + num_blocks)
    leave = float(others[now & ~then].min())
    join = float(others[then & ~now].min())
    return target if join < balance_quality * leave else None


def choose_best_blocks(
    num_blocks_to_serve: int, spans: Mapping[str, RemoteSpan], total_blocks: int, own_throughput: float
) -> int:
    """First block a starting server should host, given the spans already in the swarm.

    Args:
        num_blocks_to_serve: How many consecutive blocks the server can hold.
        spans: ``{peer_id: RemoteSpan}`` of the other servers (include those still joining).
        total_blocks: Number of blocks in the model.
        own_throughput: The server's throughput, in tokens/s.

    Returns:
        The start block; the server hosts ``[start, start + min(num_blocks_to_serve, total_blocks))``.
    """
    return choose_best_start(block_throughputs(spans, total_blocks), num_blocks_to_serve, own_throughput)


def should_choose_other_blocks(
    my_peer_id: str,
    spans: Mapping[str, RemoteSpan],
    total_blocks: int,
    balance_quality: float = 0.75,
    *,
    simulate_others: bool = False,
    max_rounds: int = 3,
) -> bool:
    """Whether a running server should restart on other blocks.

    True when :func:`better_start` finds a clearly better window. With ``simulate_others``, also
    true when, after this server moves and every other server (in peer id order, up to
    ``max_rounds`` passes) greedily re-places itself with :func:`choose_best_start`, the swarm's
    bottleneck would exceed today's by the factor ``1 / balance_quality``. That second test finds
    gains a single move cannot show, at a cost of ``O(servers x blocks^2)`` per pass.

    Args:
        my_peer_id: The caller's peer id; its span must be in ``spans``.
        spans: ``{peer_id: RemoteSpan}`` of the whole swarm, the caller included.
        total_blocks: Number of blocks in the model.
        balance_quality: In ``(0, 1]``; lower means moving less readily.
        simulate_others: Also run the whole-swarm re-placement test.
        max_rounds: Passes over the other servers in that test.

    Returns:
        Whether to move. False if the caller is not in ``spans`` or announces no throughput.
    """
    me = spans.get(my_peer_id)
    if me is None or me.record.throughput <= 0:
        return False
    first, last = max(me.start, 0), min(me.end, total_blocks)
    if last <= first:
        return False
    everyone = block_throughputs(spans, total_blocks)
    others = block_throughputs(spans, total_blocks, exclude=(my_peer_id,))
    n, own = last - first, me.record.throughput
    if better_start(others, first, n, own, balance_quality) is not None:
        return True
    target = choose_best_start(others, n, own)
    if not simulate_others or target == first:
        return False

    swarm = others.copy()
    swarm[target : target + n] += own
    placed = [
        [max(s.start, 0), min(s.end, total_blocks) - max(s.start, 0), s.record.throughput]
        for peer_id, s in sorted(spans.items())
        if peer_id != my_peer_id and min(s.end, total_blocks) > max(s.start, 0)
    ]
    for _ in range(max_rounds):
        moved = False
        for server in placed:
            start, length, speed = int(server[0]), int(server[1]), float(server[2])
            swarm[start : start + length] -= speed
            new_start = choose_best_start(swarm, length, speed)
            swarm[new_start : new_start + length] += speed
            moved |= new_start != start
            server[0] = new_start
        if not moved:
            break
    before, after = float(everyone.min()), float(swarm.min())
    return after > 0 and before < balance_quality * after

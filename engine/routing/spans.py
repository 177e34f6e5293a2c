"""Spans: which consecutive blocks each server hosts, rebuilt from the records read off the DHT.

Pure functions over plain data. The DHT holds one record per (block, server); a server therefore
appears once under every block it hosts, each time with the same record. Reads can be partial
(some keys expired or timed out) and records can disagree (a server that just moved still has old
records under its old blocks), so :func:`spans_from_records` picks one record per server and keeps
only entries that agree with it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from corolla.engine.dht.records import ServerRecord, ServerState

__all__ = ["RemoteSpan", "block_coverage", "missing_blocks", "spans_from_records"]


@dataclass(frozen=True)
class RemoteSpan:
    """Blocks ``[start, end)`` hosted by one server, with the record it announced.

    Attributes:
        peer_id: The server's peer id.
        start: First block served.
        end: One past the last block served.
        record: The record the span was taken from (speed, free cache, state, ...).
    """

    peer_id: str
    start: int
    end: int
    record: ServerRecord

    @property
    def length(self) -> int:
        """Number of blocks in the span."""
        return self.end - self.start

    def covers(self, block: int) -> bool:
        """Whether the span hosts ``block``."""
        return self.start <= block < self.end


def spans_from_records(
    records_by_block: Mapping[int, Mapping[str, ServerRecord]],
    *,
    num_blocks: int | None = None,
    states: Collection[ServerState] = (ServerState.ONLINE,),
) -> dict[str, RemoteSpan]:
    """Rebuild one span per server from the records found under each block.

    A server's span is the ``[start, end)`` of its record. When a server's records announce
    different spans (it moved and old ones have not expired yet), the span found under the most
    blocks wins; ties go to the span seen under the lowest block. The span's record is the one
    found under its lowest block. Entries filed under a block outside their own record's span are
    ignored, as are records in other states.

    Args:
        records_by_block: ``{block: {peer_id: record}}`` as read from the DHT (may be partial).
        num_blocks: If given, spans are clipped to ``[0, num_blocks)``; a span entirely past it
            is dropped.
        states: Server states to keep. Pass ``(ServerState.JOINING, ServerState.ONLINE)`` for block
            selection, where servers still loading their blocks must count.

    Returns:
        ``{peer_id: RemoteSpan}``, in peer id order.
    """
    keep = {int(state) for state in states}
    # (peer, start, end) -> [blocks announcing that span, lowest such block, record found there]
    seen: dict[tuple[str, int, int], list[Any]] = {}
    for block, by_peer in records_by_block.items():
        for peer_id, record in by_peer.items():
            start, end = record.start, record.end
            if not (start <= block < end) or int(record.state) not in keep:
                continue
            entry = seen.get((peer_id, start, end))
            if entry is None:
                seen[(peer_id, start, end)] = [1, block, record]
            else:
                entry[0] += 1
                if block < entry[1]:
                    entry[1], entry[2] = block, record
    best: dict[str, tuple[int, int, int, int, ServerRecord]] = {}
    for (peer_id, start, end), (count, lowest, record) in seen.items():
        option = (-count, lowest, start, end, record)
        if peer_id not in best or option[:2] < best[peer_id][:2]:
            best[peer_id] = option

    spans: dict[str, RemoteSpan] = {}
    for peer_id in sorted(best):
        _, _, start, end, record = best[peer_id]
        clipped_end = end if num_blocks is None else min(end, num_blocks)
        if clipped_end > start:
            spans[peer_id] = RemoteSpan(peer_id=peer_id, start=start, end=clipped_end, record=record)
    return spans


def block_coverage(spans: Mapping[str, RemoteSpan], num_blocks: int) -> list[list[str]]:
    """Peers hosting each block.

    Args:
        spans: ``{peer_id: RemoteSpan}``.
        num_blocks: Number of blocks in the model; spans past it are clipped.

    Returns:
        One sorted list of peer ids per block ``0 .. num_blocks - 1`` (empty where nobody serves).
    """
    coverage: list[list[str]] = [[] for _ in range(num_blocks)]
    for peer_id in sorted(spans):
        span = spans[peer_id]
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            coverage[block].append(peer_id)
    return coverage


def missing_blocks(spans: Mapping[str, RemoteSpan], num_blocks: int) -> list[int]:
    """Blocks of ``[0, num_blocks)`` that no span covers, in increasing order."""
    covered = [False] * num_blocks
    for span in spans.values():
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            covered[block] = True
    return [block for block, ok in enumerate(covered) if not ok]

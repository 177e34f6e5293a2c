"""The thin shell around the planner: reads the swarm from the DHT, keeps bans, plans routes."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from corolla.engine.config import ClientConfig
from corolla.engine.dht.announce import read_records
from corolla.engine.dht.records import ServerState
from corolla.engine.errors import MissingBlocksError, short_peer
from corolla.engine.routing.planner import RouteHop, plan_forward_route, plan_inference_route
from corolla.engine.routing.spans import RemoteSpan, spans_from_records

logger = logging.getLogger(__name__)


@dataclass
class _Ban:
    until: float
    strikes: int


def describe_route(route: list[RouteHop]) -> str:
    """One short line: ``0:15 via …a1b2c3 → 15:30 via …d4e5f6``."""
    return " → ".join(f"{h.start}:{h.end} via {short_peer(h.peer_id)}" for h in route)


def with_adapter(spans: dict[str, RemoteSpan], adapter: str | None) -> dict[str, RemoteSpan]:
    """The spans of servers that announce LoRA ``adapter`` (all of them for None)."""
    if adapter is None:
        return dict(spans)
    return {peer: span for peer, span in spans.items() if adapter in span.record.adapters}


class SequenceManager:
    """Knows which servers host which blocks of one model, and which of them to avoid for now."""

    def __init__(self, dht: Any, model: str, num_blocks: int, config: ClientConfig, source: str | None = None) -> None:
        self.dht = dht
        self.model = model
        self.source = source  # the folder or repo id the user gave: MissingBlocksError's hint serves that
        self.num_blocks = num_blocks
        self.config = config
        self.spans: dict[str, RemoteSpan] = {}
        self.rtt: dict[str, float] = {}
        self._bans: dict[str, _Ban] = {}
        self._updated = 0.0
        self._lock = threading.RLock()
        self._rng = random.Random()

    # ---- swarm state ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read every block's server records from the peers storing them (never a cached copy)."""
        records = read_records(self.dht, self.model, range(self.num_blocks), timeout=self.config.request_timeout)
        spans = spans_from_records(records, num_blocks=self.num_blocks, states=(ServerState.ONLINE,))
        with self._lock:
            self.spans = spans
            self._updated = time.monotonic()

    def _refresh_if_stale(self) -> None:
        if time.monotonic() - self._updated > self.config.update_period:
            self.refresh()

    # ---- bans -------------------------------------------------------------------------------
    def ban(self, peer_id: str, reason: str) -> float:
        """Avoid a failed server for a while; repeated failures double the time (capped). Returns seconds."""
        with self._lock:
            ban = self._bans.get(peer_id)
            strikes = ban.strikes + 1 if ban else 1
            seconds = min(self.config.max_backoff, self.config.min_backoff * 2 ** (strikes - 1))
            self._bans[peer_id] = _Ban(time.monotonic() + seconds, strikes)
        logger.info("avoiding %s for %.1f s: %s", short_peer(peer_id), seconds, reason)
        return seconds

    def mark_ok(self, peer_id: str) -> None:
        """A server answered well: forget its past failures (its next failure bans it for the minimum)."""
        with self._lock:
            self._bans.pop(peer_id, None)

    def banned(self) -> set[str]:
        """Servers to avoid right now."""
        now = time.monotonic()
        with self._lock:
            return {peer for peer, ban in self._bans.items() if ban.until > now}

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        """Fold a measured round trip into the server's smoothed RTT."""
        with self._lock:
            old = self.rtt.get(peer_id)
            self.rtt[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    # ---- planning ---------------------------------------------------------------------------
    def plan_inference(
        self,
        start: int = 0,
        end: int | None = None,
        cache_tokens_needed: int = 0,
        exclude: Collection[str] = (),
        ignore_bans: bool = False,
        adapter: str | None = None,
    ) -> list[RouteHop]:
        """Fastest route over blocks ``start..end-1`` avoiding banned servers.

        With ``adapter``, only servers announcing that LoRA adapter count. Before reporting blocks as missing (MissingBlocksError) or served only by banned servers
        (NoRouteError), it re-reads the swarm once, so servers that joined since are found.
        """
        end = self.num_blocks if end is None else end
        self._refresh_if_stale()
        for attempt in range(2):
            with self._lock:
                spans = with_adapter(self.spans, adapter)
                rtt = dict(self.rtt)
            try:
                return plan_inference_route(
                    spans,
                    start,
                    end,
                    model=self.model,
                    rtt=rtt,
                    banned=(set() if ignore_bans else self.banned()) | set(exclude),
                    cache_tokens_needed=cache_tokens_needed,
                )
            except MissingBlocksError as e:
                if attempt == 1:
                    raise e.with_source(self.source).with_traceback(e.__traceback__) from None
                self.refresh()
        raise AssertionError("unreachable")

    def plan_forward(self, start: int = 0, end: int | None = None) -> list[RouteHop]:
        """A load-spreading route for a stateless forward (via servers with the configured adapter, if any)."""
        end = self.num_blocks if end is None else end
        self._refresh_if_stale()
        for attempt in range(2):
            with self._lock:
                spans = with_adapter(self.spans, self.config.active_adapter)
            try:
                return plan_forward_route(spans, start, end, rng=self._rng, model=self.model, banned=self.banned())
            except MissingBlocksError as e:
                if attempt == 1:
                    raise e.with_source(self.source).with_traceback(e.__traceback__) from None
                self.refresh()
        raise AssertionError("unreachable")

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
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import MissingBlocksError, NoRouteError, short_peer
from corolla.engine.routing.exact import exact_spans
from corolla.engine.routing.planner import (
    UNKNOWN_BLOCK_S,
    RouteHop,
    block_seconds,
    plan_forward_route,
    plan_inference_route,
)
from corolla.engine.routing.reports import LiarReport, write_report
from corolla.engine.routing.spans import RemoteSpan, spans_from_records
from corolla.engine.routing.trust import ban_seconds, believed_block_seconds

logger = logging.getLogger(__name__)

FIRST_READ_FRESH_S = 2.0
"""Seconds a first, partial read of the swarm (:meth:`SequenceManager.first_read`) counts as up to date."""


@dataclass
class _Ban:
    until: float
    strikes: int
    at: float  # monotonic time of the last failure


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
        # Every table below changes only through this class's methods, under ``_lock``.
        self._spans: dict[str, RemoteSpan] = {}
        self._rtt: dict[str, float] = {}  # smoothed seconds of a one-token step (network and compute)
        self._ping: dict[str, float] = {}  # seconds of an info round trip (network only), from probes
        self._block_s: dict[str, float] = {}  # measured seconds per token per block of one-token steps
        self._probed: set[str] = set()  # servers whose info answer matched their record
        self._probing: dict[str, int] = {}  # servers with probes under way (how many)
        self._forwarders: set[str] = set()  # probed servers that said they push to next hops (forwarding)
        self._checked: dict[str, int] = {}  # spot checks each server passed
        self._convicted: set[str] = set()  # servers this client caught lying
        self._bans: dict[str, _Ban] = {}
        self._updated = 0.0
        self._refreshing = False  # a background re-read is running
        self._lock = threading.RLock()
        self._rng = random.Random()

    # ---- swarm state ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read every block's server records from the peers storing them (never a cached copy)."""
        records = read_records(self.dht, self.model, range(self.num_blocks), timeout=self.config.request_timeout)
        spans = spans_from_records(records, num_blocks=self.num_blocks, states=(ServerState.ONLINE,))
        if self.config.require_exact:
            spans = exact_spans(spans)
        with self._lock:
            self._spans = spans
            self._updated = time.monotonic()

    def first_read(self) -> None:
        """Read only the blocks a first route needs: block 0's servers, then the first block their spans do
        not reach, and so on (one DHT get per step; one in all when servers hold whole spans).

        A fresh client's first token waits for this read, and every record costs a signature check: a swarm
        where each of 50 identities announces under every block makes a full read ~6x the records of this
        one. The read counts as fresh for :data:`FIRST_READ_FRESH_S` only: a plan after that re-reads every
        block in the background (a plan that finds blocks missing re-reads them at once, as always).
        """
        records: dict[int, dict[str, ServerRecord]] = {}
        block = 0
        while block < self.num_blocks and len(records) < self.num_blocks:
            records.update(read_records(self.dht, self.model, [block], timeout=self.config.request_timeout))
            spans = spans_from_records(records, num_blocks=self.num_blocks, states=(ServerState.ONLINE,))
            reach = max((s.end for s in spans.values() if s.start <= block < s.end), default=block)
            if reach <= block:  # nobody serves it: plans raise MissingBlocksError and re-read every block
                break
            block = reach
        spans = spans_from_records(records, num_blocks=self.num_blocks, states=(ServerState.ONLINE,))
        if self.config.require_exact:
            spans = exact_spans(spans)
        with self._lock:
            self._spans = spans
            # partial: a plan from FIRST_READ_FRESH_S on re-reads every block (in the background, after the
            # first token rather than beside it)
            self._updated = (
                time.monotonic() - self.config.update_period + min(FIRST_READ_FRESH_S, self.config.update_period)
            )

    def _refresh_if_stale(self, *, may_wait: bool = True) -> bool:
        """Re-read the swarm if the last read is older than ``update_period``: before the first plan only
        the blocks a route needs (:meth:`first_read`; every block with ``update_period`` 0), else in the
        background while this plan uses the last read, so a session's first token does not wait for a full
        DHT read (a route that fails re-reads at once anyway).

        Returns False, reading nothing, when a read at once is due and ``may_wait`` is False.
        """
        with self._lock:
            if time.monotonic() - self._updated <= self.config.update_period:
                return True
            first = not self._spans and self.config.update_period > 0
            wait = not self._spans or self.config.update_period == 0
            if wait and not may_wait:
                return False
            if not wait:
                if self._refreshing:
                    return True
                self._refreshing = True
        if first:
            self.first_read()
            return True
        if wait:
            self.refresh()
            return True
        threading.Thread(target=self._refresh_in_background, name="corolla-refresh", daemon=True).start()
        return True

    def _refresh_in_background(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # the last read stays in use; the next plan tries again
            logger.info("re-reading the swarm failed: %s", e)
        finally:
            with self._lock:
                self._refreshing = False

    @property
    def spans(self) -> dict[str, RemoteSpan]:
        """The servers of the swarm as last read, ``{peer_id: span}`` (a copy)."""
        with self._lock:
            return dict(self._spans)

    def span(self, peer_id: str) -> RemoteSpan | None:
        """A server's span as last read, if it announced one."""
        with self._lock:
            return self._spans.get(peer_id)

    # ---- measurements -----------------------------------------------------------------------
    def round_trip(self, peer_id: str) -> float | None:
        """Smoothed seconds of a one-token step of the server, if measured."""
        with self._lock:
            return self._rtt.get(peer_id)

    def expected_round_trip(self, peer_id: str) -> float | None:
        """The server's step round trip if measured, else its probe's round trip, else None."""
        with self._lock:
            return self._rtt.get(peer_id, self._ping.get(peer_id))

    def typical_ping(self) -> float | None:
        """Median seconds of the info round trips measured so far (None before any probe)."""
        with self._lock:
            pings = sorted(self._ping.values())
        return pings[len(pings) // 2] if pings else None

    def is_probed(self, peer_id: str) -> bool:
        """Whether the server's info answer matched its record (see :meth:`record_probe`)."""
        with self._lock:
            return peer_id in self._probed

    def note_forwarder(self, peer_id: str) -> None:
        """A probed server said it pushes its outputs to next hops (forwarding)."""
        with self._lock:
            self._forwarders.add(peer_id)

    def forwards(self, peer_id: str) -> bool:
        """Whether the server said it pushes its outputs to next hops."""
        with self._lock:
            return peer_id in self._forwarders

    def checks_passed(self, peer_id: str) -> int:
        """Spot checks the server passed (reset when it is convicted)."""
        with self._lock:
            return self._checked.get(peer_id, 0)

    # ---- bans -------------------------------------------------------------------------------
    def ban(self, peer_id: str, reason: str) -> float:
        """Avoid a failed server for a while; repeated failures double the time (capped). Returns seconds."""
        with self._lock:
            ban = self._bans.get(peer_id)
            strikes = ban.strikes + 1 if ban else 1
            seconds = ban_seconds(strikes, self.config.min_backoff, self.config.max_backoff)
            now = time.monotonic()
            self._bans[peer_id] = _Ban(now + seconds, strikes, now)
        logger.info("avoiding %s for %.1f s: %s", short_peer(peer_id), seconds, reason)
        return seconds

    def mark_ok(self, peer_id: str) -> None:
        """A server answered well: forget its past failures (its next failure bans it for the minimum)."""
        with self._lock:
            if peer_id not in self._convicted:  # a liar's good answers do not lift its ban
                self._bans.pop(peer_id, None)

    def banned(self) -> set[str]:
        """Servers to avoid right now."""
        now = time.monotonic()
        with self._lock:
            return {peer for peer, ban in self._bans.items() if ban.until > now}

    def failed_within(self, seconds: float) -> set[str]:
        """Servers whose last contact, less than ``seconds`` ago, was a failure (banned or not any more).

        Optional work (spot checks) skips them: a frozen server's short first bans run out while its record
        lives on, and asking it again costs a whole silence each time.
        """
        since = time.monotonic() - seconds
        with self._lock:
            return {peer for peer, ban in self._bans.items() if ban.at > since}

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        """Fold a measured round trip into the server's smoothed RTT."""
        with self._lock:
            old = self._rtt.get(peer_id)
            self._rtt[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def record_step(self, peer_id: str, seconds: float, blocks: int) -> None:
        """Fold a one-token step's time into the server's RTT and its measured seconds per block."""
        self.record_rtt(peer_id, seconds)
        with self._lock:
            per_block = max(seconds - self._ping.get(peer_id, 0.0), 0.0) / max(blocks, 1)
            old = self._block_s.get(peer_id)
            self._block_s[peer_id] = per_block if old is None else 0.8 * old + 0.2 * per_block

    def record_probe(self, peer_id: str, seconds: float) -> None:
        """A server's info answer matched its record, after ``seconds``."""
        with self._lock:
            self._probed.add(peer_id)
            old = self._ping.get(peer_id)
            self._ping[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def begin_probe(self, peer_id: str) -> None:
        """A probe of the server started (see :meth:`probing`); call :meth:`end_probe` when it ends."""
        with self._lock:
            self._probing[peer_id] = self._probing.get(peer_id, 0) + 1

    def end_probe(self, peer_id: str) -> None:
        """A probe of the server ended, passed or failed."""
        with self._lock:
            left = self._probing.pop(peer_id, 0) - 1
            if left > 0:
                self._probing[peer_id] = left

    def probing(self) -> set[str]:
        """Servers whose probe is under way: neither probed nor failed yet (a silent one may take its whole bound)."""
        with self._lock:
            return set(self._probing)

    def unprobed(self, start: int, end: int, exclude: Collection[str], limit: int) -> list[tuple[str, int, int]]:
        """Up to ``limit`` servers of blocks ``[start, end)`` never probed, the ones the planner favours first
        (equal ones in random order).

        Returns ``(peer_id, span start, span end)``, skipping banned servers, servers being probed and ``exclude``.
        """
        skip = self.banned() | self.probing() | set(exclude)
        with self._lock:
            spans = [
                s
                for p, s in self._spans.items()
                if p not in self._probed and p not in skip and s.start < end and s.end > start
            ]
            measured = dict(self._block_s)
        # ties at random: identities that claim the fastest plausible speed cannot be ground to come first
        spans.sort(key=lambda s: (block_seconds(s, measured.get(s.peer_id)), self._rng.random()))
        return [(s.peer_id, s.start, s.end) for s in spans[: max(limit, 0)]]

    def believed_block_s(self, peer_id: str) -> float:
        """Seconds per token per block the planner believes for a server (claim capped by measurement)."""
        with self._lock:
            span = self._spans.get(peer_id)
            measured = self._block_s.get(peer_id)
        return block_seconds(span, measured) if span is not None else believed_block_seconds(UNKNOWN_BLOCK_S, measured)

    def passed_check(self, peer_id: str) -> None:
        """A spot check of the server's output agreed with an independent replica."""
        with self._lock:
            self._checked[peer_id] = self._checked.get(peer_id, 0) + 1

    def convict(self, peer_id: str, start: int, end: int, reason: str) -> None:
        """A server was caught lying: avoid it for ``liar_ban`` seconds, log it and report it for `corolla health`."""
        with self._lock:
            strikes = max(self._bans[peer_id].strikes if peer_id in self._bans else 0, 32)
            now = time.monotonic()
            self._bans[peer_id] = _Ban(now + self.config.liar_ban, strikes, now)
            self._probed.discard(peer_id)
            self._checked.pop(peer_id, None)
            self._convicted.add(peer_id)
        logger.warning(
            "server %s lied about blocks %d:%d (%s); reported and avoided", short_peer(peer_id), start, end, reason
        )
        write_report(LiarReport(peer_id, self.model, start, end, reason, time.time()), self.config.report_file)

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
            try:
                return self._plan_last_read(start, end, cache_tokens_needed, exclude, ignore_bans, adapter)
            except MissingBlocksError as e:
                if attempt == 1:
                    raise e.with_source(self.source).with_traceback(e.__traceback__) from None
                self.refresh()
        raise AssertionError("unreachable")

    def plan_known(
        self,
        start: int,
        end: int,
        cache_tokens_needed: int = 0,
        exclude: Collection[str] = (),
        ignore_bans: bool = False,
        adapter: str | None = None,
    ) -> list[RouteHop] | None:
        """:meth:`plan_inference` when it needs no DHT read now: the route from the swarm as last read (a stale
        read is renewed in the background, as there), planned in the caller's thread; None if the swarm must be
        read first (never read, ``update_period`` 0) or the last read does not cover the blocks. A session's
        first token plans on the client's event loop without a hop to a worker thread."""
        if not self._refresh_if_stale(may_wait=False):
            return None
        try:
            return self._plan_last_read(start, end, cache_tokens_needed, exclude, ignore_bans, adapter)
        except MissingBlocksError:
            return None

    def _plan_last_read(
        self,
        start: int,
        end: int,
        cache_tokens_needed: int,
        exclude: Collection[str],
        ignore_bans: bool,
        adapter: str | None,
    ) -> list[RouteHop]:
        """The fastest route over the swarm as last read (raises MissingBlocksError if it does not cover it)."""
        with self._lock:
            spans = with_adapter(self._spans, adapter)
        banned = (set(self._convicted) if ignore_bans else self.banned()) | set(exclude)  # liars never
        return self._plan_over(spans, start, end, banned, cache_tokens_needed)

    def plan_replica(
        self, start: int, end: int, exclude: Collection[str], *, adapter: str | None = None, quant: str = "none"
    ) -> list[RouteHop] | None:
        """The fastest route over ``[start, end)`` avoiding ``exclude`` and bans, from the swarm as last read;
        None if there is none (no DHT read: spot checks of a hop with a single server must stay cheap).

        Only servers that compute the same function count as replicas: the same LoRA ``adapter`` and the same
        weight quantization ``quant`` (a quantized server's honest output differs from an exact one's by more
        than any dtype tolerance, and the other way round).
        """
        with self._lock:
            spans = {p: s for p, s in with_adapter(self._spans, adapter).items() if s.record.quant == quant}
            rtt = dict(self._rtt)
            measured = dict(self._block_s)
            # Servers in good standing first; then, bans aside (one that missed a deadline under load still
            # gives an opinion, and one that fails again is simply no opinion), never a convicted liar.
            avoid = [self.banned() | set(exclude), set(self._convicted) | set(exclude)]
        for banned in avoid:
            try:
                return plan_inference_route(
                    spans, start, end, model=self.model, rtt=rtt, banned=banned, measured_block_s=measured
                )
            except MissingBlocksError:
                continue
        return None

    def replicas(self, start: int, end: int, exclude: Collection[str], *, adapter: str | None, quant: str) -> list[str]:
        """Servers that alone hold all of ``[start, end)`` with the same ``adapter`` and ``quant``, from the swarm
        as last read: the candidate auditors of a hop (never banned servers, convicted liars, nor ``exclude``)."""
        with self._lock:
            skip = self.banned() | set(self._convicted) | set(exclude)
            return sorted(
                p
                for p, s in with_adapter(self._spans, adapter).items()
                if p not in skip and s.record.quant == quant and s.start <= start and end <= s.end
            )

    def _plan_over(
        self, spans: dict[str, RemoteSpan], start: int, end: int, banned: set[str], cache_tokens_needed: int
    ) -> list[RouteHop]:
        """:func:`plan_inference_route` over ``spans`` with this client's measured round trips and block times."""
        with self._lock:
            rtt = dict(self._rtt)
            measured = dict(self._block_s)
        return plan_inference_route(
            spans,
            start,
            end,
            model=self.model,
            rtt=rtt,
            banned=banned,
            cache_tokens_needed=cache_tokens_needed,
            measured_block_s=measured,
        )

    def plan_probed(
        self, start: int, end: int, exclude: Collection[str], adapter: str | None = None, cache_tokens_needed: int = 0
    ) -> list[RouteHop] | None:
        """The fastest route over ``[start, end)`` through probed servers only, avoiding ``exclude`` and bans,
        from the swarm as last read; None if they do not cover the blocks (no DHT read: it must stay cheap)."""
        with self._lock:
            spans = {p: s for p, s in with_adapter(self._spans, adapter).items() if p in self._probed}
        try:
            return self._plan_over(spans, start, end, self.banned() | set(exclude), cache_tokens_needed)
        except MissingBlocksError:
            return None

    def plan_forward(self, start: int = 0, end: int | None = None, exclude: Collection[str] = ()) -> list[RouteHop]:
        """A load-spreading route for a stateless forward (avoiding banned servers and ``exclude``; via servers
        with the configured adapter, if any)."""
        end = self.num_blocks if end is None else end
        self._refresh_if_stale()
        for attempt in range(3):
            with self._lock:
                spans = with_adapter(self._spans, self.config.active_adapter)
                # The last attempt puts bans aside (a busy server may have missed one deadline), never liars.
                banned = (set(self._convicted) if attempt == 2 else self.banned()) | set(exclude)
            try:
                return plan_forward_route(spans, start, end, rng=self._rng, model=self.model, banned=banned)
            except MissingBlocksError as e:
                if attempt == 0:
                    self.refresh()  # servers that joined since the last read
                elif attempt == 2 or not isinstance(e, NoRouteError):
                    raise e.with_source(self.source).with_traceback(e.__traceback__) from None
                self.refresh()
        raise AssertionError("unreachable")

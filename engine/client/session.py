"""Inference sessions: each server on the route keeps the session's attention cache; the client keeps
the inputs it sent to every hop, so a failed hop can be re-planned and its history replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import HopStream
from corolla.engine.config import ClientConfig
from corolla.engine.errors import (
    CacheFullError,
    MissingBlocksError,
    NoRouteError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.routing.planner import RouteHop
from corolla.engine.routing.sequence_manager import SequenceManager, describe_route

logger = logging.getLogger(__name__)

_RETRYABLE = (PeerUnavailableError, CacheFullError, SessionClosedError, ProtocolError)


@dataclass
class _Hop:
    """One hop of the live route and every input it has been sent (for replay)."""

    stream: HopStream
    inputs: list[torch.Tensor] = field(default_factory=list)  # each [batch, new, hidden]

    @property
    def start(self) -> int:
        return self.stream.start

    @property
    def end(self) -> int:
        return self.stream.end

    def history(self, length: int) -> torch.Tensor | None:
        """Inputs of the first ``length`` positions, [batch, length, hidden]."""
        if length == 0 or not self.inputs:
            return None
        return torch.cat(self.inputs, dim=1)[:, :length]


class InferenceSession:
    """A generation session over the swarm: ``step`` sends hidden states of new tokens through the route.

    Use as a context manager (or call ``close``) so servers free their caches promptly.
    """

    def __init__(
        self,
        manager: SequenceManager,
        p2p: Any,
        loop: LoopThread,
        config: ClientConfig,
        max_length: int,
    ) -> None:
        self.manager = manager
        self.p2p = p2p
        self.loop = loop
        self.config = config
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every server of the route holds
        self.batch_size: int | None = None
        self.hops: list[_Hop] = []
        self.closed = False
        self.failovers = 0
        self.token_ids: torch.Tensor | None = None  # [batch, position] ids fed so far (kept by the model)
        self.pending_ids: torch.Tensor | None = None  # sampled but not yet fed (kept by the model)
        self._step_id = 0

    # ---- public API -------------------------------------------------------------------------
    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] inputs of block 0 through the route; return last block's outputs."""
        if self.closed:
            raise SessionClosedError("this inference session is closed; open a new one")
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, length, hidden], got {list(hidden.shape)}")
        if self.batch_size is None:
            self.batch_size = hidden.shape[0]
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(f"this session runs {self.batch_size} sequences, got {hidden.shape[0]}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"the session holds {self.position} tokens; {hidden.shape[1]} more exceed max_length="
                f"{self.max_length}. Open the session with a larger max_length."
            )
        return self.loop.run(self._step(hidden))

    def rewind(self, position: int) -> None:
        """Forget tokens from ``position`` on (servers drop them at the next step)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the session holds {self.position} tokens")
        self.position = position
        for hop in self.hops:
            hist = hop.history(position)
            hop.inputs = [hist] if hist is not None else []

    def close(self) -> None:
        """Free the servers' caches (idempotent, never raises)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.run(self._close_all(self.hops), timeout=10)
        except Exception as e:  # closing is best effort: servers also free idle sessions themselves
            logger.debug("closing session: %s", e)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals (run on the client's event loop) -----------------------------------------
    async def _close_all(self, hops: list[_Hop]) -> None:
        for hop in hops:
            await hop.stream.close(self.session_id)

    def _chunks(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
        size = max(1, self.config.max_chunk_bytes // per_token)
        return [hidden[:, i : i + size] for i in range(0, hidden.shape[1], size)]

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in self._chunks(hidden):
            outputs.append(await self._step_chunk(chunk))
        return torch.cat(outputs, dim=1)

    def _timeout(self, peer_id: str, new_tokens: int) -> float:
        """Seconds to wait for a step: adaptive for one-token steps, so a stalled server is noticed fast."""
        usual = self.manager.rtt.get(peer_id)
        if new_tokens > 1 or usual is None:
            return self.config.step_timeout
        return min(self.config.step_timeout, max(self.config.stall_timeout, 5 * usual))

    async def _step_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hops:
            await self._build(0, self.manager.num_blocks)
        attempts = 0
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            peer = hop.stream.peer_id
            try:
                began = time.perf_counter()
                self._step_id += 1
                out = await hop.stream.step(
                    self.session_id, x, self.position, self._step_id, self._timeout(peer, x.shape[1])
                )
                if x.shape[1] == 1:
                    self.manager.record_rtt(peer, time.perf_counter() - began)
            except _RETRYABLE as e:
                attempts += 1
                if attempts > self.config.max_retries:
                    raise
                self.manager.ban(peer, str(e))
                await self._repair(i)
                continue  # retry the same hop index: the replacement route starts there
            self.manager.mark_ok(peer)
            hop.inputs.append(x)
            x = out
            i += 1
        self.position += x.shape[1]
        return x

    async def _repair(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over the same blocks and replay its history into it."""
        broken = self.hops[index]
        await broken.stream.close(self.session_id)
        history = broken.history(self.position)
        began = time.perf_counter()
        exclude = {broken.stream.peer_id}
        for attempt in range(self.config.max_retries + 1):
            new_hops = await self._plan_and_open(broken.start, broken.end, exclude=exclude)
            try:
                await self._replay(new_hops, history)
            except _RETRYABLE as e:
                await self._close_all(new_hops)
                failed = _culprit(e, new_hops)
                self.manager.ban(failed, str(e))
                exclude.add(failed)
                if attempt == self.config.max_retries:
                    raise
                continue
            break
        self.hops[index : index + 1] = new_hops
        self.failovers += 1
        logger.info(
            "failover: blocks %d:%d moved to %s, replayed %d tokens in %.2f s",
            broken.start,
            broken.end,
            describe_route([RouteHop(h.stream.peer_id, h.start, h.end) for h in new_hops]),
            self.position,
            time.perf_counter() - began,
        )

    async def _replay(self, hops: list[_Hop], history: torch.Tensor | None) -> None:
        """Send the inputs of every position the session holds through ``hops`` (rebuilding their caches)."""
        x = history
        for hop in hops:
            if x is None:
                return
            outputs: list[torch.Tensor] = []
            position = 0
            for chunk in self._chunks(x):
                self._step_id += 1
                outputs.append(
                    await hop.stream.step(self.session_id, chunk, position, self._step_id, self.config.step_timeout)
                )
                position += chunk.shape[1]
            hop.inputs = [x]
            x = torch.cat(outputs, dim=1)

    async def _plan_and_open(self, start: int, end: int, exclude: set[str]) -> list[_Hop]:
        """Plan blocks ``start..end-1`` and open a stream on every hop, retrying other servers on failure.

        The sequence manager re-reads the swarm (fresh from the DHT) before it reports blocks as
        missing, so a server that joined since the last read is found here. When only servers we
        already failed announce some blocks (NoRouteError: their records outlive them for the record
        TTL), they get one last try after a short pause; if that fails too, the blocks are missing and
        MissingBlocksError says so, instead of retrying dead servers for minutes.
        """
        loop = asyncio.get_running_loop()
        last_chance = False
        cache_full: CacheFullError | None = None  # servers that answered but had no room are not "missing"
        tried: set[str] = set()
        last_error: BaseException | None = None  # the last failure to open a hop: the cause we report
        for _ in range(self.config.max_retries + 1):
            try:
                route = await loop.run_in_executor(
                    None,
                    self.manager.plan_inference,
                    start,
                    end,
                    self.max_length,
                    frozenset(exclude),
                    last_chance,
                    self.config.active_adapter,
                )
            except MissingBlocksError as e:
                if cache_full is not None:
                    raise CacheFullError(
                        f"no server of blocks {start}:{end} has room: {cache_full}", peer_id=cache_full.peer_id
                    ) from e
                if last_chance or not isinstance(e, NoRouteError):
                    raise
                last_chance, exclude = True, set()
                await asyncio.sleep(self.config.min_backoff)
                continue
            hops = [_Hop(HopStream(h.peer_id, h.start, h.end)) for h in route]
            tried.update(h.peer_id for h in route)
            # Open every hop at once: one round trip for the whole route, not one per server.
            results = await asyncio.gather(
                *(
                    hop.stream.open(
                        self.p2p,
                        self.session_id,
                        self.max_length,
                        self.batch_size or 1,
                        self.config.connect_timeout,
                        self.config.step_timeout,
                        self.config.active_adapter,
                    )
                    for hop in hops
                ),
                return_exceptions=True,
            )
            failed = [(hop, r) for hop, r in zip(hops, results, strict=True) if isinstance(r, BaseException)]
            if not failed:
                return hops
            await self._close_all(hops)
            for hop, error in failed:
                if not isinstance(error, _RETRYABLE):
                    raise error
                last_error = error
                self.manager.ban(hop.stream.peer_id, str(error))
                if isinstance(error, CacheFullError):
                    cache_full = error
                    exclude = {*exclude, hop.stream.peer_id}
            if last_chance and cache_full is None:
                hop, error = failed[0]
                raise MissingBlocksError(self.manager.model, range(hop.start, hop.end), self.manager.source) from error
        if cache_full is not None:
            raise cache_full
        raise NoRouteError(self.manager.model, range(start, end), sorted(tried), self.manager.source) from last_error

    async def _build(self, start: int, end: int) -> None:
        self.hops = await self._plan_and_open(start, end, exclude=set())
        logger.info("route %s", describe_route([RouteHop(h.stream.peer_id, h.start, h.end) for h in self.hops]))


def _culprit(error: Exception, hops: list[_Hop]) -> str:
    """The full peer id a failure names (errors carry it as data); the first hop's if none does."""
    if isinstance(error, PeerError) and error.peer_id is not None:
        return error.peer_id
    return hops[0].stream.peer_id

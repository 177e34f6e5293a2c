"""Running a span: input checks, sessions with reserved cache and per-peer and per-address-group caps, and one
fair compute thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from transformers import PretrainedConfig

from corolla.engine.config import ServerConfig
from corolla.engine.errors import CacheFullError, ProtocolError, SessionClosedError
from corolla.engine.models.batched import run_rows
from corolla.engine.models.cache_size import state_cache_bytes, token_cache_bytes
from corolla.engine.models.shared_rows import SharedRows
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.server.compute_queue import Batchable, ComputeThread, Priority
from corolla.engine.server.kv_cache import CacheBudget, cache_bytes_per_token, session_cache_bytes
from corolla.engine.server.ledger import Ledger
from corolla.engine.server.limits import PeerBudget
from corolla.engine.server.prefix_cache import PrefixBlock, PrefixCache, PrefixTrail, first_key
from corolla.engine.wire.commitment import InputChain

logger = logging.getLogger(__name__)

BATCH_LENGTH_BUCKET = 512  # decode steps batch together when their sessions hold the same multiple of this many tokens
# Layer kinds whose whole state is the keys/values of every position (so a copied block equals a recomputed one);
# a span with any other kind (recurrent state, e.g. linear attention) keeps no prefix cache.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
T = TypeVar("T")


@dataclass
class ServerSession:
    """One client's inference session on this server."""

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    reserved_bytes: int
    cache: SpanCache
    peer: str = ""  # the client peer that opened it
    group: str = ""  # the address group its stream came from (routing/groups.py; "" if unknown)
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)  # its last step that added tokens to its cache
    closed_because: str | None = None  # why the server closed it (reclaimed, lifetime over), if it did
    favored: bool = False  # its client proved it also serves (server/contributors.py): its steps go first
    adapter: str | None = None  # the LoRA adapter its steps run with
    trail: PrefixTrail | None = None  # its prompt's place in the prefix cache; None once it can no longer share
    inputs_chain: InputChain = field(default_factory=InputChain)  # running hash of its inputs (step commitments)


_DecodeStep = tuple[ServerSession, int, torch.Tensor]  # a session, the position of its new token, [batch, 1, hidden]


class SpanBackend:
    """Blocks ``start..end-1`` loaded on a device, with the checks every peer request goes through."""

    def __init__(
        self,
        span: BlockSpan,
        config: PretrainedConfig,
        cfg: ServerConfig,
        dtype: torch.dtype,
        *,
        ledger: Ledger | None = None,
    ) -> None:
        """Serve ``span``; ``ledger`` (server/ledger.py), if given, counts the tokens served per client peer."""
        self.span = span
        self.config = config
        self.cfg = cfg
        self.dtype = dtype
        self.device = next(span.layers.parameters()).device
        self.start, self.end = span.start, span.end
        self.hidden_size = int(config.hidden_size)
        self.token_bytes = token_cache_bytes(config, dtype)  # per block of the model: what one token takes in its cache
        self.state_bytes = state_cache_bytes(config, dtype)  # per block: one sequence's recurrent state (linear blocks)
        self.budget = CacheBudget(cfg.cache_bytes)
        self.sessions: dict[str, ServerSession] = {}
        self.tokens_processed = 0
        self.tokens_computed = 0  # tokens of inference steps run through the blocks (not copied from the prefix cache)
        self.prefix_tokens_reused = 0  # tokens of inference steps whose outputs and cache came from the prefix cache
        self.block_tokens = cfg.prefix_block_tokens  # prompts run as jobs of these many positions, block-aligned
        self.prefix = self._prefix_cache(config, cfg, dtype)
        self.rows_batched = 0  # decode rows that ran in one forward with another session's
        self.ledger = ledger
        # Hidden states received and not yet answered (activations besides the cache), per peer and in total.
        self.tokens_in_flight = PeerBudget(
            "tokens in flight",
            cfg.max_tokens_in_flight_per_peer,
            cfg.max_tokens_in_flight,
            cfg.max_tokens_in_flight_per_group,
        )
        self._lock = threading.Lock()
        # Shared rows (models/shared_rows.py) of closed sessions: the compute thread frees them before its next job
        # that touches a cache, so closed sessions' rows never outlive their reservation in memory.
        self._rows_to_free: list[SharedRows] = []
        # One compute thread: requests run one at a time on the device, inference steps first, peers in turn.
        self._compute = ComputeThread()

    def _prefix_cache(self, config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype) -> PrefixCache | None:
        """The cache of prompt prefixes (None if disabled, or if a block keeps state besides keys/values)."""
        if cfg.prefix_cache_tokens == 0:
            return None
        kinds = set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
        if kinds:
            logger.info("no prefix cache: blocks of kind %s keep state a copied prefix cannot restore", sorted(kinds))
            return None
        per_token = cache_bytes_per_token(self.token_bytes[self.start : self.end]) + self.hidden_size * dtype.itemsize
        return PrefixCache(self.budget, cfg.prefix_cache_tokens * per_token)

    # ---- checks -----------------------------------------------------------------------------
    def check_span(self, start: int, end: int) -> None:
        """The requested blocks must lie within this server's span."""
        if not self.start <= start < end <= self.end:
            raise ProtocolError(f"blocks {start}:{end} are not hosted here (this server hosts {self.start}:{self.end})")

    def check_hidden(self, hidden: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """Validate peer-sent hidden states [batch, length, hidden]; return them on our device/dtype."""
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size:
            raise ProtocolError(
                f"hidden states must have shape [batch, length, {self.hidden_size}], got {list(hidden.shape)}"
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise ProtocolError(f"session batch size is {batch_size}, got {hidden.shape[0]} sequences")
        if hidden.shape[0] > self.cfg.max_batch_size:
            raise ProtocolError(f"batch of {hidden.shape[0]} exceeds this server's {self.cfg.max_batch_size}")
        if hidden.shape[0] * hidden.shape[1] > self.cfg.max_chunk_tokens:
            raise ProtocolError(
                f"{hidden.shape[0] * hidden.shape[1]} tokens in one message exceed {self.cfg.max_chunk_tokens}; "
                "send the prompt in smaller chunks"
            )
        if not torch.isfinite(hidden).all():
            raise ProtocolError("hidden states contain NaN or infinity")
        return hidden.to(self.device, self.dtype)

    def check_adapter(self, adapter: str | None) -> None:
        """The requested LoRA adapter must be one this server serves (None: the base model)."""
        if adapter is not None and adapter not in self.span.adapters:
            served = ", ".join(self.span.adapters) or "none"
            raise ProtocolError(
                f"adapter {adapter!r} is not served here (served: {served}); pick a server announcing it"
            )

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(
        self,
        session_id: str,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        peer: str = "",
        adapter: str | None = None,
        *,
        group: str = "",
    ) -> ServerSession:
        """Reserve cache for a new session of ``peer`` (from address ``group``) or raise CacheFullError /
        ProtocolError.

        When the server is full, sessions that made no progress (no step adding tokens to their cache) for
        ``session_reclaim_idle`` seconds give their slot and cache to the new one (least recent progress first):
        a step every now and then that keeps a session alive is not progress. Sessions older than
        ``session_max_lifetime`` are closed.
        """
        self.check_span(start, end)
        self.check_adapter(adapter)
        if max_length > self.cfg.max_length:
            raise ProtocolError(f"max_length {max_length} exceeds this server's limit of {self.cfg.max_length}")
        if batch_size > self.cfg.max_batch_size:
            raise ProtocolError(f"batch size {batch_size} exceeds this server's limit of {self.cfg.max_batch_size}")
        nbytes = session_cache_bytes(self.token_bytes[start:end], self.state_bytes[start:end], max_length, batch_size)
        with self._lock:
            if session_id in self.sessions:
                if self.sessions[session_id].peer != peer:
                    raise ProtocolError(f"session {session_id!r} is already open here")
                # The same client reopens it (failover back to this server): its old stream is dead.
                self._drop(self.sessions[session_id], "its client opened it again")
            self._close_expired()
            mine = sum(1 for s in self.sessions.values() if s.peer == peer)
            if mine >= self.cfg.max_sessions_per_peer:
                raise CacheFullError(
                    f"you already have {mine} open sessions on this server, its limit per peer; "
                    "close sessions you no longer use"
                )
            ours = sum(1 for s in self.sessions.values() if s.group == group) if group else 0
            if ours >= self.cfg.max_sessions_per_group:
                raise CacheFullError(
                    f"peers of your address group {group} already hold {ours} open sessions on this server, its "
                    "limit per group; close sessions you no longer use or use another server"
                )
            if self.prefix is not None and nbytes <= self.budget.capacity:  # prefix blocks give way to sessions first
                self.prefix.make_room(nbytes)
            while nbytes <= self.budget.capacity and (
                len(self.sessions) >= self.cfg.max_sessions or nbytes > self.budget.free
            ):
                if not self._reclaim_one():
                    break
            if len(self.sessions) >= self.cfg.max_sessions:
                raise CacheFullError(f"this server already has {self.cfg.max_sessions} open sessions; retry later")
            self.budget.reserve(nbytes, f"a session of {batch_size}x{max_length} tokens over {end - start} blocks")
            session = ServerSession(
                session_id,
                start,
                end,
                max_length,
                batch_size,
                nbytes,
                SpanCache(start, end - start, max_length),
                peer=peer,
                group=group,
                adapter=adapter,
            )
            if self.prefix is not None:
                session.trail = PrefixTrail(
                    first_key(start, end, adapter, self.dtype, batch_size, self.block_tokens), self.block_tokens
                )
            self.sessions[session_id] = session
            return session

    def _close_expired(self) -> None:
        """Close sessions past their lifetime (lock held)."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if now - session.opened > self.cfg.session_max_lifetime:
                self._drop(session, f"it was open longer than {self.cfg.session_max_lifetime:.0f} s, the limit")

    def _reclaim_one(self) -> bool:
        """Close the session with the least recent progress if it made none for ``session_reclaim_idle`` s
        (lock held)."""
        now = time.monotonic()
        stale = [s for s in self.sessions.values() if now - s.last_progress >= self.cfg.session_reclaim_idle]
        if not stale:
            return False
        victim = min(stale, key=lambda s: s.last_progress)
        self._drop(
            victim,
            f"it added no tokens for {now - victim.last_progress:.0f} s while the server was full and others waited",
        )
        return True

    def _drop(self, session: ServerSession, reason: str) -> None:
        """Close a session on the server's initiative (lock held); its next step gets the reason."""
        logger.info("closed session …%s of %s: %s", session.session_id[-6:], session.peer[-6:], reason)
        session.closed_because = reason
        if self.sessions.pop(session.session_id, None) is not None:
            self._release(session)

    def close_session(self, session: ServerSession) -> None:
        """Free a session's cache reservation (idempotent)."""
        with self._lock:
            if self.sessions.get(session.session_id) is session:
                del self.sessions[session.session_id]
                self._release(session)

    def _release(self, session: ServerSession) -> None:
        """Give back a closed session's reservation (lock held); rows it shares are freed by the compute thread."""
        self.budget.release(session.reserved_bytes)
        if session.cache.group is not None:
            self._rows_to_free.append(session.cache.group)

    def _free_closed_rows(self) -> None:
        """Give the other sessions of closed sessions' shared rows storage of their own (compute thread, before a
        job that touches a cache: no forward is running)."""
        with self._lock:
            stale, self._rows_to_free = self._rows_to_free, []
        for rows in stale:
            rows.dissolve()

    def cache_tokens_left(self) -> int:
        """How many more tokens (one sequence over the whole span) the cache budget could hold."""
        per_token = cache_bytes_per_token(self.token_bytes[self.start : self.end])
        evictable = self.prefix.used if self.prefix is not None else 0  # prefix blocks give way to sessions
        free = self.budget.free + evictable - session_cache_bytes((), self.state_bytes[self.start : self.end], 0, 1)
        if free < 0:
            return 0  # not even one sequence's recurrent state fits
        if per_token == 0:
            return self.cfg.max_length  # recurrent states only: a sequence's length costs nothing more
        return free // per_token

    def prefix_counters(self) -> dict[str, int]:
        """What the prefix cache holds and saved: its size in positions (0: off), blocks held, tokens of inference
        steps copied from it and tokens computed."""
        prefix = self.prefix
        return {
            "prefix_cache_tokens": self.cfg.prefix_cache_tokens if prefix is not None else 0,
            "prefix_block_tokens": self.block_tokens,
            "prefix_blocks": len(prefix) if prefix is not None else 0,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "tokens_computed": self.tokens_computed,
        }

    # ---- compute ----------------------------------------------------------------------------
    def _check_open(self, session: ServerSession) -> None:
        with self._lock:
            if session.closed_because is None and time.monotonic() - session.opened > self.cfg.session_max_lifetime:
                self._drop(session, f"it was open longer than {self.cfg.session_max_lifetime:.0f} s, the limit")
        if session.closed_because is not None:
            raise SessionClosedError(
                f"this server closed session {session.session_id!r}: {session.closed_because}; open a new one"
            )

    async def inference_step(self, session: ServerSession, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Append ``hidden`` at ``position`` of the session; return the span's outputs (wire dtype)."""
        self._check_open(session)
        wire_dtype = hidden.dtype
        x = self.check_hidden(hidden, session.batch_size)
        if position > session.cache.length:
            raise ProtocolError(
                f"step at position {position}, but this server holds {session.cache.length} tokens of the session"
            )
        if not session.cache.can_rewind(position):
            raise ProtocolError(
                f"step at position {position}, but blocks {session.start}:{session.end} keep a recurrent state "
                f"(linear attention) that can go back only to 0 or to where the last step began; "
                "replay the session's inputs from position 0"
            )
        if position + x.shape[1] > session.max_length:
            raise ProtocolError(
                f"{position + x.shape[1]} tokens exceed the session's max_length of {session.max_length}; "
                "open the session with a larger max_length"
            )
        session.last_used = time.monotonic()
        grows = position + x.shape[1] > session.cache.length  # a step that adds tokens: progress
        tokens = x.shape[0] * x.shape[1]
        with self.tokens_in_flight.holding(session.peer, tokens, session.group):
            if x.shape[1] == 1 and position > 0 and self.cfg.batch_rows > 1:
                # A decode step: it may run in one forward with other sessions' steps over the same blocks.
                session.trail = None  # batched rows: no longer the computation a prompt's blocks would repeat
                out = (await self._run_decode([(session, position, x)]))[0]
                self.tokens_computed += tokens
            else:
                try:
                    out = await self._run_prompt(session, position, hidden, x)
                except BaseException:
                    session.trail = None  # the cache may hold part of a failed step
                    raise
        session.last_used = time.monotonic()
        if grows:
            session.last_progress = session.last_used
        self.tokens_processed += tokens
        if self.ledger is not None:
            self.ledger.add(session.peer, tokens)
        return out.to("cpu", wire_dtype)

    async def _run_prompt(
        self, session: ServerSession, position: int, received: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Run a step of several tokens as compute jobs (other sessions' steps run between them), copying blocks
        found in the prefix cache instead of computing them and keeping the blocks it completes there.

        Jobs end at every multiple of ``prefix_block_tokens`` and, inside a block, every ``compute_chunk_tokens``
        (per sequence) from its start: the same positions always run in the same jobs, whatever was copied before.

        Args:
            received: the step's hidden states as the peer sent them (the prefix cache names blocks by them).
            x: the same on this server's device and dtype.
        """
        size = self.block_tokens
        job = max(1, self.cfg.compute_chunk_tokens // x.shape[0])
        trail = session.trail
        if trail is not None and position != trail.end():
            trail = session.trail = None  # rewound: the positions before no longer match the chain
        outputs: list[torch.Tensor] = []
        end = position + x.shape[1]
        # Spans with recurrent state keep no prefix cache; their jobs count from the step's own position, so a step
        # short enough for one job stays one job and can be resent (a recurrent state goes back only to where the
        # last job began).
        origin = position if session.cache.recurrent or any(self.state_bytes[session.start : session.end]) else 0
        lo = position
        while lo < end:
            base = lo - (lo - origin) % size  # the block's first position
            hi = min(end, base + size)
            name, hit = None, None
            if trail is not None and self.prefix is not None:
                name = trail.receive(lo, received[:, lo - position : hi - position].cpu())
                hit = self.prefix.take(name) if name is not None else None
            if hit is not None:
                try:
                    out = await self._compute.run(
                        lambda at=lo, n=hi - lo, block=hit: self._copy_block(session, at, block, n, job),
                        *self._turn(session),
                        favored=session.favored,
                    )
                finally:
                    self.prefix.give_back(hit)  # type: ignore[union-attr]
                self.prefix_tokens_reused += x.shape[0] * (hi - lo)
                block_outputs = [out]
            else:
                block_outputs = []
                at = lo
                while at < hi:
                    stop = min(hi, base + ((at - base) // job + 1) * job)
                    part = x[:, at - position : stop - position]
                    keep = None
                    if name is not None and trail is not None and stop == hi:  # the job completing the block
                        keep = (name, trail.pos, [*trail.outputs, *block_outputs])
                    block_outputs.append(
                        await self._compute.run(
                            lambda part=part, at=at, keep=keep: self._run_job(session, at, part, keep),
                            *self._turn(session),
                            favored=session.favored,
                        )
                    )
                    self.tokens_computed += part.shape[0] * part.shape[1]
                    at = stop
            if trail is not None:
                trail.computed(name, block_outputs)
            outputs.extend(block_outputs)
            lo = hi
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _run_job(
        self,
        session: ServerSession,
        at: int,
        part: torch.Tensor,
        keep: tuple[bytes, int, list[torch.Tensor]] | None,
    ) -> torch.Tensor:
        """Compute positions ``at..`` of the session (compute thread). With ``keep`` (name, first position and
        earlier outputs of the block this job completes), put the block into the prefix cache."""
        self._check_not_reclaimed(session)
        self._free_closed_rows()
        with torch.inference_mode():
            session.cache.truncate(at)
            out = self.span(part, session.cache, start=session.start, end=session.end, adapter=session.adapter)
            layers = session.cache.span_layers
            if keep is not None and self.prefix is not None:
                name, lo, earlier = keep
                hi = at + part.shape[1]
                if all(layer.keys is not None and layer.values is not None for layer in layers):
                    block = PrefixBlock(
                        tuple(layer.keys[:, :, lo:hi].clone() for layer in layers),  # type: ignore[index]
                        tuple(layer.values[:, :, lo:hi].clone() for layer in layers),  # type: ignore[index]
                        torch.cat([*earlier, out], dim=1),
                    )
                    self.prefix.put(name, block)
        return out

    def _copy_block(self, session: ServerSession, at: int, block: PrefixBlock, n: int, job: int) -> torch.Tensor:
        """Append the last ``n`` positions of a cached block to the session at ``at`` (compute thread); return
        their outputs. Appended in the pieces computing them would append, so the cache grows the same way."""
        self._check_not_reclaimed(session)
        self._free_closed_rows()
        cache = session.cache
        size = block.outputs.shape[1]
        offset = size - n
        with torch.inference_mode():
            cache.truncate(at)
            lo = offset
            while lo < size:
                hi = min(size, (lo // job + 1) * job)
                cache.begin_step(hi - lo)
                for i, (keys, values) in enumerate(zip(block.keys, block.values, strict=True)):
                    cache.update(keys[:, :, lo:hi], values[:, :, lo:hi], cache.start + i)
                cache.end_step()
                lo = hi
        return block.outputs[:, offset:]

    def _batch_key(self, session: ServerSession, position: int) -> tuple[object, ...]:
        """Decode steps of equal keys may share a forward: same blocks and adapter, similar lengths.

        Sessions of similar lengths only, so that padding every row to the longest one (one block's keys at a
        time) costs at most a bucket's worth of extra keys per row. One adapter per batch: the LoRA weights are
        switched per compute job. The family may split positions further (Llama 4: one attention temperature
        per batch).
        """
        group = self.span.family.batch_group(self.span.config, position)
        if any(self.state_bytes[session.start : session.end]):  # recurrent states update in place: never batched
            group = ("alone", session.session_id, group)
        return (session.start, session.end, session.adapter, position // BATCH_LENGTH_BUCKET, group)

    async def _run_decode(self, steps: list[_DecodeStep]) -> list[torch.Tensor]:
        """Decode steps (one token per row) as compute jobs that other sessions' steps may join; outputs in order.

        Steps are grouped by batch key, each group cut into jobs of at most ``batch_rows`` rows; the jobs queue
        under the first step's session (its peer's turn), so a peer's many sessions take no more turns than one.
        """
        groups: dict[tuple[object, ...], list[list[_DecodeStep]]] = {}
        for step in steps:
            jobs = groups.setdefault(self._batch_key(step[0], step[1]), [[]])
            if jobs[-1] and sum(x.shape[0] for _, _, x in jobs[-1]) + step[2].shape[0] > self.cfg.batch_rows:
                jobs.append([])
            jobs[-1].append(step)
        session = steps[0][0]

        async def run(job: list[_DecodeStep], key: tuple[object, ...]) -> list[torch.Tensor]:
            rows = sum(x.shape[0] for _, _, x in job)
            batch = Batchable(key, job, self._decode_jobs, rows, self.cfg.batch_rows)
            return await self._compute.run(
                lambda: self._decode_many(job), *self._turn(session), batch, favored=session.favored
            )

        keyed = [(job, key) for key, jobs in groups.items() for job in jobs]
        outs = await asyncio.gather(*(run(job, key) for job, key in keyed))
        by_step = {
            id(step): out
            for (job, _), result in zip(keyed, outs, strict=True)
            for step, out in zip(job, result, strict=True)
        }
        return [by_step[id(step)] for step in steps]

    def _decode_jobs(self, jobs: list[list[_DecodeStep]]) -> list[list[torch.Tensor]]:
        """Several queued decode jobs in one forward (runs on the compute thread); each job's outputs."""
        outs = self._decode_many([step for job in jobs for step in job])
        results, first = [], 0
        for job in jobs:
            results.append(outs[first : first + len(job)])
            first += len(job)
        return results

    def session_of(self, session_id: str, peer: str) -> ServerSession:
        """``peer``'s open session ``session_id`` (SessionClosedError if there is none)."""
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None or session.peer != peer:
            raise SessionClosedError(f"no open session {session_id!r} of yours here: open it on its own stream first")
        return session

    async def decode_steps(self, steps: list[tuple[ServerSession, int]], hidden: torch.Tensor) -> torch.Tensor:
        """One decode token for each of several sessions of one peer, sent in one message (a client's sessions
        batched); ``hidden`` is [rows, 1, hidden], each session's rows in order. Returns the outputs alike.

        Each session is checked as its own step would be; the rows run in as few forwards as their blocks,
        adapters and lengths allow (other peers' steps may join them).
        """
        wire_dtype = hidden.dtype
        if len({id(s) for s, _ in steps}) != len(steps):
            raise ProtocolError("a batched step lists a session twice; send one row group per session")
        first = steps[0][0]
        for s, position in steps:
            self._check_open(s)
            if (s.start, s.end, s.adapter) != (first.start, first.end, first.adapter):
                raise ProtocolError("the sessions of a batched step must run over the same blocks and adapter")
            if not 0 < position <= s.cache.length or not s.cache.can_rewind(position):
                raise ProtocolError(
                    f"batched step at position {position}, but this server holds {s.cache.length} tokens of "
                    f"session {s.session_id!r} (a batched step follows the prompt)"
                )
            if position + 1 > s.max_length:
                raise ProtocolError(
                    f"{position + 1} tokens exceed the max_length of session {s.session_id!r} ({s.max_length})"
                )
        rows = [s.batch_size for s, _ in steps]
        if hidden.ndim != 3 or list(hidden.shape[:2]) != [sum(rows), 1] or hidden.shape[2] != self.hidden_size:
            raise ProtocolError(
                f"a batched step takes [{sum(rows)}, 1, {self.hidden_size}] hidden states (each session's rows, "
                f"one token), got {list(hidden.shape)}"
            )
        if not torch.isfinite(hidden).all():
            raise ProtocolError("hidden states contain NaN or infinity")
        x = hidden.to(self.device, self.dtype)
        now = time.monotonic()
        grows = [position + 1 > s.cache.length for s, position in steps]  # steps adding a token: progress
        for s, _ in steps:
            s.last_used = now
            s.trail = None  # batched rows: no longer the computation a prompt's blocks would repeat
        parts = torch.split(x, rows, dim=0)
        with self.tokens_in_flight.holding(first.peer, sum(rows), first.group):
            outs = await self._run_decode(
                [(s, position, part) for (s, position), part in zip(steps, parts, strict=True)]
            )
        now = time.monotonic()
        for (s, _), grew in zip(steps, grows, strict=True):
            s.last_used = now
            if grew:
                s.last_progress = now
        self.tokens_computed += sum(rows)
        self.tokens_processed += sum(rows)
        if self.ledger is not None:
            self.ledger.add(first.peer, sum(rows))
        return torch.cat(outs, dim=0).to("cpu", wire_dtype)

    @staticmethod
    def _turn(session: ServerSession) -> tuple[Priority, str]:
        return Priority.INFERENCE, session.peer

    @staticmethod
    def _check_not_reclaimed(session: ServerSession) -> None:
        if session.closed_because is not None:  # reclaimed while this step waited
            raise SessionClosedError(
                f"this server closed session {session.session_id!r}: {session.closed_because}; open a new one"
            )

    def _decode_many(self, steps: list[_DecodeStep]) -> list[torch.Tensor]:
        """One token of each session (all over the same blocks) in one forward (runs on the compute thread)."""
        for s, _, _ in steps:
            self._check_not_reclaimed(s)
        self._free_closed_rows()
        session = steps[0][0]  # every step of a batch has its blocks and adapter (the batch key)
        with torch.inference_mode():
            for s, position, _ in steps:
                s.cache.truncate(position)
            if len(steps) == 1:
                x = steps[0][2]
                return [self.span(x, session.cache, start=session.start, end=session.end, adapter=session.adapter)]
            inputs, caches = [x for _, _, x in steps], [s.cache for s, _, _ in steps]
            outs = run_rows(self.span, inputs, caches, session.start, session.end, session.adapter)
        self.rows_batched += sum(x.shape[0] for _, _, x in steps)
        return outs

    async def forward(
        self, start: int, end: int, hidden: torch.Tensor, peer: str = "", adapter: str | None = None
    ) -> torch.Tensor:
        """Stateless forward of full sequences through blocks ``start..end-1`` (the caller holds its tokens).

        A compute job does at most the work of ``compute_chunk_tokens`` tokens through every block of the
        request, so an inference step never waits for more than that of someone's forward. Inputs that fit
        ``compute_chunk_tokens x blocks`` run whole, a few blocks per job (no cache, full-size products: as fast
        as one call); longer ones run as chunks of positions over a temporary cache.
        """
        self.check_span(start, end)
        self.check_adapter(adapter)
        wire_dtype = hidden.dtype
        x = self.check_hidden(hidden, None)
        batch, length = x.shape[0], x.shape[1]
        budget = self.cfg.compute_chunk_tokens * (end - start)  # token-blocks per compute job
        if batch * length <= budget:
            per_job = budget // (batch * length)  # blocks per compute job, at least one
            for first in range(start, end, per_job):

                def blocks(x: torch.Tensor = x, first: int = first) -> torch.Tensor:
                    with torch.inference_mode():
                        return self.span(x, None, 0, start=first, end=min(end, first + per_job), adapter=adapter)

                x = await self._compute.run(blocks, Priority.FORWARD, peer)
            outputs = [x]
        else:
            chunk = max(1, self.cfg.compute_chunk_tokens // batch)  # positions per compute job
            cache = SpanCache(start, end - start, length)
            outputs = []
            for i in range(0, length, chunk):
                part = x[:, i : i + chunk]

                def run(part: torch.Tensor = part) -> torch.Tensor:
                    with torch.inference_mode():
                        return self.span(part, cache, 0, start=start, end=end, adapter=adapter)

                outputs.append(await self._compute.run(run, Priority.FORWARD, peer))
        self.tokens_processed += batch * length
        if self.ledger is not None:
            self.ledger.add(peer, batch * length)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out.to("cpu", wire_dtype)

    async def compute(self, fn: Callable[[], T], peer: str = "") -> T:
        """Run ``fn`` on the compute thread as a forward-priority job of ``peer`` (training calls use it)."""
        return await self._compute.run(fn, Priority.FORWARD, peer)

    def count_processed(self, tokens: int) -> None:
        """Count ``tokens`` a job run through :meth:`compute` processed (training forwards)."""
        self.tokens_processed += tokens

    def queued(self) -> int:
        """Requests waiting for the compute thread."""
        return len(self._compute)

    def shutdown(self) -> None:
        """Stop the compute thread."""
        self._compute.shutdown()

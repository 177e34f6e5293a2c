"""Running a span: input checks, sessions with reserved cache and per-peer caps, and one fair compute thread."""

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
from corolla.engine.models.cache_size import token_cache_bytes
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.server.compute_queue import Batchable, ComputeThread, Priority
from corolla.engine.server.kv_cache import CacheBudget, cache_bytes_per_token
from corolla.engine.server.ledger import Ledger
from corolla.engine.server.limits import PeerBudget

logger = logging.getLogger(__name__)

BATCH_LENGTH_BUCKET = 512  # decode steps batch together when their sessions hold the same multiple of this many tokens
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
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    closed_because: str | None = None  # why the server closed it (reclaimed, lifetime over), if it did
    favored: bool = False  # its client proved it also serves (server/contributors.py): its steps go first
    adapter: str | None = None  # the LoRA adapter its steps run with


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
        self.budget = CacheBudget(cfg.cache_bytes)
        self.sessions: dict[str, ServerSession] = {}
        self.tokens_processed = 0
        self.rows_batched = 0  # decode rows that ran in one forward with another session's
        self.ledger = ledger
        # Hidden states received and not yet answered (activations besides the cache), per peer and in total.
        self.tokens_in_flight = PeerBudget(
            "tokens in flight", cfg.max_tokens_in_flight_per_peer, cfg.max_tokens_in_flight
        )
        self._lock = threading.Lock()
        # One compute thread: requests run one at a time on the device, inference steps first, peers in turn.
        self._compute = ComputeThread()

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
    ) -> ServerSession:
        """Reserve cache for a new session of ``peer`` or raise CacheFullError / ProtocolError.

        When the server is full, sessions idle for ``session_reclaim_idle`` seconds or older than
        ``session_max_lifetime`` give their slot and cache to the new one (longest idle first).
        """
        self.check_span(start, end)
        self.check_adapter(adapter)
        if max_length > self.cfg.max_length:
            raise ProtocolError(f"max_length {max_length} exceeds this server's limit of {self.cfg.max_length}")
        if batch_size > self.cfg.max_batch_size:
            raise ProtocolError(f"batch size {batch_size} exceeds this server's limit of {self.cfg.max_batch_size}")
        per_token = cache_bytes_per_token(self.token_bytes[start:end])
        nbytes = per_token * max_length * batch_size
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
                adapter=adapter,
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
        """Close the session idle longest if it has been idle ``session_reclaim_idle`` s (lock held)."""
        now = time.monotonic()
        idle = [s for s in self.sessions.values() if now - s.last_used >= self.cfg.session_reclaim_idle]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        self._drop(victim, f"it was idle for {now - victim.last_used:.0f} s while the server was full")
        return True

    def _drop(self, session: ServerSession, reason: str) -> None:
        """Close a session on the server's initiative (lock held); its next step gets the reason."""
        logger.info("closed session …%s of %s: %s", session.session_id[-6:], session.peer[-6:], reason)
        session.closed_because = reason
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_bytes)

    def close_session(self, session: ServerSession) -> None:
        """Free a session's cache reservation (idempotent)."""
        with self._lock:
            if self.sessions.get(session.session_id) is session:
                del self.sessions[session.session_id]
                self.budget.release(session.reserved_bytes)

    def cache_tokens_left(self) -> int:
        """How many more tokens (one sequence over the whole span) the cache budget could hold."""
        per_token = cache_bytes_per_token(self.token_bytes[self.start : self.end])
        return max(0, self.budget.free // max(1, per_token))

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
        if position + x.shape[1] > session.max_length:
            raise ProtocolError(
                f"{position + x.shape[1]} tokens exceed the session's max_length of {session.max_length}; "
                "open the session with a larger max_length"
            )
        session.last_used = time.monotonic()
        tokens = x.shape[0] * x.shape[1]
        with self.tokens_in_flight.holding(session.peer, tokens):
            if x.shape[1] == 1 and position > 0 and self.cfg.batch_rows > 1:
                # A decode step: it may run in one forward with other sessions' steps over the same blocks.
                out = (await self._run_decode([(session, position, x)]))[0]
            else:
                # A prompt runs as chunks of at most compute_chunk_tokens, so other sessions' steps run between.
                chunk = max(1, self.cfg.compute_chunk_tokens // x.shape[0])
                parts = []
                for i in range(0, x.shape[1], chunk):
                    part = x[:, i : i + chunk]

                    def run(part: torch.Tensor = part, at: int = position + i) -> torch.Tensor:
                        self._check_not_reclaimed(session)
                        with torch.inference_mode():
                            session.cache.truncate(at)
                            return self.span(
                                part, session.cache, start=session.start, end=session.end, adapter=session.adapter
                            )

                    parts.append(await self._compute.run(run, *self._turn(session), favored=session.favored))
                out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        session.last_used = time.monotonic()
        self.tokens_processed += tokens
        if self.ledger is not None:
            self.ledger.add(session.peer, tokens)
        return out.to("cpu", wire_dtype)

    def _batch_key(self, session: ServerSession, position: int) -> tuple[object, ...]:
        """Decode steps of equal keys may share a forward: same blocks and adapter, similar lengths.

        Sessions of similar lengths only, so that padding every row to the longest one (one block's keys at a
        time) costs at most a bucket's worth of extra keys per row. One adapter per batch: the LoRA weights are
        switched per compute job. The family may split positions further (Llama 4: one attention temperature
        per batch).
        """
        group = self.span.family.batch_group(self.span.config, position)
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
            if not 0 < position <= s.cache.length:
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
        for s, _ in steps:
            s.last_used = now
        parts = torch.split(x, rows, dim=0)
        with self.tokens_in_flight.holding(first.peer, sum(rows)):
            outs = await self._run_decode(
                [(s, position, part) for (s, position), part in zip(steps, parts, strict=True)]
            )
        now = time.monotonic()
        for s, _ in steps:
            s.last_used = now
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
            raise SessionClosedError(f"this server closed session {session.session_id!r}: open a new one")

    def _decode_many(self, steps: list[_DecodeStep]) -> list[torch.Tensor]:
        """One token of each session (all over the same blocks) in one forward (runs on the compute thread)."""
        for s, _, _ in steps:
            self._check_not_reclaimed(s)
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

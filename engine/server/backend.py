"""Running a span: input checks, sessions with reserved cache, and one compute thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from corolla.engine.config import ServerConfig
from corolla.engine.errors import CacheFullError, ProtocolError
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.server.kv_cache import CacheBudget, cache_bytes_per_token


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
    last_used: float = field(default_factory=time.monotonic)


class SpanBackend:
    """Blocks ``start..end-1`` loaded on a device, with the checks every peer request goes through."""

    def __init__(self, span: BlockSpan, config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype) -> None:
        self.span = span
        self.config = config
        self.cfg = cfg
        self.dtype = dtype
        self.device = next(span.layers.parameters()).device
        self.start, self.end = span.start, span.end
        self.hidden_size = int(config.hidden_size)
        self.kv_heads, self.head_dim = span.family.kv_shape(config)  # what one block caches per token
        self.budget = CacheBudget(cfg.cache_bytes)
        self.sessions: dict[str, ServerSession] = {}
        self.tokens_processed = 0
        self._lock = threading.Lock()
        # One compute thread: requests are serialised on the device, the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")

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

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(self, session_id: str, start: int, end: int, max_length: int, batch_size: int) -> ServerSession:
        """Reserve cache for a new session or raise CacheFullError / ProtocolError."""
        self.check_span(start, end)
        if max_length > self.cfg.max_length:
            raise ProtocolError(f"max_length {max_length} exceeds this server's limit of {self.cfg.max_length}")
        if batch_size > self.cfg.max_batch_size:
            raise ProtocolError(f"batch size {batch_size} exceeds this server's limit of {self.cfg.max_batch_size}")
        with self._lock:
            if session_id in self.sessions:
                raise ProtocolError(f"session {session_id!r} is already open here")
            if len(self.sessions) >= self.cfg.max_sessions:
                raise CacheFullError(f"this server already has {self.cfg.max_sessions} open sessions; retry later")
            per_token = cache_bytes_per_token(end - start, self.kv_heads, self.head_dim, self.dtype.itemsize)
            nbytes = per_token * max_length * batch_size
            self.budget.reserve(nbytes, f"a session of {batch_size}x{max_length} tokens over {end - start} blocks")
            session = ServerSession(
                session_id,
                start,
                end,
                max_length,
                batch_size,
                nbytes,
                SpanCache(start, end - start, max_length),
            )
            self.sessions[session_id] = session
            return session

    def close_session(self, session: ServerSession) -> None:
        """Free a session's cache reservation (idempotent)."""
        with self._lock:
            if self.sessions.pop(session.session_id, None) is not None:
                self.budget.release(session.reserved_bytes)

    def cache_tokens_left(self) -> int:
        """How many more tokens (one sequence over the whole span) the cache budget could hold."""
        per_token = cache_bytes_per_token(self.end - self.start, self.kv_heads, self.head_dim, self.dtype.itemsize)
        return max(0, self.budget.free // max(1, per_token))

    # ---- compute ----------------------------------------------------------------------------
    async def inference_step(self, session: ServerSession, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Append ``hidden`` at ``position`` of the session; return the span's outputs (wire dtype)."""
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

        def run() -> torch.Tensor:
            with torch.inference_mode():
                session.cache.truncate(position)
                out = self.span(x, session.cache, start=session.start, end=session.end)
            return out.to("cpu", wire_dtype)

        out = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self.tokens_processed += x.shape[0] * x.shape[1]
        return out

    async def forward(self, start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        """Stateless forward of full sequences through blocks ``start..end-1``."""
        self.check_span(start, end)
        wire_dtype = hidden.dtype
        x = self.check_hidden(hidden, None)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                out = self.span(x, None, 0, start=start, end=end)
            return out.to("cpu", wire_dtype)

        out = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self.tokens_processed += x.shape[0] * x.shape[1]
        return out

    def shutdown(self) -> None:
        """Stop the compute thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)

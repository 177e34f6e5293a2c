"""Cache budget: sessions reserve attention-cache (and recurrent-state) memory up front, so no step can run out of it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from corolla.engine.errors import CacheFullError


def cache_bytes_per_token(block_token_bytes: Sequence[int]) -> int:
    """Bytes that one token of one sequence takes over some blocks, given each block's (as measured by
    ``corolla.engine.models.cache_size.token_cache_bytes``: what the block's layer really stores)."""
    return sum(block_token_bytes)


def session_cache_bytes(
    block_token_bytes: Sequence[int], block_state_bytes: Sequence[int], max_length: int, batch_size: int
) -> int:
    """Bytes a session of ``batch_size`` sequences of up to ``max_length`` tokens reserves over some blocks.

    Attention blocks hold keys/values per token (``block_token_bytes``, see :func:`cache_bytes_per_token`);
    linear-attention blocks hold a recurrent state per sequence whatever its length (``block_state_bytes``,
    measured by ``corolla.engine.models.cache_size.state_cache_bytes``), counted twice: during a step the state
    as it was when the step began is kept too (a failed or resent step goes back to it).
    """
    per_sequence = cache_bytes_per_token(block_token_bytes) * max_length + 2 * sum(block_state_bytes)
    return per_sequence * batch_size


@dataclass
class CacheBudget:
    """Thread-safe accounting of reserved cache bytes against a fixed budget."""

    capacity: int  # bytes all sessions may reserve together
    used: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` or raise CacheFullError saying how much is free."""
        with self._lock:
            if self.used + nbytes > self.capacity:
                free = self.capacity - self.used
                raise CacheFullError(
                    f"cache full: {what} needs {nbytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free of "
                    f"{self.capacity / 2**20:.1f} MiB. Ask for a shorter max_length or a smaller batch, "
                    "or retry later (another server may have room)."
                )
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        """Give back a reservation."""
        with self._lock:
            self.used = max(0, self.used - nbytes)

    @property
    def free(self) -> int:
        """Bytes not reserved."""
        return self.capacity - self.used

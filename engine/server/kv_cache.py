"""Cache budget: sessions reserve attention-cache memory up front, so no step can run out of it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from corolla.engine.errors import CacheFullError


def cache_bytes_per_token(block_token_bytes: Sequence[int]) -> int:
    """Bytes that one token of one sequence takes over some blocks, given each block's (as measured by
    ``corolla.engine.models.cache_size.token_cache_bytes``: what the block's layer really stores)."""
    return sum(block_token_bytes)


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

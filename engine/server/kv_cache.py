"""Cache budget: sessions reserve attention-cache memory up front, so no step can run out of it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from corolla.engine.errors import CacheFullError


def cache_bytes_per_token(num_blocks: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of keys + values that one token of one sequence takes over ``num_blocks`` blocks."""
    return 2 * num_blocks * kv_heads * head_dim * dtype_bytes


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

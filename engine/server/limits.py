"""Per-peer accounting: how much of a shared resource each client peer holds, capped per peer and in total.

Used for the tokens of requests in flight (hidden states received and not yet answered: the activations a
server holds besides its attention cache) and for sessions per peer. Pure and thread-safe; the handler and
the backend only call it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from corolla.engine.errors import CacheFullError


class PeerBudget:
    """Amounts held per peer, refused once a peer or everyone together would pass a cap."""

    def __init__(self, what: str, per_peer: int, total: int) -> None:
        self.what = what  # plural noun with unit, for messages ("tokens in flight")
        self.per_peer = per_peer
        self.total = total
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str, amount: int) -> None:
        """Hold ``amount`` more for ``peer`` or raise CacheFullError saying which cap was hit."""
        with self._lock:
            mine = self._held.get(peer, 0)
            if mine + amount > self.per_peer:
                raise CacheFullError(
                    f"you would hold {mine + amount} {self.what} on this server, over its limit of {self.per_peer} "
                    "per peer; wait for your running requests to finish, or send less at once"
                )
            used = sum(self._held.values())
            if used + amount > self.total:
                raise CacheFullError(
                    f"this server holds {used} {self.what} of its limit of {self.total}; "
                    "retry later or use another server"
                )
            self._held[peer] = mine + amount

    def release(self, peer: str, amount: int) -> None:
        """Give back ``amount`` held by ``peer``."""
        with self._lock:
            left = self._held.get(peer, 0) - amount
            if left > 0:
                self._held[peer] = left
            else:
                self._held.pop(peer, None)

    @contextmanager
    def holding(self, peer: str, amount: int) -> Iterator[None]:
        """Hold ``amount`` for the duration of a ``with`` block."""
        self.acquire(peer, amount)
        try:
            yield
        finally:
            self.release(peer, amount)

    def held(self, peer: str | None = None) -> int:
        """What ``peer`` holds, or everyone together."""
        with self._lock:
            return self._held.get(peer, 0) if peer is not None else sum(self._held.values())

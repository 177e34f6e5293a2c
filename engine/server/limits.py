"""Per-peer and per-address-group accounting: how much of a shared resource each client holds, capped per
peer, per address group (``routing/groups.py``: identities are free, addresses are not) and in total.

Used for the tokens of requests in flight (hidden states received and not yet answered: the activations a
server holds besides its attention cache). Pure and thread-safe; the handler and the backend only call it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from corolla.engine.errors import CacheFullError


def _add(table: dict[str, int], key: str, amount: int) -> None:
    left = table.get(key, 0) + amount
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)


class PeerBudget:
    """Amounts held per peer and per address group, refused once a peer, its group or everyone together
    would pass a cap."""

    def __init__(self, what: str, per_peer: int, total: int, per_group: int | None = None) -> None:
        self.what = what  # plural noun with unit, for messages ("tokens in flight")
        self.per_peer = per_peer
        self.per_group = total if per_group is None else per_group
        self.total = total
        self._held: dict[str, int] = {}
        self._by_group: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str, amount: int, group: str = "") -> None:
        """Hold ``amount`` more for ``peer`` (of address ``group``) or raise CacheFullError naming the cap."""
        with self._lock:
            mine = self._held.get(peer, 0)
            if mine + amount > self.per_peer:
                raise CacheFullError(
                    f"you would hold {mine + amount} {self.what} on this server, over its limit of {self.per_peer} "
                    "per peer; wait for your running requests to finish, or send less at once"
                )
            ours = self._by_group.get(group, 0)
            if group and ours + amount > self.per_group:
                raise CacheFullError(
                    f"peers of your address group {group} would hold {ours + amount} {self.what} on this server, "
                    f"over its limit of {self.per_group} per group; wait for running requests to finish"
                )
            used = sum(self._held.values())
            if used + amount > self.total:
                raise CacheFullError(
                    f"this server holds {used} {self.what} of its limit of {self.total}; "
                    "retry later or use another server"
                )
            self._held[peer] = mine + amount
            if group:
                self._by_group[group] = ours + amount

    def release(self, peer: str, amount: int, group: str = "") -> None:
        """Give back ``amount`` held by ``peer`` (of ``group``, as acquired)."""
        with self._lock:
            _add(self._held, peer, -amount)
            if group:
                _add(self._by_group, group, -amount)

    @contextmanager
    def holding(self, peer: str, amount: int, group: str = "") -> Iterator[None]:
        """Hold ``amount`` for the duration of a ``with`` block."""
        self.acquire(peer, amount, group)
        try:
            yield
        finally:
            self.release(peer, amount, group)

    def held(self, peer: str | None = None) -> int:
        """What ``peer`` holds, or everyone together."""
        with self._lock:
            return self._held.get(peer, 0) if peer is not None else sum(self._held.values())

    def held_by_group(self, group: str) -> int:
        """What the peers of address ``group`` hold together."""
        with self._lock:
            return self._by_group.get(group, 0)

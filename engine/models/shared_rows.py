"""Sessions that keep decoding together keep their keys/values as rows of one tensor per block.

A batched decode step (models/batched.py) hands attention every session's keys side by side, ``[rows,
kv_heads, keys, head_dim]``. Built afresh each step, that means copying every session's whole cache into a
padded tensor and back, every block, every step (about 40% of a small model's decode round). A
:class:`SharedRows` removes the copy for sessions that step together again and again (a client's concurrent
sessions): each block's keys and values live in one ``[rows, kv_heads, capacity, head_dim]`` tensor and each
session's :class:`~corolla.engine.models.span.SpanLayerCache` storage is a view of its rows, so

- a batched step writes each row's new key at that row's own position (one scatter per block) and gives
  attention a view of the first ``longest + 1`` positions (the other rows' tails are masked, and finite:
  the tensor starts zeroed and only ever holds keys);
- a session's own steps (a prompt, a rewind, a prefix copied from the prefix cache) write into the same view
  as into their own storage.

Rows are not padded beyond what the sessions reserved: ``rows x capacity`` never exceeds the tokens the
sessions reserved together (their ``max_length`` times their batch sizes), so the server's cache budget still
holds. :meth:`SharedRows.dissolve` gives each session compact storage of its own again (copying its tokens
out) when the set of sessions changes, when one of them needs more positions than the rows have, or when one
closes: the shared tensor is then freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from corolla.engine.models.span import SpanCache

__all__ = ["SharedRows", "shared_capacity"]

MIN_CAPACITY = 64  # positions a shared tensor holds at least (as a session's own storage starts)


def shared_capacity(caches: list[SpanCache], rows: list[int], needed: int, held: int = 0) -> int | None:
    """Positions to give the shared rows of ``caches`` (``rows`` sequences each) that must hold ``needed``
    positions, growing from ``held`` by doubling; None if that would take more than the sessions reserved.

    The rows' bytes stay within the sessions' reservations: ``sum(rows) x capacity <= sum(rows_i x
    max_length_i)``.
    """
    limit = sum(r * c.max_length for r, c in zip(rows, caches, strict=True)) // sum(rows)
    if needed > limit:
        return None
    return min(limit, max(needed, 2 * held, MIN_CAPACITY))


class SharedRows:
    """The keys/values of several sessions' caches (same blocks) as rows of one tensor per block.

    Built on the compute thread between steps; every member's storage becomes a view of its rows.
    """

    def __init__(self, caches: list[SpanCache], capacity: int) -> None:
        """Move ``caches`` (each holding tokens in every block, none in another :class:`SharedRows` that it
        would still need) into shared rows of ``capacity`` positions, in this order."""
        self.caches = list(caches)
        self.capacity = capacity
        self.members = frozenset(id(c) for c in caches)
        self.rows: list[slice] = []
        first = 0
        for cache in caches:
            n = cache.batch_rows
            if n is None:
                raise ValueError("a session cache joins shared rows only after it holds tokens")
            self.rows.append(slice(first, first + n))
            first += n
        self.total_rows = first
        self.keys: list[torch.Tensor] = []  # per block: [total_rows, kv_heads, capacity, key_dim]
        self.values: list[torch.Tensor] = []
        for i in range(len(caches[0].span_layers)):
            k0, v0 = caches[0].span_layers[i].keys, caches[0].span_layers[i].values
            if k0 is None or v0 is None:
                raise ValueError("only blocks that keep keys/values share rows")
            keys = k0.new_zeros((first, k0.shape[1], capacity, k0.shape[3]))  # zeros: masked tails stay finite
            values = v0.new_zeros((first, v0.shape[1], capacity, v0.shape[3]))
            self.keys.append(keys)
            self.values.append(values)
        old = {id(c.group): c.group for c in caches if c.group is not None}
        for cache, part in zip(caches, self.rows, strict=True):
            held = cache.length
            for layer, keys, values in zip(cache.span_layers, self.keys, self.values, strict=True):
                if layer.keys is None or layer.values is None:
                    raise ValueError("only blocks that keep keys/values share rows")
                keys[part, :, :held] = layer.keys[:, :, :held]
                values[part, :, :held] = layer.values[:, :, :held]
                layer.keys, layer.values = keys[part], values[part]  # views: the session writes into its rows
            cache.group = self
        for group in old.values():  # sessions left behind get storage of their own; the old tensors go
            group.dissolve()

    def holds(self, caches: list[SpanCache]) -> bool:
        """Whether exactly ``caches`` (in any order) share these rows."""
        return len(caches) == len(self.caches) and all(c.group is self for c in caches)

    def dissolve(self) -> None:
        """Give every member still here storage of its own (its tokens copied out, the current step's too)
        and free the shared tensors."""
        for cache in self.caches:
            if cache.group is not self:
                continue
            held = cache.length + cache.pending
            size = min(cache.max_length, max(held, 2 * cache.length, MIN_CAPACITY))
            for layer in cache.span_layers:
                keys, values = layer.keys, layer.values
                if keys is None or values is None:
                    continue
                own_k = keys.new_empty((*keys.shape[:2], size, keys.shape[3]))
                own_v = values.new_empty((*values.shape[:2], size, values.shape[3]))
                own_k[:, :, :held] = keys[:, :, :held]
                own_v[:, :, :held] = values[:, :, :held]
                layer.keys, layer.values = own_k, own_v
            cache.group = None
        self.caches, self.keys, self.values = [], [], []

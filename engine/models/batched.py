"""One forward for the decode steps of several sessions over the same blocks (batching across sessions).

Each session keeps its own :class:`SpanCache` (storage preallocated per session, appended in place). A batched
step stacks every session's new token into one ``[rows, 1, hidden]`` input; each row gets its own position
and a mask that hides the keys past its own length. Inside a block, :class:`RowsCache` appends each row's new
keys/values to that row's session cache and hands attention the sessions' keys side by side, right-padded to
the longest (the padding is masked out). Everything else in the block (projections, MLP, experts) runs once for
all rows. The outputs equal running the sessions one by one, up to floating-point summation order.

Handing attention the keys side by side copies every session's cache each step. Sessions that step together a
second time in a row therefore move into :class:`~corolla.engine.models.shared_rows.SharedRows` (their storage
becomes rows of one tensor per block): from then on a step writes each row's key in place and attention reads
a view, with no copy, as long as the same sessions step together.

Sessions whose blocks keep a recurrent state (Qwen3-Next's linear attention) are not batched together: their
single-token step updates each state in place where transformers finds it, one cache's tensors, so rows of
several sessions cannot share it; the server gives each such session its own batch key.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from corolla.engine.models.family import row_masks
from corolla.engine.models.shared_rows import SharedRows, shared_capacity
from corolla.engine.models.span import BlockSpan, SpanCache

__all__ = ["RowsCache", "run_rows"]


class RowsCache(Cache):
    """The caches of several sessions seen by the blocks as one cache of ``sum(batch sizes)`` rows."""

    def __init__(self, caches: list[SpanCache], shared: SharedRows | None = None) -> None:
        """``caches`` in row order; ``shared``: the rows they all live in, in this order (None: none)."""
        self.caches = caches
        self.shared = shared
        self.rows: list[slice] = []  # which rows of the batch belong to each cache
        first = 0
        for cache in caches:
            if cache.batch_rows is None:
                raise ValueError("a session cache joins a batch only after it holds tokens")
            self.rows.append(slice(first, first + cache.batch_rows))
            first += cache.batch_rows
        self.keys = max(cache.length for cache in caches) + 1  # key positions in this step
        # Tokens each row's session holds: the position of its new token.
        self.held = [cache.length for cache in caches for _ in range(cache.batch_rows or 0)]
        self._common = self.held[0] if len(set(self.held)) == 1 else None  # every row at one position
        self._row_index = torch.arange(len(self.held))  # where each row's new key goes in shared rows
        self._positions = torch.tensor(self.held)
        super().__init__(layers=list(caches[0].span_layers))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's new keys/values [rows, kv_heads, 1, head_dim] to its session's cache; return all
        sessions' keys/values [rows, kv_heads, keys, head_dim], right-padded with zeros (masked)."""
        if self.shared is not None:
            return self._update_shared(self.shared, key_states, value_states, layer_idx - self.caches[0].start)
        rows, heads, _, key_dim = key_states.shape
        keys = key_states.new_zeros((rows, heads, self.keys, key_dim))
        values = value_states.new_zeros((rows, value_states.shape[1], self.keys, value_states.shape[3]))
        for cache, part in zip(self.caches, self.rows, strict=True):
            k, v = cache.update(key_states[part], value_states[part], layer_idx)  # views of the session's storage
            keys[part, :, : k.shape[2]] = k
            values[part, :, : v.shape[2]] = v
        return keys, values

    def get_seq_length(self, layer_idx: int | None = 0, *args: Any) -> int:
        """Key positions before this step (the longest session's)."""
        return self.keys - 1

    def _update_shared(
        self, shared: SharedRows, key_states: torch.Tensor, value_states: torch.Tensor, block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new key/value [rows, kv_heads, 1, dim] at its own position in the shared rows; return
        views of their first ``longest + 1`` positions (no copy)."""
        keys, values = shared.keys[block], shared.values[block]
        if self._common is not None:  # every row at the same position (sessions that started together)
            keys[:, :, self._common : self._common + 1] = key_states
            values[:, :, self._common : self._common + 1] = value_states
        else:
            if self._positions.device != keys.device:
                self._row_index, self._positions = self._row_index.to(keys.device), self._positions.to(keys.device)
            keys[self._row_index, :, self._positions] = key_states[:, :, 0]
            values[self._row_index, :, self._positions] = value_states[:, :, 0]
        return keys[:, :, : self.keys], values[:, :, : self.keys]


def run_rows(
    span: BlockSpan,
    inputs: list[torch.Tensor],
    caches: list[SpanCache],
    start: int,
    end: int,
    adapter: str | None = None,
) -> list[torch.Tensor]:
    """Decode one token for each session in one forward of blocks ``start..end-1``.

    Args:
        span: the blocks.
        inputs: per session, [batch_i, 1, hidden] hidden states of its next token.
        caches: per session, its cache over exactly blocks ``start..end-1``, holding at least one token.
        adapter: the span's LoRA adapter every row runs with (None: the base model).

    Returns:
        Per session, [batch_i, 1, hidden] outputs, as ``span(inputs[i], caches[i])`` would give.
    """
    if len(inputs) != len(caches) or not inputs:
        raise ValueError("one input per cache, at least one")
    for x, cache in zip(inputs, caches, strict=True):
        if cache.batch_rows is None:
            raise ValueError("a session cache joins a batch only after it holds tokens")
        if x.shape[1] != 1 or x.shape[0] != cache.batch_rows:
            raise ValueError(f"a batched step takes one token per row of its cache, got {list(x.shape)}")
    if len(caches) == 1:  # one session: its own forward (the reference the batched one must equal)
        return [span(inputs[0], caches[0], start=start, end=end, adapter=adapter)]
    if any(cache.recurrent for cache in caches):
        raise ValueError(
            "sessions whose blocks keep a recurrent state (linear attention) run their steps one session at a time"
        )
    groups = {span.family.batch_group(span.config, cache.length) for cache in caches}
    if len(groups) > 1:
        raise ValueError(
            f"sessions at positions of different batch groups {sorted(map(str, groups))} cannot share a step"
        )
    order = list(range(len(caches)))  # the step's sessions in row order
    shared = _shared_rows(caches, [x.shape[0] for x in inputs])
    if shared is not None:
        place = {id(cache): i for i, cache in enumerate(caches)}
        order = [place[id(cache)] for cache in shared.caches]
    inputs, caches = [inputs[i] for i in order], [caches[i] for i in order]
    hidden = torch.cat(inputs, dim=0)  # [rows, 1, hidden]
    rows = RowsCache(caches, shared)
    held = rows.held  # tokens each row's session holds: the position of its new token
    positions = torch.tensor(held, device=hidden.device)[:, None]  # [rows, 1]
    blocks = range(start, end)
    masks = row_masks(span.config, held, blocks, hidden.dtype, hidden.device)
    kwargs_per_block = span.family.block_inputs(span.config, span.rotary_emb, hidden, positions, masks, blocks)
    for cache in caches:
        cache.begin_step(1)
    try:
        with span.adapter_choice.selecting(adapter):
            for block, kwargs in zip(blocks, kwargs_per_block, strict=True):
                output = span.layers[block - span.start](hidden, **kwargs, **{span.cache_kwarg: rows}, use_cache=True)
                hidden = span.family.layer_output(output)
    except BaseException:
        for cache in caches:
            cache.abort_step()
        raise
    for cache in caches:
        cache.end_step()
    outs = torch.split(hidden, [x.shape[0] for x in inputs], dim=0)
    by_session: list[torch.Tensor] = [hidden] * len(outs)
    for i, out in zip(order, outs, strict=True):
        by_session[i] = out
    return by_session


def _shared_rows(caches: list[SpanCache], rows: list[int]) -> SharedRows | None:
    """The shared rows this step runs on: the ones ``caches`` already share (grown if they are too short),
    or new ones if these sessions also stepped together last time; None to copy their keys side by side."""
    members = frozenset(id(cache) for cache in caches)
    repeated = all(cache.last_batch == members for cache in caches)
    for cache in caches:
        cache.last_batch = members
    needed = max(cache.length for cache in caches) + 1
    shared = caches[0].group
    if shared is not None and shared.holds(caches):
        if needed <= shared.capacity:
            return shared
        held = shared.capacity
    elif repeated:
        held = 0
    else:
        return None
    if any(layer.keys is None for cache in caches for layer in cache.span_layers):
        return None  # a block keeping no keys/values here (a recurrent state): nothing to share
    capacity = shared_capacity(caches, rows, needed, held)
    return None if capacity is None else SharedRows(caches, capacity)

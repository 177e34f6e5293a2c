"""What one token takes in each block's attention cache, measured from what the family's layer stores.

The cache budget must count what the decoder layers really write into a :class:`SpanCache`, not what a
config suggests: transformers changes which heads a layer keeps between releases (Falcon's new decoder
architecture stored one key head per attention head up to 5.24 and its ``num_kv_heads`` from 5.25 on).
So each block of the model is built on the ``meta`` device (no memory, no compute) and runs one token
through the family's own cache path (its block inputs, its layer, a :class:`SpanCache`, as ``BlockSpan``
runs them); the bytes its cache layer then holds are one token's. A block that
stores nothing (no attention cache) counts zero. Results are kept per config and dtype.

A linear-attention block (Qwen3-Next) stores no keys or values but a recurrent state whose size does not depend
on the session's length: the same one-token run measures it, per sequence (:func:`state_cache_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any

import torch
from transformers import PretrainedConfig

from corolla.engine.models.span import BlockSpan, SpanCache

__all__ = ["state_cache_bytes", "token_cache_bytes"]

_measured: dict[tuple[str, torch.dtype], tuple[tuple[int, ...], tuple[int, ...]]] = {}
_lock = threading.Lock()


class _Stored(Exception):
    """Raised by :class:`_ProbeCache` once a block has stored its keys and values: the rest need not run."""


class _ProbeCache(SpanCache):
    """A one-token cache of one block that stops the block's forward right after the block stored its token."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store as :class:`SpanCache` does, then stop (what the block computes after it leaves the cache as is)."""
        super().update(key_states, value_states, layer_idx, *args, **kwargs)
        raise _Stored

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Store as :class:`SpanCache` does (after the block stored its convolution state), then stop."""
        super().update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)
        raise _Stored


def token_cache_bytes(config: PretrainedConfig, dtype: torch.dtype) -> tuple[int, ...]:
    """Bytes one token of one sequence takes in the cache of each block of the model (keys and values).

    Args:
        config: the model config (not modified).
        dtype: the dtype the blocks run in (what their cached keys and values are stored as).

    Returns:
        One entry per block ``0..num_hidden_layers - 1`` (0 for a block that keeps a recurrent state instead).
    """
    return _measured_bytes(config, dtype)[0]


def state_cache_bytes(config: PretrainedConfig, dtype: torch.dtype) -> tuple[int, ...]:
    """Bytes one sequence's recurrent state takes in each block of the model, whatever its length.

    Returns:
        One entry per block ``0..num_hidden_layers - 1``: the convolution and recurrent state of a
        linear-attention block, 0 for an attention block.
    """
    return _measured_bytes(config, dtype)[1]


def _measured_bytes(config: PretrainedConfig, dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[int, ...]]:
    key = (config.to_json_string(use_diff=False), dtype)
    with _lock:
        known = _measured.get(key)
    if known is None:
        known = _measure(copy.deepcopy(config), dtype)  # BlockSpan sets the attention kernel on its config
        with _lock:
            _measured[key] = known
    return known


@torch.inference_mode()
def _measure(config: PretrainedConfig, dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[int, ...]]:
    blocks = int(config.num_hidden_layers)
    span = BlockSpan(config, 0, blocks, empty=True).to(dtype)  # blocks on meta; the positions module (small) not
    # The family's inputs for one token at position 0, computed where the positions module is (transformers
    # 5.0's rotary modules cannot run on meta), then moved to meta for the blocks.
    hidden = torch.zeros(1, 1, int(config.hidden_size), dtype=dtype)  # [batch 1, 1 token, hidden]
    inputs = span.family.layer_inputs(span.config, span.rotary_emb, hidden, 0, range(blocks))
    out, states = [], []
    for block, kwargs in enumerate(inputs):
        cache = _ProbeCache(block, 1, max_length=1)  # storage for exactly one token of one sequence
        cache.begin_step(1)
        with contextlib.suppress(_Stored):  # a block that stores nothing runs to its end
            layer_kwargs = {name: _on_meta(value) for name, value in kwargs.items()}
            span.layers[block](hidden.to("meta"), **layer_kwargs, **{span.cache_kwarg: cache}, use_cache=True)
        layer = cache.span_layers[0]
        stored = [t for t in (layer.keys, layer.values) if t is not None]
        out.append(sum(t.numel() * t.element_size() for t in stored))
        state = cache.states.get(block)
        states.append(0 if state is None else state.nbytes())
    return tuple(out), tuple(states)


def _on_meta(value: Any) -> Any:
    """A block input (a tensor, a tuple of them such as rotary cos/sin, or anything else) with its tensors on meta."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, tuple):
        return tuple(_on_meta(v) for v in value)
    return value

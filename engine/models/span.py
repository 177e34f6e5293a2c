"""A span of consecutive decoder blocks, run with positions, rotary embedding, mask and a KV cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from corolla.engine.models.family import Family, build_attention_mask, cache_keyword, sliding_window_of
from corolla.engine.models.recurrent import RecurrentState, check_recurrent_support, is_recurrent_block
from corolla.engine.models.registry import get_family

if TYPE_CHECKING:
    from corolla.engine.models.shared_rows import SharedRows

__all__ = ["AdapterChoice", "BlockSpan", "SpanCache", "SpanLayerCache", "build_attention_mask", "cache_keyword"]


class AdapterChoice:
    """The LoRA adapter a span's LoRA layers (models/lora.py) add in the forward now running (None: none).

    One per span, set by the span's forward (its ``adapter`` argument) for the forward's duration. A span's
    forwards run one at a time (a server runs them all on its compute thread), so one field is enough.
    """

    def __init__(self) -> None:
        self.name: str | None = None

    @contextlib.contextmanager
    def selecting(self, name: str | None) -> Iterator[None]:
        """Run the span's LoRA layers with adapter ``name`` (None: the base model) inside this block."""
        previous = self.name
        self.name = name
        try:
            yield
        finally:
            self.name = previous


class SpanLayerCache(CacheLayerMixin):
    """Keys/values of one block for one session, in storage that grows by doubling up to ``max_length``.

    Implements the abstract methods of ``transformers.cache_utils.CacheLayerMixin`` of every supported
    transformers release (their names and signatures moved between 5.0 and 5.24), accepting and
    ignoring whatever extra arguments a release passes to ``update``.
    """

    is_sliding = False

    def __init__(self, owner: SpanCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> None:
        """Nothing to prepare: storage is allocated by the first ``update``."""
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys [batch, kv_heads, new, key_dim] and values [.., value_dim]; return all so far."""
        held = self._owner.length
        end = held + key_states.shape[2]
        keys, values = self.keys, self.values
        if keys is None or values is None or keys.shape[2] < end or keys.shape[0] != key_states.shape[0]:
            if self._owner.group is not None:  # outgrowing shared rows: every member gets its own storage first
                self._owner.group.dissolve()
                keys, values = self.keys, self.values
            capacity = min(self._owner.max_length, max(end, 2 * (keys.shape[2] if keys is not None else 0), 64))
            # Keys and values may differ in their last size (DeepSeek's latent attention stores its compressed
            # keys/values [.., kv_lora_rank] as "keys" and the rotary key part [.., rope_dim] as "values").
            grown_k = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[3]))
            grown_v = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[3]))
            if keys is not None and values is not None and keys.shape[0] == key_states.shape[0]:
                grown_k[:, :, :held] = keys[:, :, :held]
                grown_v[:, :, :held] = values[:, :, :held]
            keys, values = grown_k, grown_v
            self.keys, self.values = keys, values
            self.is_initialized = True
        keys[:, :, held:end] = key_states
        values[:, :, held:end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, *args: Any) -> int:
        """Tokens held before the current step."""
        return self._owner.length

    def get_mask_sizes(self, *args: Any) -> tuple[int, int]:
        """Unused: the span builds its own masks (kept for the abstract interface)."""
        return self._owner.length, 0

    def get_max_length(self) -> int:
        """Most tokens this session may hold."""
        return self._owner.max_length

    def get_max_cache_shape(self) -> int:
        """Same as :meth:`get_max_length` (the name transformers 5.0-5.x used)."""
        return self._owner.max_length


class SpanCache(Cache):
    """Attention keys/values of one session for the blocks of a span: a ``transformers.Cache``.

    Decoder layers call ``update(key, value, layer_idx, ...)`` with their global block index; the
    extra positional or keyword arguments differ by transformers release and are ignored. Storage
    grows by doubling up to ``max_length`` so decode steps do not copy the whole cache each time; the
    memory is *reserved* for ``max_length`` by the server's cache budget, so growth never overcommits.

    Linear-attention blocks (Qwen3-Next) keep a :class:`RecurrentState` instead, through the linear-attention
    methods of ``transformers.Cache`` (``get_conv_state``, ``update_recurrent_state``, ...); it is created by
    the block's first step. Such a cache rewinds only to 0, to its length, or to where the last step began.
    """

    def __init__(self, start: int, num_blocks: int, max_length: int) -> None:
        self.start = start
        self.max_length = max_length
        self.length = 0  # tokens held
        self._pending = 0  # tokens being appended by the current step
        self._step_began = 0  # length when the last step began (a recurrent state can go back there)
        self.span_layers = [SpanLayerCache(self) for _ in range(num_blocks)]
        self.states: dict[int, RecurrentState] = {}  # by global block index: the linear-attention blocks
        self.group: SharedRows | None = None  # shared rows its keys/values live in (models/shared_rows.py), if any
        self.last_batch: frozenset[int] = frozenset()  # the caches (ids) of the last batched step it was in
        super().__init__(layers=list(self.span_layers))

    def begin_step(self, new_tokens: int) -> None:
        """Declare how many tokens the next forward appends (every layer appends the same amount)."""
        if self.length + new_tokens > self.max_length:
            raise ValueError(f"session holds {self.length} tokens, +{new_tokens} exceeds {self.max_length}")
        self.abort_step()  # a step that began and never ended (it raised) leaves nothing behind
        if self.group is not None and self.length + new_tokens > self.group.capacity:
            self.group.dissolve()  # its rows are too short for this step: back to storage of its own, which grows
        self._pending = new_tokens
        self._step_began = self.length
        for state in self.states.values():
            state.save()

    def abort_step(self) -> None:
        """Forget a step that failed half-way (the keys it wrote past ``length`` are ignored; recurrent states
        go back to where the step began)."""
        if self._pending:
            for state in self.states.values():
                state.restore()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Tokens the step now running appends (0 between steps)."""
        return self._pending

    @property
    def batch_rows(self) -> int | None:
        """Sequences this cache holds (its storage's batch size), or None before its first step."""
        if self.length == 0:
            return None
        held = [layer.keys for layer in self.span_layers] + [state.conv for state in self.states.values()]
        first = next((t for t in held if t is not None), None)  # a span may start with a linear-attention block
        return None if first is None else int(first.shape[0])

    def end_step(self) -> None:
        """Commit the tokens appended by the step."""
        self.length += self._pending
        self._pending = 0

    @property
    def recurrent(self) -> bool:
        """Whether some block keeps a recurrent state here (which cannot rewind to any position)."""
        return bool(self.states)

    def can_rewind(self, length: int) -> bool:
        """Whether :meth:`truncate` can go back to ``length`` exactly."""
        if not 0 <= length <= self.length:
            return False
        return not self.states or length in (0, self.length, self._step_began)

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on (used to rewind a conversation)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: session holds {self.length} tokens")
        self.abort_step()  # a step that began and never ended (it raised) leaves nothing behind
        if length == self.length:
            return
        if not self.can_rewind(length):
            raise ValueError(
                f"cannot rewind to {length}: blocks here keep a recurrent state, which goes back only to 0 or to "
                f"{self._step_began} (where the last step began); replay the inputs from position 0"
            )
        for state in self.states.values():
            if length == 0:
                state.clear()
            else:
                state.restore()
        self.length = length
        self._step_began = min(self._step_began, length)

    # ---- linear-attention blocks (transformers' Cache API for conv/recurrent states) ---------------
    def _state(self, layer_idx: int) -> RecurrentState:
        if not 0 <= layer_idx - self.start < len(self.span_layers):
            raise IndexError(f"block {layer_idx} is not in this cache's span")
        state = self.states.get(layer_idx)
        if state is None:
            state = self.states[layer_idx] = RecurrentState()
        return state

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """Block ``layer_idx``'s convolution state [batch, conv_dim, kernel], None before its first step.
        Single-token steps update it in place."""
        return self._state(layer_idx).conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """Block ``layer_idx``'s recurrent state [batch, heads, key_dim, value_dim], None before its first step."""
        state = self._state(layer_idx)
        return state.recurrent if state.held else None

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Append a multi-token step's projected inputs [batch, conv_dim, new]; return the held ones before them."""
        return self._state(layer_idx).update_conv(conv_states, kwargs.get("conv_kernel_size"))

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Keep block ``layer_idx``'s recurrent state after this step."""
        self._state(layer_idx).recurrent = recurrent_states
        return recurrent_states

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether block ``layer_idx`` (default: any linear-attention block here) continues a held state."""
        if layer_idx is None:
            return any(state.held for state in self.states.values())
        return self._state(layer_idx).held

    def is_recording_past(self, layer_idx: int) -> bool:
        """Never: rewinds go through :meth:`truncate` (states are kept only as of the last step's start)."""
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """No intermediate recurrent states (transformers 5.25+ asks; they serve speculative rollbacks)."""
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        """Nothing to count (transformers 5.25+ counts in-place single-token updates): :attr:`length` is the count."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values of block ``layer_idx`` (global index); return all of them so far."""
        if not 0 <= layer_idx - self.start < len(self.span_layers):
            raise IndexError(f"block {layer_idx} is not in this cache's span")
        keys, values = self.span_layers[layer_idx - self.start].update(key_states, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int | None = 0, *args: Any) -> int:
        """Tokens held before the current step."""
        return self.length


class BlockSpan(nn.Module):
    """Decoder blocks ``start..end-1`` of a model, built from transformers' own layer modules."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, *, empty: bool = False) -> None:
        """Build blocks ``start..end-1``; ``empty=True`` allocates no weights (load them after)."""
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"span {start}:{end} is outside the model's 0:{config.num_hidden_layers} blocks")
        family = get_family(config)
        config = _with_attention(config, family)
        layer_cls = family.layer_class()
        if any(is_recurrent_block(config, i) for i in range(config.num_hidden_layers)):
            check_recurrent_support(layer_cls, config.model_type)
        self.config = config
        self.family = family
        self.start, self.end = start, end
        with torch.device("meta") if empty else contextlib.nullcontext():
            self.layers = nn.ModuleList([layer_cls(config, layer_idx=i) for i in range(start, end)])
        self.rotary_emb = family.positional(config)  # None for families without one (Bloom)
        self.windows = [sliding_window_of(config, i) for i in range(start, end)]
        self.cache_kwarg = cache_keyword(layer_cls)  # how the blocks take their cache
        self.adapters: tuple[str, ...] = ()  # LoRA adapters attached to these blocks (models/lora.py)
        self.adapter_choice = AdapterChoice()  # which of them the running forward applies

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: SpanCache | None = None,
        offset: int = 0,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start..end-1`` (default: all of the span).

        Args:
            hidden_states: [batch, new, hidden] inputs of block ``start``.
            cache: the session's cache for exactly these blocks; ``offset`` is then its length.
            offset: position of the first new token when running without a cache.
            start: first block to run (global index); end: one past the last.
            prompts: [end - start, batch, pre, hidden] deep prompts: block ``start + i`` first adds
                ``prompts[i]`` to the hidden states of the first ``pre`` positions (deep prompt tuning).
            adapter: the attached LoRA adapter to apply (None: the base model).
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        new = hidden_states.shape[1]
        if cache is not None:
            offset = cache.length
            cache.begin_step(new)
        blocks = range(start, end)
        inputs = self.family.layer_inputs(self.config, self.rotary_emb, hidden_states, offset, blocks)
        with self.adapter_choice.selecting(adapter):
            for i, (block, kwargs) in enumerate(zip(blocks, inputs, strict=True)):
                if prompts is not None:
                    pre = prompts.shape[2]
                    hidden_states = torch.cat([hidden_states[:, :pre] + prompts[i], hidden_states[:, pre:]], dim=1)
                output = self.layers[block - self.start](
                    hidden_states, **kwargs, **{self.cache_kwarg: cache}, use_cache=cache is not None
                )
                hidden_states = self.family.layer_output(output)
        if cache is not None:
            cache.end_step()
        return hidden_states


def _with_attention(config: PretrainedConfig, family: Family) -> PretrainedConfig:
    """Use the attention (SDPA where supported, else eager) and mixture-of-experts kernels transformers itself
    would use, unless the config already names an implementation that exists on every machine."""
    if getattr(config, "_attn_implementation", None) in (None, "flash_attention_2", "flex_attention"):
        config._attn_implementation = family.attention_implementation()
    if getattr(config, "_experts_implementation", None) is None:  # families without experts get "eager" (unused)
        config._experts_implementation = family.experts_implementation()
    return config

"""A family adapter: how one model family's blocks, positions, masks, client head and tensor names look.

Corolla reuses transformers' own decoder-layer modules and supplies only what a span of layers needs
around them. :class:`Family` describes the common case (rotary positions computed once per step, an
additive causal mask, a Llama-shaped checkpoint); families that differ override one method or set one
field (see ``alibi.py`` and ``registry.py``). Nothing outside the adapters assumes one family's layout.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")


@dataclass(frozen=True)
class TensorNames:
    """Where a family's tensors live in its checkpoints (names before ``.weight`` / ``.bias``).

    ``base`` is the base model's prefix (``model``, ``transformer``, ``gpt_neox``); checkpoints saved
    from the base model alone lack it, and the loader accepts both. ``lm_head`` is outside the base.
    """

    base: str = "model"
    layers: str = "layers"
    embed: str = "embed_tokens"
    norm: str = "norm"
    lm_head: str = "lm_head"
    embed_norm: str | None = None  # a norm applied right after the embeddings (Bloom)


@dataclass(frozen=True)
class ExpertNames:
    """A mixture-of-experts checkpoint layout: per-expert matrices that transformers' module keeps fused.

    On disk: ``<layer>.<moe>.experts.<e>.<gate|up|down>.weight`` and ``<layer>.<moe>.gate.weight``; in
    the module: ``mlp.experts.gate_up_proj`` [experts, 2 * inter, hidden], ``mlp.experts.down_proj``
    [experts, hidden, inter] and ``mlp.gate.weight``.
    """

    moe: str  # "block_sparse_moe" (Mixtral) or "mlp" (Qwen3-MoE)
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    """How to build and run the blocks of one model family from transformers' modules (the common case)."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix in that module, e.g. "Llama" for LlamaDecoderLayer
    layer_suffix: str = "DecoderLayer"
    names: TensorNames = TensorNames()
    layer_norm: bool = False  # final norm is torch's LayerNorm (weight and bias), not the family's RMSNorm
    norm_eps: str = "rms_norm_eps"  # config field holding the final norm's epsilon
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) (Gemma)
    experts: ExpertNames | None = None
    # Block tensors older checkpoints carry that today's modules compute instead (names end with these).
    stale: tuple[str, ...] = ("rotary_emb.inv_freq",)

    # ---- classes ----------------------------------------------------------------------------
    def cls(self, suffix: str) -> type[nn.Module]:
        """A class of the family's modeling module, e.g. ``cls("RMSNorm")``."""
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        found: type[nn.Module] = getattr(mod, f"{self.prefix}{suffix}")
        return found

    def function(self, name: str) -> Any:
        """A module-level function of the family's modeling module, e.g. ``build_alibi_tensor``."""
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, name)

    def layer_class(self) -> type[nn.Module]:
        """The decoder-layer class (one block)."""
        return self.cls(self.layer_suffix)

    def pretrained_class(self) -> type[nn.Module]:
        """The family's ``PreTrainedModel`` class (what says which attention and expert kernels it supports)."""
        return self.cls("PreTrainedModel")

    def attention_implementation(self) -> str:
        """``sdpa`` where the family's transformers model supports it, else ``eager`` (e.g. Gemma 2's softcap)."""
        return "sdpa" if getattr(self.pretrained_class(), "_supports_sdpa", False) else "eager"

    def experts_implementation(self) -> str:
        """How transformers runs a mixture of experts by default: ``grouped_mm`` where the model allows it."""
        pretrained = self.pretrained_class()
        can_set = getattr(pretrained, "_can_set_experts_implementation", None)
        return "grouped_mm" if can_set is not None and can_set() else "eager"

    # ---- running blocks ---------------------------------------------------------------------
    def positional(self, config: PretrainedConfig) -> nn.Module | None:
        """The module that turns positions into what every block needs (rotary cos/sin), or None."""
        return self.cls("RotaryEmbedding")(config)

    def layer_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        offset: int,
        blocks: range,
    ) -> list[dict[str, Any]]:
        """Keyword arguments (besides the hidden states and the cache) of each block in ``blocks``.

        Args:
            config: the model config.
            positional: what :meth:`positional` built.
            hidden: [batch, new, hidden] inputs of the first block (for shape, dtype, device).
            offset: position of the first new token (the same for every sequence).
            blocks: global indices of the blocks to run.
        """
        batch, new, _ = hidden.shape
        positions = torch.arange(offset, offset + new, device=hidden.device).expand(batch, new)
        masks = causal_masks(config, offset, new, blocks, hidden.dtype, hidden.device)
        return self.block_inputs(config, positional, hidden, positions, masks, blocks)

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """Keyword arguments of each block given every row's positions and each block's additive mask.

        Args:
            positions: [batch, new] position of every new token (rows may differ: a batch of sessions).
            masks: per block, [1 or batch, 1, new, keys]; key ``j`` is position ``j`` of that row.
        """
        assert positional is not None  # built by positional() for this family
        cos_sin = positional(hidden, positions)  # each [batch, new, head_dim]
        return [{"attention_mask": mask, "position_ids": positions, "position_embeddings": cos_sin} for mask in masks]

    def batch_group(self, config: PretrainedConfig, position: int) -> Hashable:
        """Decode steps at positions of different groups must not share one batched forward (see ``batched.py``).

        The common case: any positions may (each row gets its own positions and mask). A family whose
        layers derive something from the cache's length alone, the same for every row, splits positions
        into groups where that something is equal (Llama 4's attention temperature).
        """
        return None

    @staticmethod
    def layer_output(output: Any) -> torch.Tensor:
        """The hidden states a block returned (some blocks return a tuple with attention weights)."""
        hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
        return hidden

    # ---- checkpoint layout ------------------------------------------------------------------
    def base_prefix(self, weight_map: dict[str, str]) -> str:
        """``"model."`` (or the family's base name) if the checkpoint uses it, else ``""``."""
        base = f"{self.names.base}."
        return base if any(name.startswith(base) for name in weight_map) else ""

    def layer_prefix(self, weight_map: dict[str, str], block: int) -> str:
        """Checkpoint name prefix of one block's tensors, e.g. ``model.layers.3.``."""
        return f"{self.base_prefix(weight_map)}{self.names.layers}.{block}."

    def client_tensors(self, weight_map: dict[str, str]) -> dict[str, str]:
        """Client-head state-dict key → checkpoint tensor name, for the tensors this checkpoint has."""
        base = self.base_prefix(weight_map)
        wanted = {
            "embed_tokens.weight": f"{base}{self.names.embed}.weight",
            "norm.weight": f"{base}{self.names.norm}.weight",
            "lm_head.weight": f"{self.names.lm_head}.weight",
        }
        if self.layer_norm:
            wanted["norm.bias"] = f"{base}{self.names.norm}.bias"
        if self.names.embed_norm is not None:
            wanted["embed_norm.weight"] = f"{base}{self.names.embed_norm}.weight"
            wanted["embed_norm.bias"] = f"{base}{self.names.embed_norm}.bias"
        return {key: name for key, name in wanted.items() if name in weight_map}

    def block_state(self, tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """One block's checkpoint tensors (names relative to the block) → its module's state dict."""
        tensors = {name: t for name, t in tensors.items() if not name.endswith(self.stale)}
        if self.experts is None:
            return tensors
        return fuse_experts(tensors, self.experts, _num_experts(config))

    # ---- client head ------------------------------------------------------------------------
    def final_norm(self, config: PretrainedConfig) -> nn.Module:
        """The norm applied to the last block's output before the LM head."""
        eps = float(getattr(config, self.norm_eps))
        if self.layer_norm:
            return nn.LayerNorm(config.hidden_size, eps=eps)
        return self.cls("RMSNorm")(config.hidden_size, eps=eps)

    def embed_norm(self, config: PretrainedConfig) -> nn.Module | None:
        """The norm right after the embeddings (Bloom), or None."""
        if self.names.embed_norm is None:
            return None
        return nn.LayerNorm(config.hidden_size, eps=float(getattr(config, self.norm_eps)))

    def embedding_scale(self, config: PretrainedConfig) -> float | None:
        """The factor the embeddings are multiplied by (Gemma: sqrt(hidden_size)), or None."""
        return float(config.hidden_size) ** 0.5 if self.embed_scale else None


def _num_experts(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def fuse_experts(tensors: dict[str, torch.Tensor], layout: ExpertNames, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint matrices of one block → transformers' fused expert tensors (as it loads them).

    Tensors already in the fused layout pass through unchanged.
    """
    moe = f"{layout.moe}."
    out: dict[str, torch.Tensor] = {}
    gate: dict[int, torch.Tensor] = {}
    up: dict[int, torch.Tensor] = {}
    down: dict[int, torch.Tensor] = {}
    parts = {layout.gate: gate, layout.up: up, layout.down: down}
    for name, tensor in tensors.items():
        if not name.startswith(moe):
            out[name] = tensor
            continue
        rest = name[len(moe) :]
        pieces = rest.split(".")
        if pieces[0] == "experts" and len(pieces) == 4 and pieces[1].isdigit() and pieces[2] in parts:
            parts[pieces[2]][int(pieces[1])] = tensor  # [inter, hidden] or [hidden, inter]
        else:
            out[f"mlp.{rest}"] = tensor
    if gate or up or down:
        expected = set(range(num_experts))
        if not set(gate) == set(up) == set(down) == expected:
            raise ValueError(
                f"checkpoint block has experts {sorted(gate)}/{sorted(up)}/{sorted(down)}, "
                f"expected 0..{num_experts - 1}"
            )
        order = range(num_experts)
        gate_up = [torch.cat([gate[e], up[e]], dim=0) for e in order]  # each [2 * inter, hidden]
        out["mlp.experts.gate_up_proj"] = torch.stack(gate_up)  # [experts, 2 * inter, hidden]
        out["mlp.experts.down_proj"] = torch.stack([down[e] for e in order])  # [experts, hidden, inter]
    return out


def sliding_window_of(config: PretrainedConfig, block: int) -> int | None:
    """Sliding-window size of one block's attention, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[block] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def chunk_of(config: PretrainedConfig, block: int) -> int | None:
    """Chunk size of one block's chunked attention (a query sees only keys of its own chunk), or None.

    Llama 4's ``chunked_attention`` layers: positions ``0..c-1``, ``c..2c-1``, ... are separate chunks.
    """
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None)
    if not chunk or layer_types is None or layer_types[block] != "chunked_attention":
        return None
    return int(chunk)


def build_attention_mask(
    offset: int,
    new: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    chunk: int | None = None,
) -> torch.Tensor:
    """Additive causal mask [1, 1, new, offset + new] for queries at positions offset..offset+new-1."""
    q_pos = torch.arange(offset, offset + new, device=device)[:, None]
    k_pos = torch.arange(offset + new, device=device)[None, :]
    return _additive_mask(q_pos, k_pos, window, dtype, chunk)[None, None]


def _additive_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype, chunk: int | None = None
) -> torch.Tensor:
    """0 where query position ``q_pos`` may see key position ``k_pos`` (causal, within ``window``, in the same
    ``chunk``), the minimum elsewhere; the shape is ``q_pos``'s and ``k_pos``'s broadcast together."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    if chunk is not None:
        allowed &= (q_pos // chunk) == (k_pos // chunk)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask


def causal_masks(
    config: PretrainedConfig, offset: int, new: int, blocks: range, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One additive mask per block (blocks with the same window and chunk share one tensor)."""
    made: dict[tuple[int | None, int | None], torch.Tensor] = {}
    out = []
    for block in blocks:
        seen = (sliding_window_of(config, block), chunk_of(config, block))
        if seen not in made:
            made[seen] = build_attention_mask(offset, new, seen[0], dtype, device, seen[1])
        out.append(made[seen])
    return out


def row_masks(
    config: PretrainedConfig, held: list[int], blocks: range, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Per block, an additive mask [rows, 1, 1, max(held) + 1] for one new token per row at position ``held[r]``.

    Row ``r`` sees keys ``0..held[r]`` (within the block's window or chunk); the keys past it are another row's
    padding.
    """
    q_pos = torch.tensor(held, device=device)[:, None]  # [rows, 1]
    k_pos = torch.arange(max(held) + 1, device=device)[None, :]  # [1, keys]
    made: dict[tuple[int | None, int | None], torch.Tensor] = {}
    out = []
    for block in blocks:
        seen = (sliding_window_of(config, block), chunk_of(config, block))
        if seen not in made:
            made[seen] = _additive_mask(q_pos, k_pos, seen[0], dtype, seen[1])[:, None, None, :]
        out.append(made[seen])
    return out


@functools.cache
def cache_keyword(layer_cls: type[nn.Module]) -> str:
    """The keyword a decoder layer takes its cache by: ``cache`` (transformers 5.24+), ``past_key_values``
    or ``layer_past`` (Bloom, Falcon, GPT-NeoX)."""
    params = inspect.signature(layer_cls.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise TypeError(f"{layer_cls.__name__}.forward takes none of {CACHE_KEYWORDS}; this family needs an adapter")

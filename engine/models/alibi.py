"""Families whose positions are ALiBi biases built outside the blocks: Bloom, and Falcon when configured so."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.models.family import Family


def alibi_biases(family: Family, config: PretrainedConfig, hidden: torch.Tensor, keys: int) -> torch.Tensor:
    """transformers' ALiBi tensor [batch * heads, 1, keys] for unpadded sequences of ``keys`` tokens."""
    build = family.function("build_alibi_tensor")
    ones = torch.ones(hidden.shape[0], keys, dtype=torch.long, device=hidden.device)
    alibi: torch.Tensor = build(ones, int(config.num_attention_heads), hidden.dtype)
    return alibi


@dataclass(frozen=True)
class BloomFamily(Family):
    """Bloom: ALiBi added to the attention scores, blocks take ``alibi=`` and ``layer_past=``; no rotary."""

    def positional(self, config: PretrainedConfig) -> nn.Module | None:
        """Bloom has no positional module: the ALiBi slopes depend only on the number of heads."""
        return None

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """Each block gets the ALiBi tensor over all keys so far and the additive causal mask."""
        alibi = alibi_biases(self, config, hidden, masks[0].shape[-1])  # [batch * heads, 1, keys]
        return [{"alibi": alibi, "attention_mask": mask} for mask in masks]


@dataclass(frozen=True)
class FalconFamily(Family):
    """Falcon: rotary positions, or ALiBi folded into the mask (``config.alibi``); multi-query or grouped keys."""

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """Rotary: the common inputs plus ``alibi=None``. ALiBi: the biases scaled and masked, as transformers does."""
        if not config.alibi:
            return [
                {**inputs, "alibi": None}
                for inputs in super().block_inputs(config, positional, hidden, positions, masks, blocks)
            ]
        batch = hidden.shape[0]
        heads = int(config.num_attention_heads)
        keys = masks[0].shape[-1]
        alibi = alibi_biases(self, config, hidden, keys)  # [batch * heads, 1, keys]
        scaled = alibi.reshape(batch, heads, 1, keys) / math.sqrt(config.hidden_size // heads)
        out = []
        made: dict[int, torch.Tensor] = {}
        for mask in masks:
            if id(mask) not in made:  # [batch, heads, new, keys]: ALiBi where allowed, the minimum elsewhere
                made[id(mask)] = scaled.masked_fill(mask < -1, torch.finfo(hidden.dtype).min)
            out.append({"alibi": alibi, "attention_mask": made[id(mask)], "position_embeddings": None})
        return out

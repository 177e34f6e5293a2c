"""Qwen3-Next: Gated DeltaNet (linear-attention) blocks interleaved with gated full-attention blocks, all MoE.

The blocks are transformers' own ``Qwen3NextDecoderLayer``. The full-attention blocks are the common case
(rotary positions, an additive causal mask, keys/values in the span's cache). The linear-attention blocks keep a
fixed-size recurrent state per sequence (``recurrent.py``) through the span cache's linear-attention methods,
and take no attention mask: their only mask is a padding mask, and a span's rows carry no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.models.family import Family
from corolla.engine.models.recurrent import is_recurrent_block


@dataclass(frozen=True)
class Qwen3NextFamily(Family):
    """Qwen3-Next (Qwen3-Next-80B-A3B and its tiny test configs)."""

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """The common inputs; linear-attention blocks get no mask (theirs would be a [batch, new] padding mask)."""
        out = super().block_inputs(config, positional, hidden, positions, masks, blocks)
        return [
            {**inputs, "attention_mask": None} if is_recurrent_block(config, block) else inputs
            for block, inputs in zip(blocks, out, strict=True)
        ]

"""Gemma 3: each layer type (sliding or full attention) has its own rotary frequencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.models.family import Family, causal_masks


@dataclass(frozen=True)
class Gemma3Family(Family):
    """Gemma 3 (text): the rotary module takes the layer type; local layers use a sliding window."""

    def layer_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        offset: int,
        blocks: range,
    ) -> list[dict[str, Any]]:
        """The common inputs, with cos/sin computed once per layer type of the blocks that run."""
        assert positional is not None  # built by positional()
        batch, new, _ = hidden.shape
        positions = torch.arange(offset, offset + new, device=hidden.device).expand(batch, new)
        masks = causal_masks(config, offset, new, blocks, hidden.dtype, hidden.device)
        cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for block, mask in zip(blocks, masks, strict=True):
            layer_type = config.layer_types[block]
            if layer_type not in cos_sin:
                cos_sin[layer_type] = positional(hidden, positions, layer_type)  # each [batch, new, head_dim]
            out.append({"attention_mask": mask, "position_ids": positions, "position_embeddings": cos_sin[layer_type]})
        return out

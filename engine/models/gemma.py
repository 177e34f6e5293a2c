"""Gemma 3: each layer type (sliding or full attention) has its own rotary frequencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.models.family import Family


@dataclass(frozen=True)
class Gemma3Family(Family):
    """Gemma 3 (text): the rotary module takes the layer type; local layers use a sliding window."""

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """The common inputs, with cos/sin computed once per layer type of the blocks that run."""
        assert positional is not None  # built by positional()
        cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for block, mask in zip(blocks, masks, strict=True):
            layer_type = config.layer_types[block]
            if layer_type not in cos_sin:
                cos_sin[layer_type] = positional(hidden, positions, layer_type)  # each [batch, new, head_dim]
            out.append({"attention_mask": mask, "position_ids": positions, "position_embeddings": cos_sin[layer_type]})
        return out

"""Llama 4 (text): chunked attention on rotary layers, full attention on layers without rotary, MoE every other layer.

The blocks are transformers' own ``Llama4TextDecoderLayer``; what a span supplies around them differs from the
common case in three ways. The rotary module returns one complex tensor (not cos/sin), which the blocks take as
``position_embeddings`` unchanged. The ``chunked_attention`` layers see only keys of their own chunk
(``family.chunk_of`` builds those masks). And the layers without rotary scale their queries by a temperature
that transformers derives from the cache's length, one value for every row: batched decode steps
(``batched.py``) may join only when their positions give the same temperature (:meth:`batch_group`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.models.family import Family


@dataclass(frozen=True)
class Llama4TextFamily(Family):
    """Llama 4's text model: layer classes are ``Llama4Text*``, the model class ``Llama4PreTrainedModel``."""

    def pretrained_class(self) -> type[nn.Module]:
        """``Llama4PreTrainedModel`` (shared by the text and the multimodal model; there is no ``Llama4Text`` one)."""
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        found: type[nn.Module] = mod.Llama4PreTrainedModel
        return found

    def block_inputs(
        self,
        config: PretrainedConfig,
        positional: nn.Module | None,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        blocks: range,
    ) -> list[dict[str, Any]]:
        """The common inputs; releases before 5.24 take the temperature's positions as ``cache_position`` [new]
        (one row for the whole batch: the longest row's, as later releases take it from the cache's length)."""
        out = super().block_inputs(config, positional, hidden, positions, masks, blocks)
        if "cache_position" not in inspect.signature(self.layer_class().forward).parameters:
            return out
        cache_position = positions.amax(dim=0)  # [new]
        return [{**inputs, "cache_position": cache_position} for inputs in out]

    def batch_group(self, config: PretrainedConfig, position: int) -> Hashable:
        """With attention temperature tuning, ``floor((position + 1) / floor_scale)``: rows in one group get the
        same temperature, the one transformers computes from the longest row's length (the batch's cache length)."""
        if not getattr(config, "attn_temperature_tuning", False) or all(config.no_rope_layers):
            return None
        return (position + 1) // int(config.floor_scale)

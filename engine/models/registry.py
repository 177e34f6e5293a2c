"""Model families: which transformers classes build one block and its rotary embedding.

A *block* is one decoder layer. Corolla reuses transformers' own decoder-layer modules (5.x calling
convention: hidden_states, attention_mask, position_embeddings, past_key_values) and only supplies
what a span of layers needs around them: positions, the rotary embedding, the mask and the KV cache.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from corolla.engine.errors import CorollaError


@dataclass(frozen=True)
class Family:
    """How to build the blocks of one model family from transformers' modules."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix in that module, e.g. "Llama" for LlamaDecoderLayer

    def _cls(self, suffix: str) -> type[nn.Module]:
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        cls: type[nn.Module] = getattr(mod, f"{self.prefix}{suffix}")
        return cls

    def load(self) -> tuple[type[nn.Module], type[nn.Module]]:
        """Import the decoder-layer and rotary-embedding classes."""
        return self._cls("DecoderLayer"), self._cls("RotaryEmbedding")

    def norm_class(self) -> type[nn.Module]:
        """The family's final RMSNorm class (used by the client before the LM head)."""
        return self._cls("RMSNorm")


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "Llama"),
        Family("mistral", "mistral", "Mistral"),
        Family("qwen2", "qwen2", "Qwen2"),
        Family("qwen3", "qwen3", "Qwen3"),
    )
}


def get_family(config: PretrainedConfig) -> Family:
    """The family adapter for a model config, or a clear error listing the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise CorollaError(
            f"Model type {config.model_type!r} is not supported yet. Supported: {', '.join(sorted(FAMILIES))}."
        )
    return family


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

"""Model families Corolla serves: one :class:`Family` entry (or small adapter class) per transformers family.

A *block* is one decoder layer. Corolla reuses transformers' own decoder-layer modules and only
supplies what a span of layers needs around them (positions, masks, the KV cache), plus the client's
embeddings, final norm and LM head. Adding a family is one entry here, and a test config in
``corolla.engine.apps.tiny_models``; a family whose positions or masks differ gets a small adapter class.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from corolla.engine.errors import CorollaError
from corolla.engine.models.alibi import BloomFamily, FalconFamily
from corolla.engine.models.family import ExpertNames, Family, TensorNames, sliding_window_of
from corolla.engine.models.gemma import Gemma3Family
from corolla.engine.models.llama4 import Llama4TextFamily
from corolla.engine.models.qwen3_next import Qwen3NextFamily

__all__ = ["FAMILIES", "NOT_YET", "Family", "get_family", "sliding_window_of"]

_BLOOM_NAMES = TensorNames(
    base="transformer", layers="h", embed="word_embeddings", norm="ln_f", embed_norm="word_embeddings_layernorm"
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "Llama"),
        Family("mistral", "mistral", "Mistral"),
        Family("qwen2", "qwen2", "Qwen2"),
        Family("qwen3", "qwen3", "Qwen3"),
        Family("phi3", "phi3", "Phi3"),
        Family("mixtral", "mixtral", "Mixtral", experts=ExpertNames("block_sparse_moe", "w1", "w3", "w2")),
        Family("qwen3_moe", "qwen3_moe", "Qwen3Moe", experts=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")),
        # Shared + routed experts, sigmoid routing with a bias; dense MLPs on the first blocks (first_k_dense_replace).
        # DeepSeek-V3 (and Kimi K2) cache multi-head latent attention's compressed keys/values, not per-head ones.
        Family(
            "deepseek_v3", "deepseek_v3", "DeepseekV3", experts=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
        ),
        Family("glm4_moe", "glm4_moe", "Glm4Moe", experts=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")),
        Family("minimax_m2", "minimax_m2", "MiniMaxM2", experts=ExpertNames("block_sparse_moe", "w1", "w3", "w2")),
        # Attention sinks live in the blocks; every other block has a sliding window (layer_types). Experts are
        # stored fused (``mlp.experts.gate_up_proj`` with biases), as transformers keeps them.
        Family("gpt_oss", "gpt_oss", "GptOss"),
        Llama4TextFamily("llama4_text", "llama4", "Llama4Text"),
        # Gated DeltaNet blocks (a recurrent state per sequence, no keys/values) between full-attention blocks;
        # shared + routed experts on every block.
        Qwen3NextFamily(
            "qwen3_next", "qwen3_next", "Qwen3Next", experts=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
        ),
        Family("gemma2", "gemma2", "Gemma2", embed_scale=True),
        Gemma3Family("gemma3_text", "gemma3", "Gemma3", embed_scale=True),
        Family(
            "gpt_neox",
            "gpt_neox",
            "GPTNeoX",
            layer_suffix="Layer",
            names=TensorNames(base="gpt_neox", embed="embed_in", norm="final_layer_norm", lm_head="embed_out"),
            layer_norm=True,
            norm_eps="layer_norm_eps",
            stale=("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"),  # Pythia's causal-mask buffers
        ),
        BloomFamily(
            "bloom",
            "bloom",
            "Bloom",
            layer_suffix="Block",
            names=_BLOOM_NAMES,
            layer_norm=True,
            norm_eps="layer_norm_epsilon",
        ),
        FalconFamily(
            "falcon",
            "falcon",
            "Falcon",
            names=TensorNames(base="transformer", layers="h", embed="word_embeddings", norm="ln_f"),
            layer_norm=True,
            norm_eps="layer_norm_epsilon",
        ),
    )
}


# Families transformers has and Corolla knows it cannot serve yet, with the reason (said instead of "not supported").
NOT_YET: dict[str, str] = {}


def get_family(config: PretrainedConfig) -> Family:
    """The family adapter for a model config, or a clear error listing the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None and config.model_type in NOT_YET:
        raise CorollaError(
            f"Model type {config.model_type!r} is not supported yet: {NOT_YET[config.model_type]}. "
            f"Supported: {', '.join(sorted(FAMILIES))}."
        )
    if family is None:
        raise CorollaError(
            f"Model type {config.model_type!r} is not supported yet. Supported: {', '.join(sorted(FAMILIES))}."
        )
    return family

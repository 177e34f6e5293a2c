"""Tiny random checkpoints of every supported family, with a character-level tokenizer.

For a loopback swarm without downloads (tests, benchmarks, trying a family out): ``make_tiny_checkpoint``
saves a few-block model of random weights that servers load like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=512,
)


# Per family: (config class, model class, tiny settings on top of TINY_DEFAULTS). Hidden sizes stay tiny,
# experts few; windows are shorter than the test sequences so they really drop keys.
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,  # block 0 is a dense MLP block
            "n_group": 2,
            "topk_group": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "num_key_value_heads": 4,  # as in DeepSeek-V3: latent attention expands keys/values to every head
        },
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "use_qk_norm": True,
        },
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "intermediate_size": 32},
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        # max_position_embeddings: the YaRN factor (32) times its original 4096 positions, as gpt-oss has it.
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "intermediate_size": 32,
            "sliding_window": 4,
            "max_position_embeddings": 131072,
        },
    ),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "head_dim": 16,
            "intermediate_size": 32,
            "intermediate_size_mlp": 128,
            "interleave_moe_layer_step": 2,  # experts on blocks 1, 3, 5
            "no_rope_layer_interval": 3,  # blocks 2 and 5: no rotary, full attention; the others chunked
            "attention_chunk_size": 4,
        },
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            "head_dim": 16,
            "full_attention_interval": 2,  # blocks 1, 3, 5 full attention; 0, 2, 4 Gated DeltaNet
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"num_key_value_heads": None, "intermediate_size": None}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"num_key_value_heads": None, "intermediate_size": None}),
}


# Per family: the settings its logit tests use on top of TINY_FAMILIES, chosen so that each feature is in
# effect (windows shorter than the test sequences, Gemma's caps small enough to change the logits).
FAMILY_TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {},
    "qwen3": {},
    "phi3": {"sliding_window": 5},
    "mixtral": {},
    "qwen3_moe": {},  # block 1 is a dense MLP block (mlp_only_layers), the others mixtures of experts
    "deepseek_v3": {},  # latent attention with q_lora_rank; block 0 dense, blocks 1-5 shared + routed experts
    "glm4_moe": {},  # partial rotary, q/k norms; block 0 dense
    "minimax_m2": {},
    "gpt_oss": {},  # attention sinks; window 4 on even blocks
    "llama4_text": {"floor_scale": 4},  # the attention temperature of the blocks without rotary changes every 4
    "qwen3_next": {},  # recurrent-state blocks 0, 2, 4; each test split holds both kinds
    "gemma2": {"final_logit_softcapping": 0.3, "attn_logit_softcapping": 0.05},  # window 4 on every other block
    "gemma3_text": {"final_logit_softcapping": 0.3},  # blocks 0-4 local (window 4, own rotary base), 5 global
    "gpt_neox": {},
    "bloom": {},
    "falcon": {},  # multi-query attention, parallel attention and MLP, rotary positions
}


def tiny_config(family: str = "llama", **overrides: Any) -> Any:
    """The tiny transformers config of ``family`` (a key of ``TINY_FAMILIES``); ``None`` drops a setting."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(sorted(TINY_FAMILIES))}")
    config_name, _, tiny = TINY_FAMILIES[family]
    settings = {**TINY_DEFAULTS, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **tiny, **overrides}
    return getattr(transformers, config_name)(**{k: v for k, v in settings.items() if v is not None})


def make_tiny_checkpoint(path: str | Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random model of ``family`` (a key of ``TINY_FAMILIES``) as a safetensors checkpoint."""
    import torch
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_FAMILIES[family][1])(config)
    path = Path(path)
    model.save_pretrained(path)
    char_tokenizer(config.vocab_size).save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(vocab_size: int) -> Any:
    """A character-level tokenizer for tiny test models (special tokens, then printable ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars][:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast

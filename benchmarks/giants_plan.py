"""A planning table for today's mixture-of-experts giants: blocks, bytes per block, cache per 1k tokens, and how
many 24 GB volunteers hold one replica, from the engine's own accounting.

    python benchmarks/giants_plan.py

No hub is reachable, so each model's published config numbers are written below (config.json of each repo).
The configs are built as transformers objects and measured by the very functions a server plans with (one
source of truth): weights by ``server/memory.py``'s ``weight_bytes_by_quant`` (each block built on the meta
device and counted as ``--quant`` holds it, fused routed experts included), cache by ``models/cache_size.py``'s
``token_cache_bytes`` (what each block's layer stores for one token; Qwen3-Next's linear-attention blocks keep
instead a recurrent state per sequence, measured by ``state_cache_bytes`` and shown as "+ N per sequence"), and
blocks per volunteer by ``server_memory_plan``, the server's own plan, under ``--max-memory 24GiB`` with every
other setting at its default (activation room, ``--cache-bytes``, a cache that holds one ``--max-length`` sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import _common  # noqa: F401  (thread environment before torch)
import torch
import transformers
from transformers import PretrainedConfig

from corolla.engine.config import ServerConfig
from corolla.engine.errors import CorollaError
from corolla.engine.models.cache_size import state_cache_bytes, token_cache_bytes
from corolla.engine.server.memory import server_memory_plan, weight_bytes_by_quant

VOLUNTEER = 24 * 2**30  # one 24 GB card (RTX 3090/4090): --max-memory 24GiB
DTYPE = torch.bfloat16
QUANTS = ("none", "int8", "nf4")


@dataclass(frozen=True)
class Giant:
    name: str
    config: str  # transformers config class
    numbers: dict[str, Any]  # the published config.json's key numbers


GIANTS = [
    Giant(
        "DeepSeek-V3 / R1 (671B)",
        "DeepseekV3Config",
        dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            num_key_value_heads=128,
            n_shared_experts=1,
            n_routed_experts=256,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            n_group=8,
            topk_group=4,
            kv_lora_rank=512,
            q_lora_rank=1536,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
        ),
    ),
    Giant(
        "Kimi K2 (1T)",
        "DeepseekV3Config",
        dict(
            vocab_size=163840,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=64,
            num_key_value_heads=64,
            n_shared_experts=1,
            n_routed_experts=384,
            num_experts_per_tok=8,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=512,
            q_lora_rank=1536,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
        ),
    ),
    Giant(
        "gpt-oss-120b",
        "GptOssConfig",
        dict(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=36,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=128,
            num_experts_per_tok=4,
            sliding_window=128,
            max_position_embeddings=131072,
        ),
    ),
    Giant(
        "Llama-4-Maverick (400B)",
        "Llama4TextConfig",
        dict(
            vocab_size=202048,
            hidden_size=5120,
            intermediate_size=8192,
            intermediate_size_mlp=16384,
            num_hidden_layers=48,
            num_attention_heads=40,
            num_key_value_heads=8,
            head_dim=128,
            num_local_experts=128,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=4,
            attention_chunk_size=8192,
            use_qk_norm=False,
        ),
    ),
    Giant(
        "GLM-4.5 (355B)",
        "Glm4MoeConfig",
        dict(
            vocab_size=151552,
            hidden_size=5120,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=92,
            num_attention_heads=96,
            num_key_value_heads=8,
            head_dim=128,
            n_shared_experts=1,
            n_routed_experts=160,
            num_experts_per_tok=8,
            first_k_dense_replace=3,
            n_group=1,
            topk_group=1,
            use_qk_norm=True,
        ),
    ),
    Giant(
        "MiniMax-M2 (230B)",
        "MiniMaxM2Config",
        dict(
            vocab_size=200064,
            hidden_size=3072,
            intermediate_size=1536,
            num_hidden_layers=62,
            num_attention_heads=48,
            num_key_value_heads=8,
            head_dim=128,
            num_local_experts=256,
            num_experts_per_tok=8,
        ),
    ),
    Giant(
        "Qwen3-235B-A22B",
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
        ),
    ),
    Giant(
        "Qwen3-Next-80B-A3B",
        "Qwen3NextConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5120,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            num_hidden_layers=48,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=256,
            num_experts=512,
            num_experts_per_tok=10,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
        ),
    ),
]


def build(giant: Giant) -> PretrainedConfig:
    config: PretrainedConfig = getattr(transformers, giant.config)(**giant.numbers)
    return config


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def row(giant: Giant) -> list[str]:
    config = build(giant)
    weights = weight_bytes_by_quant(config, DTYPE)
    cells = [giant.name, str(config.num_hidden_layers), *(gib(max(weights[q])) for q in QUANTS)]
    token = token_cache_bytes(config, DTYPE)
    state = sum(state_cache_bytes(config, DTYPE))  # linear-attention blocks: per sequence, whatever its length
    per_sequence = f" + {state / 2**20:.1f} per sequence" if state else ""
    cells.append(f"{sum(token) * 1000 / 2**20:.1f}{per_sequence}")
    server = ServerConfig(max_memory=VOLUNTEER)
    for quant in QUANTS:
        try:
            plan = server_memory_plan(config, server, DTYPE, quant)
            cells.append(str(math.ceil(int(config.num_hidden_layers) / plan.num_blocks)))
        except CorollaError:
            cells.append("a block does not fit")
    return cells


HEADER = [
    "model",
    "blocks",
    "GiB/block bf16",
    "GiB/block int8",
    "GiB/block nf4",
    "cache MiB/1k tokens",
    "24 GB volunteers (bf16)",
    "24 GB volunteers (int8)",
    "24 GB volunteers (nf4)",
]


def main() -> None:
    rows = [HEADER, ["---"] * len(HEADER)]
    for giant in GIANTS:
        rows.append(row(giant))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

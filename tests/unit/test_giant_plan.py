"""Memory plans for giant mixture-of-experts blocks, counted on the meta device from a DeepSeek-V3-sized config."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from corolla.engine.config import ServerConfig, parse_size
from corolla.engine.errors import CorollaError
from corolla.engine.models.cache_size import token_cache_bytes
from corolla.engine.models.formats import WeightFormat
from corolla.engine.server.memory import (
    BlockFacts,
    QuantOption,
    estimate_activation_bytes,
    plan_memory,
    server_memory_plan,
    weight_bytes_by_quant,
)

pytestmark = pytest.mark.timeout(120)

MiB = 2**20
GB24 = parse_size("24GB")
# DeepSeek-V3's published config.json numbers.
H, E, INTER, LAYERS, DENSE, HEADS = 7168, 256, 2048, 61, 3, 128
Q_RANK, KV_RANK, ROPE, NOPE, V = 1536, 512, 64, 128, 128


def deepseek_v3() -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        vocab_size=129280,
        hidden_size=H,
        intermediate_size=18432,
        moe_intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        n_shared_experts=1,
        n_routed_experts=E,
        num_experts_per_tok=8,
        first_k_dense_replace=DENSE,
        n_group=8,
        topk_group=4,
        kv_lora_rank=KV_RANK,
        q_lora_rank=Q_RANK,
        qk_rope_head_dim=ROPE,
        qk_nope_head_dim=NOPE,
        v_head_dim=V,
    )


# One MoE block by hand: (out, in) of every linear, and the plain tensors (norms, router, its bias).
LINEARS = [
    (Q_RANK, H),  # q_a_proj
    (HEADS * (NOPE + ROPE), Q_RANK),  # q_b_proj
    (KV_RANK + ROPE, H),  # kv_a_proj_with_mqa
    (HEADS * (NOPE + V), KV_RANK),  # kv_b_proj
    (H, HEADS * V),  # o_proj
    (INTER, H),  # shared expert gate_proj
    (INTER, H),  # shared expert up_proj
    (H, INTER),  # shared expert down_proj
]
EXPERTS = [(2 * INTER, H), (H, INTER)]  # each of E experts: gate_up_proj [2I, H], down_proj [H, INTER]
PLAIN = Q_RANK + KV_RANK + 2 * H + E * H + E  # q/kv norms, two layer norms, router weight and bias


def hand_bytes(quant: str) -> int:
    if quant == "none":
        return 2 * (sum(o * i for o, i in LINEARS) + E * sum(o * i for o, i in EXPERTS) + PLAIN)
    if quant == "int8":  # a byte a weight + a bf16 scale per output row
        return sum(o * i + 2 * o for o, i in LINEARS) + E * sum(o * i + 2 * o for o, i in EXPERTS) + 2 * PLAIN
    nf4 = sum(o * i // 64 * 36 for o, i in LINEARS) + E * sum(o * i // 64 * 36 for o, i in EXPERTS)
    return nf4 + 2 * PLAIN  # 64 weights: 32 bytes of codes + a float32 absmax


@pytest.fixture(scope="module")
def config() -> transformers.PretrainedConfig:
    return deepseek_v3()


@pytest.fixture(scope="module")
def by_quant(config: transformers.PretrainedConfig) -> dict[str, list[int]]:
    return weight_bytes_by_quant(config, torch.bfloat16)


def test_a_deepseek_v3_block_counted_on_meta_matches_the_hand_count(by_quant: dict[str, list[int]]) -> None:
    params = sum(o * i for o, i in LINEARS) + E * sum(o * i for o, i in EXPERTS) + PLAIN
    assert 11.4e9 < params < 11.6e9  # ~11.5B parameters a MoE block
    for quant in ("none", "int8", "nf4"):
        blocks = by_quant[quant]
        assert len(blocks) == LAYERS and blocks[DENSE:] == [hand_bytes(quant)] * (LAYERS - DENSE), quant
        assert max(blocks[:DENSE]) < blocks[DENSE] / 10  # the dense blocks are far smaller
    assert f"{by_quant['none'][DENSE] / 1e9:.1f}" == "23.0"  # GB in bf16
    assert by_quant["int8"][DENSE] < 0.51 * by_quant["none"][DENSE]
    assert by_quant["nf4"][DENSE] < 0.29 * by_quant["none"][DENSE]


def test_automatic_count_on_a_24gb_card_int8_and_nf4_by_hand_bf16_refused(
    config: transformers.PretrainedConfig, by_quant: dict[str, list[int]]
) -> None:
    cfg = ServerConfig(max_memory=GB24)  # defaults otherwise: 512 MiB of cache at least, 8192 tokens a session
    token = token_cache_bytes(config, torch.bfloat16)
    assert set(token) == {(KV_RANK + ROPE) * 2}  # latent attention: 576 bf16 numbers a token a block
    for quant, expected in (("int8", 1), ("nf4", 2)):
        act = estimate_activation_bytes(config, cfg, torch.bfloat16, quant)
        cache = max(cfg.cache_bytes, expected * token[0] * cfg.max_length)
        by_hand = (GB24 - act - cache) // hand_bytes(quant)
        plan = server_memory_plan(config, cfg, torch.bfloat16, quant)
        assert plan.num_blocks == by_hand == expected, (quant, act)
        assert plan.weight_bytes + plan.cache_bytes + plan.activation_bytes == GB24
        assert plan.cache_tokens >= cfg.max_length
    with pytest.raises(CorollaError, match="not even one block") as info:
        server_memory_plan(config, cfg, torch.bfloat16, "none", WeightFormat("fp8", (128, 128)))
    message = str(info.value)
    assert "one block of deepseek_v3 needs 23.0 GB in bfloat16" in message
    assert f"--quant int8 ({hand_bytes('int8') / 1e9:.1f} GB a block)" in message
    assert f"--quant nf4 ({hand_bytes('nf4') / 1e9:.1f} GB a block)" in message
    assert "it fits in 24GB with" in message
    published = re.search(r"publishes it in FP8, (\d+\.\d) GB a block", message)  # a byte a weight + scales
    assert published is not None and 11.5 <= float(published.group(1)) <= 11.7, message
    assert "the server dequantizes it to bfloat16" in message


def test_the_cache_also_holds_one_max_length_sequence_over_the_blocks_counted() -> None:
    blocks, act = [10 * MiB] * 8, MiB
    token = [1024] * 8  # 1 KiB a token a block: 4096 tokens are 4 MiB a block
    for n in (1, 3, 8):
        limit = act + n * 14 * MiB
        plan = plan_memory(blocks, token, act, MiB, limit, min_cache_tokens=4096)
        assert plan.num_blocks == n and plan.cache_tokens == 4096
        if n > 1:
            assert plan_memory(blocks, token, act, MiB, limit - 1, min_cache_tokens=4096).num_blocks == n - 1
    assert plan_memory(blocks, token, act, MiB, act + 14 * MiB).num_blocks == 1  # without the floor: 13 // 10


def test_given_blocks_that_do_not_fit_name_the_quant_that_fits() -> None:
    blocks = [10 * MiB] * 4
    facts = BlockFacts("bfloat16", "x", options=(QuantOption("int8", 5 * MiB, MiB), QuantOption("nf4", 3 * MiB, MiB)))
    with pytest.raises(CorollaError, match="cannot hold 2 blocks") as info:
        plan_memory(blocks, [1] * 4, MiB, MiB, 12 * MiB, num_blocks=2, facts=facts)
    assert "it fits in 12MiB with --quant int8 (5.2 MB a block) or --quant nf4 (3.1 MB a block)" in str(info.value)
    with pytest.raises(CorollaError, match="not even with --quant nf4"):
        plan_memory(blocks, [1] * 4, MiB, MiB, 6 * MiB, num_blocks=2, facts=facts)

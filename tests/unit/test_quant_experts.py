"""--quant int8/nf4 on mixture-of-experts blocks: fused expert tensors are quantized and run through the
family's own forward exactly as their quantize→dequantize'd copies would, in less memory."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from corolla.engine.apps.tiny_models import tiny_config
from corolla.engine.models.quant import (
    NF4_LEVELS,
    QuantizedExperts,
    quantize_block,
    quantize_linears,
    quantized_weight_bytes,
    tensor_bytes,
)
from corolla.engine.models.span import BlockSpan

pytestmark = pytest.mark.timeout(120)

# Family → whether its experts multiply ``x @ W`` ([experts, in, out]) instead of ``F.linear`` ([experts, out, in]).
MOE_FAMILIES = {
    "mixtral": False,
    "qwen3_moe": False,
    "deepseek_v3": False,
    "glm4_moe": False,
    "minimax_m2": False,
    "gpt_oss": True,
    "llama4_text": True,
}


def reference_int8(w: torch.Tensor, in_axis: int) -> torch.Tensor:
    """One expert [a, b] through symmetric int8 with one scale per output channel, back to its dtype."""
    scale = (w.float().abs().amax(dim=in_axis, keepdim=True) / 127.0).clamp_min(1e-12)
    q = torch.round(w.float() / scale).clamp(-127, 127)
    return q.to(w.dtype) * scale.to(w.dtype)


def reference_nf4(w: torch.Tensor) -> torch.Tensor:
    """One expert [a, b] through NF4 (nearest of 16 levels, one absmax per 64 weights), back to its dtype."""
    flat = w.float().reshape(-1)
    groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 64)).reshape(-1, 64)
    absmax = groups.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[(groups / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)] * absmax
    return nearest.reshape(-1)[: flat.numel()].reshape(w.shape).to(w.dtype)


def moe_span(family: str, dtype: torch.dtype) -> BlockSpan:
    """Blocks 0 and 1 of the family's tiny config (one of them a mixture of experts) with random weights."""
    torch.manual_seed(0)
    span = BlockSpan(tiny_config(family), 0, 2).eval()
    with torch.no_grad():
        for p in span.parameters():
            p.normal_(0.0, 0.05)
    return span.to(dtype)


def expert_modules(span: nn.Module) -> list[nn.Module]:
    return [m for m in span.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@torch.inference_mode()
def test_quantized_experts_compute_what_their_dequantized_copy_computes(family: str, mode: str) -> None:
    span = moe_span(family, torch.float32)
    assert expert_modules(span), "the tiny config has no fused experts"
    in_axis = 0 if MOE_FAMILIES[family] else 1  # of each expert's [a, b]
    # The reference: the same block, its expert tensors quantize→dequantize'd in plain torch, its linears int8/nf4.
    reference = copy.deepcopy(span)
    for experts in expert_modules(reference):
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name)
            for e in range(weight.shape[0]):
                weight[e] = reference_int8(weight[e], in_axis) if mode == "int8" else reference_nf4(weight[e])
    quantize_linears(reference.layers, mode)
    predicted = quantized_weight_bytes(span.layers, mode, torch.float32)
    full = tensor_bytes(span.layers)

    quantized = copy.deepcopy(span)
    assert quantize_block(quantized.layers, mode) > 0
    stored = [m for m in quantized.modules() if isinstance(m, QuantizedExperts)]
    assert len(stored) == 2 * len(expert_modules(span))  # gate_up_proj and down_proj of every expert block
    x = torch.randn(2, 6, span.config.hidden_size, generator=torch.Generator().manual_seed(1))  # [batch, len, hidden]
    out, expected, exact = quantized(x), reference(x), span(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - exact).abs().max() > 1e-5  # quantization did change the weights
    # What the block really holds (parameters and buffers) shrank, as the meta-device count predicts.
    assert tensor_bytes(quantized.layers) == predicted
    assert predicted < full * (0.3 if mode == "int8" else 0.17)


@torch.inference_mode()
def test_bfloat16_experts_dequantize_to_bfloat16_and_only_the_experts_used() -> None:
    span = moe_span("mixtral", torch.bfloat16)
    quantize_block(span.layers, "int8")
    read: list[Any] = []
    original = QuantizedExperts.__getitem__

    def recording(self: QuantizedExperts, index: Any) -> torch.Tensor:
        w = original(self, index)
        read.append((int(index), w.dtype, tuple(w.shape)))
        return w

    QuantizedExperts.__getitem__ = recording  # type: ignore[method-assign]
    try:
        span(torch.randn(1, 1, span.config.hidden_size, dtype=torch.bfloat16))  # one token, top-2 of 4 experts
    finally:
        QuantizedExperts.__getitem__ = original  # type: ignore[method-assign]
    assert read and all(dtype == torch.bfloat16 for _, dtype, _ in read)
    assert len(read) == 2 * 2 * 2  # 2 blocks x 2 experts x (gate_up, down): one expert at a time, only those routed
    assert all(len(shape) == 2 for _, _, shape in read)
    with pytest.raises(TypeError, match="not supported on quantized experts"):
        torch.matmul(torch.ones(1), next(m for m in span.modules() if isinstance(m, QuantizedExperts)))

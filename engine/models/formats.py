"""Published weight formats: a block's tensors as a checkpoint publishes them → plain tensors.

Some giants are published quantized, and a server reads them as they are (only its blocks' tensors, with
their scales) and dequantizes them to its dtype; ``--quant`` may then re-quantize them to int8/nf4 as any
other block. Two formats, named by ``quantization_config.quant_method`` in ``config.json``:

- ``fp8`` (DeepSeek-V3/R1, Kimi K2): each quantized linear ``...weight`` is float8_e4m3fn [out, in] with a
  float32 ``...weight_scale_inv`` [ceil(out/b0), ceil(in/b1)], one scale per ``weight_block_size`` block
  (b0, b1; usually 128 x 128): weight = fp8 * scale of its block.
- ``mxfp4`` (gpt-oss): each expert tensor ``P`` (``gate_up_proj``, ``down_proj``) is ``P_blocks`` uint8
  [experts, out, groups, 16], two FP4 (e2m1) codes per byte, low nibble first, 32 values per group, and
  ``P_scales`` uint8 [experts, out, groups], E8M0 exponents (scale 2**(s - 127)); the plain tensor is
  [experts, in, out] (transformers' ``convert_moe_packed_tensors`` layout).

The functions here are pure: tensors in, tensors out; :func:`published_weight_bytes` counts what a block takes
as published (from its module built on the meta device), which the memory plan shows next to what a server
holds once the block is dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from corolla.engine.errors import CorollaError

FORMATS = ("fp8", "mxfp4")  # quant_method values Corolla reads; a checkpoint without quantization_config is plain
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size, when a config leaves it out
FP8_SCALE_SUFFIX = "_scale_inv"  # ``x.weight`` → ``x.weight_scale_inv``
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
MXFP4_GROUP = 32  # FP4 values sharing one E8M0 exponent
E8M0_BIAS = 127
# FP4 e2m1 code → value (sign bit 3, two exponent bits, one mantissa bit), as in the OCP MX spec and transformers.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class WeightFormat:
    """How a checkpoint's block tensors are stored.

    Attributes:
        method: ``none`` (plain tensors), ``fp8`` or ``mxfp4``.
        block_size: FP8 scale block (rows, columns); None for a per-tensor scale or another method.
    """

    method: str = "none"
    block_size: tuple[int, int] | None = None


PLAIN = WeightFormat()


def weight_format(quantization_config: dict[str, Any] | None) -> WeightFormat:
    """The format a ``config.json``'s ``quantization_config`` names, or a CorollaError for one Corolla can't read."""
    if not quantization_config:
        return PLAIN
    method = str(quantization_config.get("quant_method", ""))
    if method == "fp8":
        fmt = quantization_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CorollaError(
                f"FP8 checkpoints in format {fmt!r} are not supported; Corolla reads e4m3 (DeepSeek-V3)."
            )
        size = quantization_config.get("weight_block_size", list(FP8_BLOCK))
        if size is None:
            return WeightFormat("fp8", None)
        if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
            raise CorollaError(f"FP8 weight_block_size must be two positive sizes (got {size!r}).")
        return WeightFormat("fp8", (int(size[0]), int(size[1])))
    if method == "mxfp4":
        return WeightFormat("mxfp4")
    raise CorollaError(
        f"The checkpoint's weights are published as quant_method {method!r}, which Corolla cannot read. "
        f"Supported: {', '.join(FORMATS)} (DeepSeek's block FP8, gpt-oss's MXFP4), or plain float weights; "
        "serve a plain (bf16/fp16/fp32) copy of the model and use --quant int8/nf4 to shrink it."
    )


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """[..., out, in] float8 weight * its per-block float32 ``scale_inv`` → [..., out, in] in ``dtype``.

    ``block_size`` None: ``scale_inv`` is one scale for the whole tensor. Raises ValueError on a scale of
    the wrong shape.
    """
    w = weight.float()  # [..., out, in]
    scale = scale_inv.float()
    if block_size is None:
        if scale.numel() != 1:
            raise ValueError(f"a per-tensor FP8 scale has one element (got shape {tuple(scale.shape)})")
        return (w * scale.reshape(())).to(dtype)
    rows, cols = w.shape[-2:]
    b0, b1 = block_size
    expected = (*w.shape[:-2], -(-rows // b0), -(-cols // b1))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"FP8 weight {tuple(w.shape)} needs scales {expected} for blocks {block_size}, got {tuple(scale.shape)}"
        )
    # [..., out/b0, in/b1] → [..., out, in]: each scale covers its b0 x b1 block (the last blocks may be partial)
    scale = scale.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]
    return (w * scale).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, groups, 16] uint8 FP4 pairs + [..., out, groups] uint8 exponents → [..., groups * 32, out].

    Each byte holds two values, the low nibble first; a group's 32 values share the exponent 2**(s - 127).
    The result is transposed as gpt-oss's experts keep it (``x @ W``). Raises ValueError on mismatched shapes.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8 (got {blocks.dtype}, {scales.dtype})")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks [..., groups, {MXFP4_GROUP // 2}] must match scales [..., groups] "
            f"(got {tuple(blocks.shape)} and {tuple(scales.shape)})"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [..., out, groups, 16] each
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., out, groups, 32]: low, high, low, high, ...
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS)
    plain = values.flatten(-2).transpose(-1, -2)  # [..., out, groups * 32] → [..., in, out]
    return plain.to(dtype).contiguous()


def dequantize_block(
    tensors: dict[str, torch.Tensor], fmt: WeightFormat, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One block's published tensors (names relative to the block) → plain ones, quantized ones in ``dtype``.

    Tensors that the format leaves plain (norms, biases, routers, layers kept out of quantization) pass
    through unchanged. Raises ValueError for a quantized tensor without its scales, or scales without it.
    """
    if fmt.method == "none":
        return tensors
    out = dict(tensors)
    if fmt.method == "fp8":
        for name in [n for n in tensors if n.endswith(FP8_SCALE_SUFFIX)]:
            weight = name.removesuffix(FP8_SCALE_SUFFIX)
            if weight not in out:
                raise ValueError(f"{name} has no {weight}")
            out[weight] = dequantize_fp8(out[weight], out.pop(name), fmt.block_size, dtype)
        left = [n for n, t in out.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if left:
            raise ValueError(f"FP8 tensors without a {FP8_SCALE_SUFFIX}: {left[:5]}")
        return out
    if fmt.method == "mxfp4":
        for name in [n for n in tensors if n.endswith(MXFP4_BLOCKS)]:
            base = name.removesuffix(MXFP4_BLOCKS)
            if base + MXFP4_SCALES not in out:
                raise ValueError(f"{name} has no {base + MXFP4_SCALES}")
            out[base] = dequantize_mxfp4(out.pop(name), out.pop(base + MXFP4_SCALES), dtype)
        left = [n for n in out if n.endswith(MXFP4_SCALES)]
        if left:
            raise ValueError(f"MXFP4 scales without their blocks: {left[:5]}")
        return out
    raise ValueError(f"unknown weight format {fmt.method!r}")


def published_weight_bytes(module: nn.Module, fmt: WeightFormat, dtype: torch.dtype = torch.bfloat16) -> int:
    """About the bytes a (meta) block's tensors take as ``fmt`` publishes them, the plain ones in ``dtype``.

    ``fp8``: every linear weight and fused expert matrix one byte a weight, plus a float32 scale per
    ``block_size`` block of each matrix (DeepSeek quantizes all of them; routers and norms stay plain).
    ``mxfp4``: fused expert tensors 4 bits a weight plus one exponent byte per 32 (gpt-oss); the rest plain.
    """
    total = 0
    counted: set[int] = set()
    b0, b1 = fmt.block_size or (1 << 62, 1 << 62)  # no block size: one scale per matrix
    for sub in module.modules():
        matrices: list[tuple[torch.Tensor, int, int, int]] = []  # (tensor, matrices, rows, columns)
        if type(sub) is nn.Linear and fmt.method == "fp8":
            matrices.append((sub.weight, 1, sub.out_features, sub.in_features))
        for name in ("gate_up_proj", "down_proj"):
            p = sub._parameters.get(name) if name in sub._parameters else None
            if isinstance(p, torch.Tensor) and p.dim() == 3 and fmt.method in FORMATS:
                matrices.append((p, p.shape[0], p.shape[1], p.shape[2]))
        for tensor, count, rows, cols in matrices:
            if fmt.method == "fp8":
                total += count * (rows * cols + -(-rows // b0) * -(-cols // b1) * 4)
            else:
                total += count * (rows * cols // 2 + rows * cols // MXFP4_GROUP)
            counted.add(id(tensor))
    total += sum(p.numel() * dtype.itemsize for p in module.parameters() if id(p) not in counted)
    return total

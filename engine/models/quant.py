"""Quantized blocks: weight-only int8 and nf4 versions of a block's linear layers, in plain torch.

``--quant int8`` keeps each ``nn.Linear`` weight as int8 with one float scale per output channel
(symmetric, absmax / 127); on CPU the matrix product runs in torch's int8 weight kernel
(``torch._weight_int8pack_mm``), elsewhere the weight is dequantized on the fly. ``--quant nf4`` keeps
4-bit NormalFloat codes (QLoRA's 16 levels), two per byte, with one float32 absmax per 64 weights, and
dequantizes on the fly. Activations, norms, biases, the attention cache and fused expert tensors stay
in the compute dtype. Plain torch runs the same on CPU, CUDA and MPS, needs no extra package, and its
memory is what :func:`quantized_weight_bytes` says it is (the memory-aware server counts on that).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")
_INT8_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")  # torch's CPU int8 weight kernel (private, so checked)
NF4_GROUP = 64  # weights sharing one absmax
# The 16 levels of 4-bit NormalFloat (Dettmers et al., QLoRA): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def check_quant(mode: str) -> str:
    """The mode if known, else a ValueError listing the modes."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)} (got {mode!r})")
    return mode


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 [out, in] and one scale per output channel."""

    qweight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] in the compute dtype

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] → [..., out] in ``x``'s dtype."""
        qweight = self.qweight
        scale = self.scale.to(x.dtype)
        # torch's CPU int8 kernel wins for a few rows (decode steps); long prompts are faster dequantized once.
        # (It crashes on bfloat16 rows not a multiple of 8 long, so odd shapes always dequantize; and it has
        # no derivative, so a training backward, which needs d(inputs), dequantizes too.)
        rows = x.numel() // self.in_features
        kernel = _HAS_INT8_KERNEL and x.device.type == "cpu" and x.dtype in _INT8_KERNEL_DTYPES
        kernel = kernel and not (x.requires_grad and torch.is_grad_enabled())
        if kernel and self.in_features % 32 == 0 and rows <= 32:
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), qweight, scale)
            out = out.reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, qweight.to(x.dtype) * scale[:, None])
        return out if self.bias is None else out + self.bias.to(x.dtype)


class NF4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as packed 4-bit NormalFloat codes and one absmax per 64 weights."""

    packed: torch.Tensor  # [groups * 32] uint8, two codes a byte (low nibble first)
    absmax: torch.Tensor  # [groups] float32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        w = linear.weight.detach().float().reshape(-1)  # [out * in]
        pad = (-w.numel()) % NF4_GROUP
        groups = F.pad(w, (0, pad)).reshape(-1, NF4_GROUP)  # [groups, 64]
        absmax = groups.abs().amax(dim=1).clamp_min(1e-12)  # [groups]
        levels = torch.tensor(NF4_LEVELS)
        codes = (groups / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(dim=-1).to(torch.uint8)
        codes = codes.reshape(-1)  # [groups * 64], an even count
        self.register_buffer("packed", codes[0::2] | (codes[1::2] << 4))  # [groups * 32] uint8
        self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype``."""
        packed = self.packed
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1, NF4_GROUP).int()  # [groups, 64]
        levels = torch.tensor(NF4_LEVELS, device=packed.device)
        absmax = self.absmax
        w = (levels[codes] * absmax[:, None]).reshape(-1)[: self.out_features * self.in_features]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] → [..., out] in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


_CLASSES: dict[str, type[nn.Module]] = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_linears(module: nn.Module, mode: str) -> int:
    """Replace every ``nn.Linear`` under ``module`` by its ``mode`` version, in place; return how many."""
    if check_quant(mode) == "none":
        return 0
    cls = _CLASSES[mode]
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, cls(child).to(child.weight.device))
            replaced += 1
        else:
            replaced += quantize_linears(child, mode)
    return replaced


def linear_weight_bytes(out_features: int, in_features: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes one linear layer's weight takes in ``mode`` (scales and absmax included, bias not)."""
    n = out_features * in_features
    if check_quant(mode) == "int8":
        return n + out_features * dtype.itemsize
    if mode == "nf4":
        groups = -(-n // NF4_GROUP)
        return groups * NF4_GROUP // 2 + groups * 4
    return n * dtype.itemsize


def quantized_weight_bytes(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Bytes a (possibly meta) module's parameters take once loaded in ``dtype`` and quantized with ``mode``."""
    total = 0
    linear_weights = set()
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += linear_weight_bytes(sub.out_features, sub.in_features, mode, dtype)
            linear_weights.add(id(sub.weight))
    total += sum(p.numel() * dtype.itemsize for p in module.parameters() if id(p) not in linear_weights)
    return total


def tensor_bytes(module: nn.Module) -> int:
    """Bytes a loaded module's parameters and persistent buffers really take."""
    tensors = [*module.parameters(), *(b for _, b in module.named_buffers() if b is not None)]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

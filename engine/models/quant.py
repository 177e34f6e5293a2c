"""Quantized blocks: weight-only int8 and nf4 versions of a block's linear layers, in plain torch.

``--quant int8`` keeps each ``nn.Linear`` weight as int8 with one float scale per output channel
(symmetric, absmax / 127); on CPU the matrix product runs in torch's int8 weight kernel
(``torch._weight_int8pack_mm``), elsewhere the weight is dequantized on the fly. ``--quant nf4`` keeps
4-bit NormalFloat codes (QLoRA's 16 levels), two per byte, with one float32 absmax per 64 weights, and
dequantizes on the fly. Activations, norms, biases, routers and the attention cache stay in the compute
dtype. Plain torch runs the same on CPU, CUDA and MPS, needs no extra package, and its memory is what
:func:`quantized_weight_bytes` says it is (the memory-aware server counts on that).

Mixture-of-experts blocks keep their routed experts fused, as transformers does (``mlp.experts.gate_up_proj``
[experts, 2 * inter, hidden] and ``down_proj`` [experts, hidden, inter]; gpt-oss and Llama 4 transposed,
[experts, in, out], gpt-oss with biases): most of a giant block's bytes. :func:`quantize_experts` stores each
such tensor as a :class:`QuantizedExperts` (the same int8 / nf4 codes, one expert after another) that
dequantizes only the experts the family's own forward indexes, one at a time: transformers' eager expert loop
(``experts[e]``), or Llama 4's dense ``torch.bmm`` over every expert, run expert by expert. The block then
computes exactly what it computes with the dequantized weights, and never holds more than one expert in the
compute dtype.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "nf4")
_INT8_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")  # torch's CPU int8 weight kernel (private, so checked)
NF4_GROUP = 64  # weights sharing one absmax
_NF4_CHUNK = 1 << 14  # groups encoded at once (1M weights: 64 MiB of distances)
EXPERT_TENSORS = ("gate_up_proj", "down_proj")  # transformers' fused expert tensors [experts, a, b]
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


def nf4_pack(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat weights [n] → (packed codes [groups * 32] uint8, low nibble first; absmax [groups] float32).

    Each group of 64 weights (the last one zero-padded) is scaled by its largest magnitude and each weight
    takes the nearest of the 16 NF4 levels.
    """
    w = values.float()
    groups = F.pad(w, (0, (-w.numel()) % NF4_GROUP)).reshape(-1, NF4_GROUP)  # [groups, 64]
    absmax = groups.abs().amax(dim=1).clamp_min(1e-12)  # [groups]
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    codes = torch.empty(groups.shape, dtype=torch.uint8, device=w.device)  # [groups, 64]
    for first in range(0, groups.shape[0], _NF4_CHUNK):  # bounded: the distances take 64 bytes a weight
        part = groups[first : first + _NF4_CHUNK] / absmax[first : first + _NF4_CHUNK, None]
        codes[first : first + _NF4_CHUNK] = part.unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    codes = codes.reshape(-1)  # [groups * 64], an even count
    return codes[0::2] | (codes[1::2] << 4), absmax


def nf4_unpack(packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Packed codes [..., groups * 32] and absmax [..., groups] → float32 weights [..., groups * 64] (padding kept)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).int()  # [..., groups * 32, 2]
    codes = codes.reshape(*absmax.shape, NF4_GROUP)  # [..., groups, 64]
    levels = torch.tensor(NF4_LEVELS, device=packed.device)
    return (levels[codes] * absmax.float()[..., None]).reshape(*absmax.shape[:-1], -1)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 [out, in] and one scale per output channel."""

    qweight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] in the compute dtype

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(device).float()  # [out, in], on the device it will run on
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

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

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        packed, absmax = nf4_pack(linear.weight.detach().to(device).reshape(-1))
        self.register_buffer("packed", packed)  # [groups * 32] uint8
        self.register_buffer("absmax", absmax)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype``."""
        w = nf4_unpack(self.packed, self.absmax)[: self.out_features * self.in_features]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] → [..., out] in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


class QuantizedExperts(nn.Module):
    """A fused expert tensor [experts, a, b] stored int8 or nf4, expert by expert, read one expert at a time.

    ``experts[e]`` is expert ``e``'s matrix [a, b] (or ``[..., a, b]`` for a tensor of indices) dequantized to
    the compute dtype: what transformers' eager expert loops index. ``torch.bmm(x, experts)`` with ``x``
    [experts, tokens, a] (Llama 4 runs every expert on every token) multiplies expert by expert. int8 keeps one
    scale per output channel of each expert (``in_dim`` is the axis of the inputs: 2 for ``F.linear``'s
    [out, in], 1 for ``x @ W``'s [in, out]); nf4 one absmax per 64 weights of each expert.
    """

    qweight: torch.Tensor  # int8 [experts, a, b]
    scale: torch.Tensor  # int8's scales [experts, a, 1] or [experts, 1, b], in the compute dtype
    packed: torch.Tensor  # nf4's codes [experts, groups * 32] uint8, two a byte (low nibble first)
    absmax: torch.Tensor  # nf4's [experts, groups] float32

    def __init__(self, weight: torch.Tensor, mode: str, in_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if weight.dim() != 3 or in_dim not in (1, 2):
            raise ValueError(f"expected fused experts [experts, a, b] and in_dim 1 or 2, got {tuple(weight.shape)}")
        self.mode, self.in_dim = check_quant(mode), in_dim
        self.shape = torch.Size(weight.shape)
        self.dtype = weight.dtype
        experts, a, b = weight.shape
        device = weight.device if device is None else torch.device(device)  # where the codes are kept
        if mode == "int8":
            scale_shape = (experts, a, 1) if in_dim == 2 else (experts, 1, b)
            self.register_buffer("qweight", torch.empty(experts, a, b, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(scale_shape, dtype=weight.dtype, device=device))
        else:
            groups = -(-a * b // NF4_GROUP)
            self.register_buffer(
                "packed", torch.empty(experts, groups * NF4_GROUP // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer("absmax", torch.empty(experts, groups, dtype=torch.float32, device=device))
        for e in range(experts):  # one expert in float32 at a time
            w = weight[e].detach().to(device).float()  # [a, b]
            if mode == "int8":
                scale = (w.abs().amax(dim=in_dim - 1, keepdim=True) / 127.0).clamp_min(1e-12)
                self.qweight[e] = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
                self.scale[e] = scale.to(weight.dtype)
            else:
                self.packed[e], self.absmax[e] = nf4_pack(w.reshape(-1))

    @property
    def num_experts(self) -> int:
        """How many experts the tensor holds."""
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The dequantized matrix of expert ``index`` [a, b] in the compute dtype (an int or index tensor)."""
        a, b = self.shape[1], self.shape[2]
        if self.mode == "int8":
            return self.qweight[index].to(self.dtype) * self.scale[index]
        absmax = self.absmax[index]
        w = nf4_unpack(self.packed[index], absmax)[..., : a * b]
        return w.reshape(*absmax.shape[:-1], a, b).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """Every expert [experts, a, b] in the compute dtype (for tests and tools; the forward never calls it)."""
        return torch.stack([self[e] for e in range(self.num_experts)])

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """``torch.bmm(x, experts)`` expert by expert; any other torch call on the quantized tensor is refused."""
        if func is torch.bmm and len(args) == 2 and isinstance(args[1], cls) and not kwargs:
            x, experts = args  # x [experts, tokens, a]
            out = x.new_empty(experts.num_experts, x.shape[1], experts.shape[2])  # [experts, tokens, b]
            for e in range(experts.num_experts):
                torch.mm(x[e], experts[e], out=out[e])
            return out
        raise TypeError(f"{getattr(func, '__name__', func)} is not supported on quantized experts (only [e] and bmm)")

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, {self.mode}"


def _expert_input_dim(experts: nn.Module) -> int:
    """Which axis of each expert's matrix its inputs run along: 2 for [out, in] (``F.linear``), 1 for [in, out].

    transformers' decorated expert classes say it (``is_transposed``: gpt-oss); Llama 4's, undecorated,
    multiplies ``x @ W`` with [in, out] matrices.
    """
    return 1 if getattr(experts, "is_transposed", True) else 2


def quantize_experts(module: nn.Module, mode: str, device: torch.device | str | None = None) -> int:
    """Store every fused expert tensor under ``module`` as :class:`QuantizedExperts`, in place; return how many.

    The experts keep the family's own forward: transformers' eager expert loop (its ``grouped_mm`` needs the
    whole tensor at once, so quantized experts are switched to ``eager``), or Llama 4's ``bmm``.
    """
    if check_quant(mode) == "none":
        return 0
    replaced = 0
    for experts in list(module.modules()):
        names = [n for n in EXPERT_TENSORS if isinstance(experts._parameters.get(n), torch.Tensor)]
        if not names or any(experts._parameters[n].dim() != 3 for n in names):  # type: ignore[union-attr]
            continue
        in_dim = _expert_input_dim(experts)
        for name in names:
            weight = experts._parameters[name]
            assert weight is not None  # checked above
            quantized = QuantizedExperts(weight, mode, in_dim, device)
            delattr(experts, name)
            setattr(experts, name, quantized)
            del weight
            replaced += 1
        config = getattr(experts, "config", None)
        if config is not None and getattr(config, "_experts_implementation", "eager") not in (None, "eager"):
            config = copy.deepcopy(config)  # the block's config is shared with the others (and the span)
            config._experts_implementation = "eager"
            experts.config = config
    return replaced


def quantize_block(module: nn.Module, mode: str, device: torch.device | str | None = None) -> int:
    """Quantize a block (or span) as ``--quant`` does: its linear layers and its fused experts; return how many.

    ``device``: where the quantized layers are kept (default: where each weight is). Each matrix goes there
    alone to be quantized, so a block loaded on the CPU reaches a GPU quantized, never in full precision.
    """
    return quantize_linears(module, mode, device) + quantize_experts(module, mode, device)


_CLASSES: dict[str, type[nn.Module]] = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_linears(module: nn.Module, mode: str, device: torch.device | str | None = None) -> int:
    """Replace every ``nn.Linear`` under ``module`` by its ``mode`` version, in place; return how many.

    Only plain ``nn.Linear`` layers: a subclass runs a forward of its own (Llama 4's router computes its top-k
    in it) and stays in the compute dtype.
    """
    if check_quant(mode) == "none":
        return 0
    cls = _CLASSES[mode]
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:  # subclasses with a forward of their own (Llama 4's router) stay as they are
            setattr(module, name, cls(child, device=device or child.weight.device))  # type: ignore[call-arg]
            replaced += 1
        else:
            replaced += quantize_linears(child, mode, device)
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


def expert_tensor_bytes(shape: tuple[int, ...], in_dim: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes a fused expert tensor [experts, a, b] takes in ``mode`` (as :class:`QuantizedExperts` holds it)."""
    experts, a, b = shape
    if check_quant(mode) == "int8":
        return experts * (a * b + (a if in_dim == 2 else b) * dtype.itemsize)
    if mode == "nf4":
        groups = -(-a * b // NF4_GROUP)
        return experts * (groups * NF4_GROUP // 2 + groups * 4)
    return experts * a * b * dtype.itemsize


def quantized_weight_bytes(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Bytes a (possibly meta) module's parameters take once loaded in ``dtype`` and quantized with ``mode``:
    linear weights and fused expert tensors as :func:`quantize_block` stores them, everything else in ``dtype``
    (what :func:`tensor_bytes` then finds in the loaded block)."""
    total = 0
    counted = set()
    for sub in module.modules():
        if type(sub) is nn.Linear:
            total += linear_weight_bytes(sub.out_features, sub.in_features, mode, dtype)
            counted.add(id(sub.weight))
        for name in EXPERT_TENSORS:
            p = sub._parameters.get(name) if name in sub._parameters else None
            if isinstance(p, torch.Tensor) and p.dim() == 3:
                total += expert_tensor_bytes(tuple(p.shape), _expert_input_dim(sub), mode, dtype)
                counted.add(id(p))
    total += sum(p.numel() * dtype.itemsize for p in module.parameters() if id(p) not in counted)
    # Buffers (DeepSeek's router bias): floating ones in ``dtype`` once the block is loaded, the others as built.
    buffers = (b for b in module.buffers() if b is not None)
    total += sum(b.numel() * (dtype.itemsize if b.is_floating_point() else b.element_size()) for b in buffers)
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

"""LoRA adapters served with a span: PEFT's saved files read directly, one adapter chosen per request.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with tensors
named like ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. For every block of the
span, each targeted ``nn.Linear`` becomes a :class:`LoraLinear` that adds ``scale * B(A(x))`` of the
adapter the span's running forward was given (``span(..., adapter=name)``, kept in the span's
:class:`~corolla.engine.models.span.AdapterChoice`); with none given it is the plain layer.
On a quantized server (``--quant int8`` / ``nf4``) the frozen layer is the quantized one and the update
runs in float32 next to it, as QLoRA trains and serves. Servers need no PEFT: only the files. The
adapter's name is its folder's name.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from corolla.engine.errors import CorollaError
from corolla.engine.models.quant import Int8Linear, NF4Linear
from corolla.engine.models.span import AdapterChoice, BlockSpan

MAX_ADAPTER_NAME = 128
ADAPTABLE = (nn.Linear, Int8Linear, NF4Linear)  # frozen layers a LoRA update can sit next to


class LoraLinear(nn.Module):
    """A frozen linear layer (plain or quantized) plus the low-rank updates of every served adapter that
    targets it."""

    def __init__(self, base: nn.Linear | Int8Linear | NF4Linear, choice: AdapterChoice) -> None:
        super().__init__()
        self.base = base
        self.choice = choice  # the span's: which adapter its running forward applies
        self.in_features, self.out_features = base.in_features, base.out_features
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # name -> (A [r, in], B [out, r], scale)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some blocks read it directly, e.g. for its dtype); plain layers only."""
        weight = self.base.weight
        if not isinstance(weight, torch.Tensor):
            raise AttributeError(f"a quantized {type(self.base).__name__} has no float weight")
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        update = self.updates.get(self.choice.name or "")
        if update is None:
            return out
        a, b, scale = update
        return out + (x.to(a.dtype) @ a.T @ b.T * scale).to(out.dtype)


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter read from disk: its name, scale and tensors by module path within a block."""

    name: str
    scale: float
    # (global block index, module path inside the block, e.g. "self_attn.q_proj") -> (A [r, in], B [out, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder = Path(path).expanduser()
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise CorollaError(
            f"{folder} is not a PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors): {e}"
        ) from e
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CorollaError(f"{folder}: only LoRA adapters are supported (peft_type {config.get('peft_type')!r})")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CorollaError(f"{folder}: per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _NAME.search(name)
        if match is None:
            raise CorollaError(
                f"{folder}: tensor {name} is not a LoRA matrix of a block (only block layers can be adapted)"
            )
        block, module, half = int(match.group(1)), match.group(2), match.group(3)
        halves.setdefault((block, module), {})[half] = tensor.float()
    weights = {}
    for key, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise CorollaError(f"{folder}: {key[1]} of block {key[0]} lacks lora_A or lora_B")
        weights[key] = (pair["A"], pair["B"])
    name = folder.resolve().name
    if not 0 < len(name) <= MAX_ADAPTER_NAME:
        raise CorollaError(f"adapter folder name {name!r} must have 1 to {MAX_ADAPTER_NAME} characters")
    return LoraAdapter(name, scale, weights)


def attach_adapters(span: BlockSpan, adapters: Sequence[LoraAdapter]) -> list[str]:
    """Wrap the span's targeted linear layers and register every adapter's updates; returns the names."""
    names: list[str] = []
    for adapter in adapters:
        if adapter.name in names:
            raise CorollaError(f"two adapters are named {adapter.name!r}; rename one folder")
        for (block, path), (a, b) in adapter.weights.items():
            if not span.start <= block < span.end:
                continue
            layer = span.layers[block - span.start]
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = layer.get_submodule(parent_path) if parent_path else layer
                module = getattr(parent, attr)
            except AttributeError as e:
                raise CorollaError(f"adapter {adapter.name}: block {block} has no layer {path}") from e
            if isinstance(module, ADAPTABLE):
                module = LoraLinear(module, span.adapter_choice)
                setattr(parent, attr, module)
            if not isinstance(module, LoraLinear):
                raise CorollaError(f"adapter {adapter.name}: {path} is a {type(module).__name__}, not a linear layer")
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
                raise CorollaError(
                    f"adapter {adapter.name}: {path} of block {block} has shapes {list(a.shape)} x {list(b.shape)}, "
                    f"which do not fit a {module.in_features}->{module.out_features} layer (another model's adapter?)"
                )
            device = next(itertools.chain(module.base.parameters(), module.base.buffers())).device
            module.updates[adapter.name] = (a.to(device), b.to(device), adapter.scale)
        names.append(adapter.name)
    span.adapters = tuple(names)
    return names

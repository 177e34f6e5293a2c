"""Reference gradients for the training tests: transformers' own model, its blocks hooked, plain autograd.

The hooks replace the first block's input with given hidden states and add deep prompts to the first
positions before each block (what Corolla's servers do), so the reference shares no code with Corolla's
spans: transformers builds its own masks, positions and rotary embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module, num_blocks: int) -> nn.ModuleList:
    """The model's list of decoder blocks (the one ModuleList with ``num_blocks`` entries)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_blocks:
            return module
    raise ValueError(f"no list of {num_blocks} blocks in {type(model).__name__}")


def reference_block_grads(
    model: nn.Module, hidden: torch.Tensor, grad_out: torch.Tensor, prompts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run every block of ``model`` on ``hidden`` [batch, length, hidden] with deep ``prompts``
    [blocks, batch, pre, hidden] (or None); return (outputs, d(hidden), d(prompts)) for output gradient
    ``grad_out``."""
    config: Any = model.config
    n = int(config.num_hidden_layers)
    layers = decoder_layers(model, n)
    x = hidden.detach().clone().requires_grad_(True)
    p = prompts.detach().clone().requires_grad_(True) if prompts is not None else None
    captured: list[torch.Tensor] = []

    def pre_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            positional = len(args) > 0
            h = args[0] if positional else kwargs["hidden_states"]
            if index == 0:
                h = x
            if p is not None:
                pre = p.shape[2]
                h = torch.cat([h[:, :pre] + p[index], h[:, pre:]], dim=1)
            if positional:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    def last_hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[n - 1].register_forward_hook(last_hook))
    try:
        ids = torch.full(hidden.shape[:2], 7, dtype=torch.long)
        with torch.enable_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            out = captured[-1]
            wrt = [x] if p is None else [x, p]
            grads = torch.autograd.grad(out, wrt, grad_outputs=grad_out)
    finally:
        for handle in handles:
            handle.remove()
    return out.detach(), grads[0], grads[1] if p is not None else None

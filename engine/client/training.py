"""The differentiable forward of a distributed model: soft prompts, remote blocks with autograd, a loss.

:meth:`DistributedModelForCausalLM.forward` comes here when something needs gradients (trainable prompts,
local parameters left trainable) or a loss is asked for; plain inference keeps the stateless forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from corolla.engine.client.route_autograd import RemoteBlocks, remote_blocks

if TYPE_CHECKING:
    from corolla.engine.client.model import DistributedModelForCausalLM

IGNORE_INDEX = -100  # label value that counts for nothing in the loss (transformers' convention)


def needs_autograd(model: DistributedModelForCausalLM) -> bool:
    """Whether a forward must be differentiable: grad mode on and some local parameter trainable."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def training_blocks(model: DistributedModelForCausalLM) -> RemoteBlocks:
    """The model's swarm access for training calls (made on first use; it remembers the last route)."""
    blocks: RemoteBlocks | None = model.__dict__.get("_remote_blocks")
    if blocks is None:
        cfg = model.client_config
        blocks = RemoteBlocks(model.manager, model.p2p, model.loop, cfg, cfg.active_adapter)
        model.__dict__["_remote_blocks"] = blocks
    return blocks


def tuned_hidden(model: DistributedModelForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Outputs of the last block for ``input_ids`` [batch, length], differentiable, prompt positions removed.

    With prompt tuning, the input prompts go before the embedded tokens and the deep prompts travel to the
    servers with every call; the result has the positions of ``input_ids`` only ([batch, length, hidden]).
    """
    embeds = model.head.embed(input_ids.to(model.device))  # [batch, length, hidden]
    batch = embeds.shape[0]
    pre = 0
    deep = None
    if model.ptune is not None:
        pre = model.ptune.pre_seq_len
        prompts = model.ptune.input_prompts(batch).to(embeds.device, embeds.dtype)  # [batch, pre, hidden]
        embeds = torch.cat([prompts, embeds], dim=1)
        deep = model.ptune.deep_prompts(batch)  # [blocks, batch, pre, hidden] or None
    hidden = remote_blocks(embeds, deep, training_blocks(model))
    return hidden[:, pre:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; -100 labels are skipped."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # [batch * (length - 1), vocab]
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted.float(), targets, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def greedy_generate(model: DistributedModelForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full stateless forwards (what a prompt-tuned model uses: prompts apply to each)."""
    ids = input_ids.cpu()
    for _ in range(max_new_tokens):
        logits = model.head.logits(tuned_hidden(model, ids)[:, -1:])  # [batch, 1, vocab]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
    return ids.to(input_ids.device)

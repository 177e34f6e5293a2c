"""The training paths of a distributed model: soft prompts, remote blocks with autograd, a loss.

:meth:`DistributedModelForCausalLM.forward` comes here when something needs gradients (trainable prompts,
local parameters left trainable) or a loss is asked for; plain inference keeps the stateless forward.
A prompt-tuned model also generates from here (its prompts go with every full forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.engine.client.ptune import PromptTuning
from corolla.engine.client.route_autograd import RemoteBlocks, remote_blocks
from corolla.engine.errors import CorollaError

if TYPE_CHECKING:
    from corolla.engine.client.model import DistributedModelForCausalLM

IGNORE_INDEX = -100  # label value that counts for nothing in the loss (transformers' convention)


def needs_autograd(model: DistributedModelForCausalLM) -> bool:
    """Whether a forward must be differentiable: grad mode on and some local parameter trainable."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def takes_training_path(model: DistributedModelForCausalLM, labels: torch.Tensor | None) -> bool:
    """Whether ``model(ids, labels=labels)`` runs here: a loss asked for, prompts, or gradients needed."""
    return labels is not None or model.ptune is not None or needs_autograd(model)


def make_prompt_tuning(model: DistributedModelForCausalLM, tuning_mode: str, pre_seq_len: int) -> PromptTuning:
    """New trainable prompts for ``model``: input prompts start as the embeddings of ``pre_seq_len`` random
    vocabulary tokens (always the same ones), deep prompts at zero."""
    vocab = int(model.config.vocab_size)
    picks = torch.randint(0, vocab, (pre_seq_len,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        init = model.head.embed(picks[None].to(model.device))[0]  # [pre, hidden]
    blocks, hidden_size = int(model.config.num_hidden_layers), int(model.config.hidden_size)
    return PromptTuning(tuning_mode, pre_seq_len, blocks, hidden_size, init).to(model.device)


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


def training_forward(
    model: DistributedModelForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor | None
) -> CausalLMOutputWithPast:
    """The differentiable forward: logits [batch, length, vocab] on the inputs' device, and the loss if
    ``labels`` [batch, length] are given."""
    logits = model.head.logits(tuned_hidden(model, input_ids))
    loss = causal_lm_loss(logits, labels) if labels is not None else None
    return CausalLMOutputWithPast(loss=loss, logits=logits.to(input_ids.device))


def check_tuned_generate(input_ids: torch.Tensor | None, do_sample: bool, in_session: bool) -> torch.Tensor:
    """The ids a deep_ptune model generates from, or a clear error for what it cannot do."""
    if input_ids is None or do_sample or in_session:
        raise CorollaError(
            "a deep_ptune model generates greedily from input_ids without sessions (its per-block prompts go "
            "with every forward); call generate(input_ids, max_new_tokens=...) with do_sample=False"
        )
    return input_ids


def check_tuned_session(input_ids: torch.Tensor | None, in_session: bool) -> torch.Tensor:
    """The ids a ``ptune`` model generates from in its own session, or a clear error for what it cannot do."""
    if input_ids is None or in_session:
        raise CorollaError(
            "a prompt-tuned model opens its own session (its prompts go first, before the input): call "
            "generate(input_ids, ...) without session= and outside inference_session()"
        )
    return input_ids


@torch.no_grad()
def greedy_generate(model: DistributedModelForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full stateless forwards (what a prompt-tuned model uses: prompts apply to each)."""
    ids = input_ids.cpu()
    for _ in range(max_new_tokens):
        logits = model.head.logits(tuned_hidden(model, ids)[:, -1:])  # [batch, 1, vocab]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
    return ids.to(input_ids.device)

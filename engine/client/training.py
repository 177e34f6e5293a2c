"""The training paths of a distributed model: soft prompts, remote blocks with autograd, a loss.

:meth:`DistributedModelForCausalLM.forward` comes here when something needs gradients (trainable prompts,
local parameters left trainable) or a loss is asked for; plain inference keeps the stateless forward.
A prompt-tuned model also generates from here (its prompts go with every full forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.engine.client.context import ClientContext
from corolla.engine.client.ptune import PromptTuning
from corolla.engine.client.route_autograd import RemoteBlocks, remote_blocks
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import ClientHead

IGNORE_INDEX = -100  # label value that counts for nothing in the loss (transformers' convention)


def make_prompt_tuning(head: ClientHead, config: PretrainedConfig, tuning_mode: str, pre_seq_len: int) -> PromptTuning:
    """New trainable prompts for a model with ``head`` and ``config``: input prompts start as the embeddings
    of ``pre_seq_len`` random vocabulary tokens (always the same ones), deep prompts at zero."""
    device = head.embed_tokens.weight.device
    vocab = int(config.vocab_size)
    picks = torch.randint(0, vocab, (pre_seq_len,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        init = head.embed(picks[None].to(device))[0]  # [pre, hidden]
    blocks, hidden_size = int(config.num_hidden_layers), int(config.hidden_size)
    return PromptTuning(tuning_mode, pre_seq_len, blocks, hidden_size, init).to(device)


class TrainingPath:
    """A model's differentiable path: its local head and its remote blocks (which remember the last route).

    The model owns one, made with it; the prompts (``model.ptune``, which may be added later) come with
    each call.
    """

    def __init__(self, head: ClientHead, context: ClientContext) -> None:
        self.head = head
        self.blocks = RemoteBlocks(context, context.config.active_adapter)

    def hidden(self, input_ids: torch.Tensor, ptune: PromptTuning | None) -> torch.Tensor:
        """Outputs of the last block for ``input_ids`` [batch, length], differentiable, prompt positions removed.

        With prompt tuning, the input prompts go before the embedded tokens and the deep prompts travel to the
        servers with every call; the result has the positions of ``input_ids`` only ([batch, length, hidden]).
        """
        embeds = self.head.embed(input_ids.to(self.head.embed_tokens.weight.device))  # [batch, length, hidden]
        batch = embeds.shape[0]
        pre = 0
        deep = None
        if ptune is not None:
            pre = ptune.pre_seq_len
            prompts = ptune.input_prompts(batch).to(embeds.device, embeds.dtype)  # [batch, pre, hidden]
            embeds = torch.cat([prompts, embeds], dim=1)
            deep = ptune.deep_prompts(batch)  # [blocks, batch, pre, hidden] or None
        hidden = remote_blocks(embeds, deep, self.blocks)
        return hidden[:, pre:]

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None, ptune: PromptTuning | None
    ) -> CausalLMOutputWithPast:
        """The differentiable forward: logits [batch, length, vocab] on the inputs' device, and the loss if
        ``labels`` [batch, length] are given."""
        logits = self.head.logits(self.hidden(input_ids, ptune))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits.to(input_ids.device))

    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.Tensor, max_new_tokens: int, ptune: PromptTuning | None) -> torch.Tensor:
        """Greedy decoding by full stateless forwards (what a prompt-tuned model uses: prompts apply to each)."""
        ids = input_ids.cpu()
        for _ in range(max_new_tokens):
            logits = self.head.logits(self.hidden(ids, ptune)[:, -1:])  # [batch, 1, vocab]
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
        return ids.to(input_ids.device)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; -100 labels are skipped."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # [batch * (length - 1), vocab]
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted.float(), targets, ignore_index=IGNORE_INDEX)


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

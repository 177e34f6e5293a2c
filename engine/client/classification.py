"""Sequence classification over the swarm: the last token's final hidden state through a trainable score head."""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from corolla.engine.client.inputs import check_ids, check_unsupported
from corolla.engine.client.model import DistributedModelForCausalLM


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    """A classifier whose blocks run on swarm servers: ``model(input_ids, labels=...)`` → loss and logits.

    The score head (``model.score``, [num_labels, hidden]) is local and trainable; with ``tuning_mode``
    the prompts train too. Like transformers' ``*ForSequenceClassification``, the last position of each
    sequence is classified (sequences of equal length, no padding); one label means regression (MSE).
    """

    score: nn.Linear
    num_labels: int

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, num_labels: int = 2, **kwargs: Any) -> Self:
        """As :meth:`DistributedModelForCausalLM.from_pretrained`, plus ``num_labels`` (a new, random score head)."""
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        model = super().from_pretrained(model_name_or_path, **kwargs)
        model.num_labels = num_labels
        generator = torch.Generator().manual_seed(0)
        score = nn.Linear(int(model.config.hidden_size), num_labels, bias=False)
        with torch.no_grad():
            score.weight.copy_(torch.randn(score.weight.shape, generator=generator) * 0.02)
        model.score = score.to(model.device)
        return model

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **unused: Any,
    ) -> SequenceClassifierOutput:
        """[batch, length] ids → ``.logits`` [batch, num_labels] (and ``.loss`` with ``labels`` [batch])."""
        check_unsupported(unused)
        check_ids(input_ids, attention_mask)
        last = self._training_path.hidden(input_ids, self.ptune)[:, -1]  # [batch, hidden]
        logits = self.score(self.head.norm(last.to(self.score.weight.dtype))).float()  # [batch, num_labels]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits[:, 0], labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits.to(input_ids.device))

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Not a generator: classify with ``model(input_ids).logits``."""
        raise TypeError("DistributedModelForSequenceClassification classifies; use model(input_ids).logits")

"""What the model takes from its caller: checks of token ids and arguments, hidden states in their wire
form."""

from __future__ import annotations

import logging
from typing import Any

import torch

from corolla.engine.wire.tensors import WIRE_DTYPES

logger = logging.getLogger(__name__)


def to_wire(hidden: torch.Tensor, wire_dtype: str = "auto") -> torch.Tensor:
    """Hidden states as the servers take them: in CPU memory, in the wire dtype (``ClientConfig.wire_dtype``).

    ``auto`` keeps the model's dtype (float32 if it has no wire form); a 16-bit one compresses float32
    activations to half the bytes (servers compute in their own dtype and answer in the one they were sent).
    """
    if wire_dtype != "auto":
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype {wire_dtype!r} is not one of auto, {', '.join(WIRE_DTYPES)}")
        return hidden.to("cpu", WIRE_DTYPES[wire_dtype])
    dtype = hidden.dtype if hidden.dtype in WIRE_DTYPES.values() else torch.float32
    return hidden.to("cpu", dtype)


def check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raise a clear error for token ids the model cannot take (shape, dtype, padding)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be an integer tensor [batch, length] (got {shape}); "
            'use tokenizer(text, return_tensors="pt")["input_ids"]'
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported yet: use sequences of equal length")


_UNSUPPORTED = ("past_key_values", "inputs_embeds")


def check_unsupported(kwargs: dict[str, Any]) -> None:
    """Refuse transformers arguments whose silent omission would give wrong results; ignore the rest."""
    given = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} not supported by the distributed model: pass input_ids; "
            "keep a cache with model.inference_session()"
        )
    if kwargs:
        logger.debug("ignoring %s", ", ".join(kwargs))

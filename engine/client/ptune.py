"""Trainable soft prompts: prompt tuning (``ptune``) and deep prompt tuning (``deep_ptune``).

``ptune`` puts ``pre_seq_len`` trainable vectors before the embedded input. ``deep_ptune`` also trains
one set per block: the servers add set ``i`` to the hidden states of the first ``pre_seq_len``
positions before block ``i`` (the prompts travel with each forward and backward; the blocks stay frozen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corolla.engine.errors import CorollaError

TuningMode = Literal["ptune", "deep_ptune"]
TUNING_MODES: tuple[str, ...] = ("ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """The trainable prompts of one model: input prompts [pre, hidden] and, for deep_ptune, [blocks, pre, hidden]."""

    def __init__(
        self, mode: str, pre_seq_len: int, num_blocks: int, hidden_size: int, init: torch.Tensor | None = None
    ) -> None:
        """Make the prompts; ``init`` [pre, hidden] starts the input prompts (e.g. embeddings of real tokens).

        Deep prompts start at zero, so an untrained deep_ptune model answers like the plain one with
        ``ptune``'s input prompts.
        """
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}")
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1, got {pre_seq_len}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        start = init.detach().clone().float() if init is not None else torch.randn(pre_seq_len, hidden_size) * 0.02
        if start.shape != (pre_seq_len, hidden_size):
            raise ValueError(f"init must have shape [{pre_seq_len}, {hidden_size}], got {list(start.shape)}")
        self.prompts = nn.Parameter(start)  # [pre, hidden]
        self.deep: nn.Parameter | None = None
        if mode == "deep_ptune":
            self.deep = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size))  # [blocks, pre, hidden]

    def input_prompts(self, batch: int) -> torch.Tensor:
        """[batch, pre, hidden] vectors placed before the embedded input."""
        return self.prompts[None].expand(batch, -1, -1)

    def deep_prompts(self, batch: int) -> torch.Tensor | None:
        """[blocks, batch, pre, hidden] per-block prompts (deep_ptune), or None."""
        if self.deep is None:
            return None
        return self.deep[:, None].expand(-1, batch, -1, -1)

    def save(self, path: str | Path) -> None:
        """Write the prompts to a safetensors file (with their mode and length)."""
        tensors = {"prompts": self.prompts.detach().cpu().contiguous()}
        if self.deep is not None:
            tensors["deep"] = self.deep.detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={"tuning_mode": self.mode, "pre_seq_len": str(self.pre_seq_len)})

    def load(self, path: str | Path) -> None:
        """Read prompts saved by :meth:`save` (same mode, length, blocks and width)."""
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError) as e:
            raise CorollaError(f"cannot read trained prompts from {path}: {e}") from e
        wanted = {"prompts": self.prompts, **({"deep": self.deep} if self.deep is not None else {})}
        if set(tensors) != set(wanted):
            raise CorollaError(
                f"{path} holds {sorted(tensors)} but this {self.mode} model needs {sorted(wanted)}; "
                "load it into a model made with the tuning_mode it was trained with"
            )
        for name, param in wanted.items():
            if tensors[name].shape != param.shape:
                raise CorollaError(
                    f"{path}: {name} has shape {list(tensors[name].shape)}, this model needs {list(param.shape)} "
                    "(same pre_seq_len and model)"
                )
            with torch.no_grad():
                param.copy_(tensors[name].to(param.device, param.dtype))

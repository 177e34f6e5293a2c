"""Recurrent state of linear-attention blocks (Qwen3-Next's Gated DeltaNet): fixed size per sequence, not per token.

A linear-attention block keeps no keys and values: it folds every token into a convolution state
[batch, conv_dim, kernel] (the last ``kernel`` projected inputs) and a recurrent state
[batch, heads, key_dim, value_dim]. Both have the same size whatever the session's length, so the server
budgets them per session (``cache_size.state_cache_bytes``), not per token.

A recurrent state cannot be cut back to an earlier position the way an attention cache is (by forgetting the
keys past it). :class:`RecurrentState` keeps what the state was when the current step began, so a step that
fails half-way, or a step the client sends again (same position), starts from the right state; back to
position 0 is a fresh state; any other rewind needs the session's inputs replayed from position 0 (the
client does that, see ``client/session.py``).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from corolla.engine.errors import CorollaError

__all__ = ["RecurrentState", "check_recurrent_support", "is_recurrent_block", "keeps_recurrent_state"]

LINEAR_ATTENTION = "linear_attention"


def is_recurrent_block(config: PretrainedConfig, block: int) -> bool:
    """Whether block ``block`` keeps a recurrent state (a linear-attention block) instead of keys and values."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types is not None and layer_types[block] == LINEAR_ATTENTION


def keeps_recurrent_state(config: PretrainedConfig) -> bool:
    """Whether any block of the model keeps a recurrent state (its sessions cannot rewind in place)."""
    return any(is_recurrent_block(config, b) for b in range(int(config.num_hidden_layers)))


def check_recurrent_support(layer_cls: type[torch.nn.Module], model_type: str) -> None:
    """Refuse, with what to do, a transformers release whose linear-attention layers cannot continue a state.

    Releases before 5.21 lack the linear-attention cache API (``Cache.get_conv_state``): their Qwen3-Next keeps
    the state in a model-specific cache and restarts it at every multi-token step (its chunked prefill ignores
    the previous state), so a session's prompt chunks or a multi-token step would be wrong there.
    """
    from transformers.cache_utils import Cache

    if not hasattr(Cache, "get_conv_state"):
        import transformers

        raise CorollaError(
            f"{model_type} needs transformers 5.21 or newer (the first release whose linear-attention layers keep "
            f"their state in a transformers Cache; 5.24 is tested): transformers {transformers.__version__} "
            f"restarts that state at every multi-token step of {layer_cls.__name__}. "
            "Upgrade with: pip install -U 'transformers>=5.21'"
        )


class RecurrentState:
    """The convolution and recurrent state of one linear-attention block for one session (all its rows).

    ``conv`` is updated in place by single-token steps (transformers' ``causal_conv1d_update``), ``recurrent``
    is replaced by every step. :meth:`save` keeps what they were when a step began (a copy of ``conv``, a
    reference to ``recurrent``, which no step changes in place); :meth:`restore` goes back to it.
    """

    def __init__(self) -> None:
        self.conv: torch.Tensor | None = None  # [batch, conv_dim, kernel]
        self.recurrent: torch.Tensor | None = None  # [batch, heads, key_dim, value_dim]
        self._saved: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def held(self) -> bool:
        """Whether a previous step left a state (the next step continues it)."""
        return self.conv is not None

    def save(self) -> None:
        """Remember the state as it is before a step."""
        self._saved = (None if self.conv is None else self.conv.clone(), self.recurrent)

    def restore(self) -> None:
        """Go back to the state :meth:`save` remembered."""
        conv, self.recurrent = self._saved
        self.conv = None if conv is None else conv.clone()

    def clear(self) -> None:
        """Forget everything (position 0)."""
        self.conv = self.recurrent = None
        self._saved = (None, None)

    def update_conv(self, new: torch.Tensor, kernel: int | None) -> torch.Tensor:
        """Append a step's projected inputs [batch, conv_dim, new]; return them after the held ones, at least
        ``kernel`` positions (left-padded with zeros at the start), for the block's causal convolution."""
        if kernel is None:
            if self.conv is None:
                raise ValueError("the first step of a linear-attention block must say its convolution's kernel size")
            kernel = int(self.conv.shape[-1])
        if self.conv is None:
            full = new if new.shape[-1] >= kernel else torch.nn.functional.pad(new, (kernel - new.shape[-1], 0))
        else:
            full = torch.cat([self.conv, new], dim=-1)
        self.conv = full[..., -kernel:].clone()  # its own storage: single-token steps update it in place
        return full

    def nbytes(self) -> int:
        """Bytes the state holds now (both tensors)."""
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent) if t is not None)

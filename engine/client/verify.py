"""Checks of a server's output: well-formed (shape, dtype, finite) and equal to an independent replica's.

Pure tensor functions; the inference session calls them on every step (:func:`output_problem`) and on
spot checks (:func:`outputs_agree`), with the schedule and verdicts of :mod:`corolla.engine.routing.trust`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["TOLERANCE", "output_problem", "outputs_agree", "tolerance"]

TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}
"""Largest difference allowed between two honest servers' outputs, relative to the output's RMS, by the
dtype the servers compute in (an incremental step and a stateless forward round differently)."""
_UNKNOWN_DTYPE_TOLERANCE = 6e-2


def output_problem(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> str | None:
    """Why a server's answer cannot be a hop's output (wrong shape, wrong dtype, NaN or inf), or None."""
    if out.shape != shape:
        return f"sent shape {list(out.shape)}, expected {list(shape)}"
    if out.dtype != dtype:
        return f"sent {str(out.dtype).removeprefix('torch.')}, expected {str(dtype).removeprefix('torch.')}"
    if not bool(torch.isfinite(out).all()):
        return "sent NaN or infinite values"
    return None


def tolerance(dtypes: Iterable[str]) -> float:
    """The tolerance of the loosest dtype among the servers compared (unknown names get the loosest)."""
    return max((TOLERANCE.get(d, _UNKNOWN_DTYPE_TOLERANCE) for d in dtypes), default=_UNKNOWN_DTYPE_TOLERANCE)


def outputs_agree(a: torch.Tensor, b: torch.Tensor, rel_tol: float) -> bool:
    """Whether two outputs of the same hop match: ``max |a - b| <= rel_tol x RMS(b)`` per sequence.

    Random tensors of the right shape, or outputs of other weights, differ by about the RMS itself.
    """
    if a.shape != b.shape:
        return False
    a32, b32 = a.float(), b.float()
    # [batch, length, hidden] -> one scale per sequence, so a batch row of small values is not drowned.
    dims = tuple(range(1, b32.ndim)) if b32.ndim > 1 else (0,)
    scale = b32.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-6)
    return bool(((a32 - b32).abs() <= rel_tol * scale).all())

"""Checks of a server's output: well-formed (shape, dtype, finite) and equal to an independent replica's.

Pure tensor functions; the inference session calls them on every step (:func:`output_problem`) and on
spot checks (:func:`outputs_agree`), with the schedule and verdicts of :mod:`corolla.engine.routing.trust`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["TOLERANCE", "output_problem", "outputs_agree", "tolerance"]

TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}
"""Largest difference allowed between two honest servers' outputs, element by element, relative to the
element's own size plus its position's RMS (see :func:`outputs_agree`), by the dtype the servers compute in
(an incremental step and a stateless forward round differently). Measured on SmolLM2's trained weights
(``benchmarks/verification.py --part tolerance --model smollm2``): honest steps differ by at most 1.8e-5 in
float32, 3.9e-2 in float16 and 0.25 in bfloat16; random values of the output's spread by 2.1, a roll by 5.6."""
_UNKNOWN_DTYPE_TOLERANCE = 0.5


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
    """Whether two outputs of the same hop match: ``|a - b| <= rel_tol x (RMS + |b|)`` for every element, with
    the RMS of the element's position (its hidden state).

    Rounding grows with each value's magnitude: trained models carry a few massive-activation dimensions many
    times the RMS, whose honest differences in 16-bit dtypes exceed any bound relative to the RMS alone (in
    bfloat16 SmolLM2's reach 0.97 x RMS), while an element of ordinary size keeps a bound of about the RMS.
    Random tensors of the right shape, or outputs of other weights, differ by about the RMS itself.
    """
    if a.shape != b.shape:
        return False
    a32, b32 = a.float(), b.float()
    rms = b32.pow(2).mean(dim=-1, keepdim=True).sqrt()  # [batch, length, 1]: one scale per position
    scale = (rms + b32.abs()).clamp_min(1e-6)
    return bool(((a32 - b32).abs() <= rel_tol * scale).all())

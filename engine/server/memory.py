"""How much a server takes: its blocks' weights, its attention cache and its activations, under one cap.

With ``--max-memory`` the three together stay within the cap: the server takes as many blocks as fit
next to the activations of its largest job and at least ``--cache-bytes`` of cache, and the cache gets
everything the blocks leave. Without a cap, the count comes from the device's free memory as before and
the cache budget is ``--cache-bytes``. :func:`plan_memory` is pure; :func:`server_memory_plan` reads the
model's shapes, what each block's layer stores per cached token (``models/cache_size.py``) and the device's
free memory (``torch.cuda.mem_get_info`` on CUDA) and calls it.

Activations are estimated, not measured: the hidden states of the largest message a peer may send
(``--max-chunk-tokens``) through one block, with attention computed by SDPA's fused kernels (no
[tokens x context] score matrix; the additive mask is counted), float32 working copies, and the hidden
states of every request received and not yet answered (``--max-tokens-in-flight``), which peers can
send up to. Quantized blocks add the transient of dequantizing their widest layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.config import ServerConfig, format_size
from corolla.engine.errors import CorollaError
from corolla.engine.models.cache_size import token_cache_bytes
from corolla.engine.models.quant import quantized_weight_bytes
from corolla.engine.models.span import BlockSpan

logger = logging.getLogger(__name__)

DEVICE_RESERVE = 0.9  # share of a device's free memory a server without --max-memory plans for


@dataclass(frozen=True)
class MemoryPlan:
    """What the server will hold: how many blocks, and the bytes of each part."""

    num_blocks: int
    weight_bytes: int  # all its blocks' weights (as quantized)
    cache_bytes: int  # attention-cache budget all sessions share
    activation_bytes: int  # kept free for the largest job and the requests in flight
    limit: int | None  # bytes the three may take together (None: no cap)
    token_bytes: int  # cache bytes one token of one sequence takes over its blocks

    @property
    def cache_tokens(self) -> int:
        """Tokens of one sequence over all its blocks that the cache budget holds."""
        return self.cache_bytes // max(1, self.token_bytes)

    def describe(self) -> str:
        """One line for the log."""
        cap = f" of {format_size(self.limit)} ({self.limit} bytes)" if self.limit is not None else ""
        return (
            f"{self.num_blocks} blocks: weights {_mib(self.weight_bytes)}, cache {_mib(self.cache_bytes)} "
            f"({self.cache_tokens} tokens), activations {_mib(self.activation_bytes)}{cap}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _at_least(n: int) -> str:
    """A size to type that is at least ``n`` bytes: whole MiB, rounded up."""
    return f"{-(-n // 2**20)}MiB"


def plan_memory(
    block_bytes: Sequence[int],
    block_token_bytes: Sequence[int],
    activation_bytes: int,
    min_cache_bytes: int,
    limit: int | None,
    *,
    span: tuple[int, int] | None = None,
    num_blocks: int | None = None,
    device_free: int | None = None,
) -> MemoryPlan:
    """Choose the number of blocks and the cache budget.

    Args:
        block_bytes: weight bytes of each block of the model (as it will be loaded and quantized).
        block_token_bytes: cache bytes one token of one sequence takes in each block of the model.
        activation_bytes: bytes kept for activations (see the module docstring).
        min_cache_bytes: with a cap, the least cache room to keep when counting blocks (``--cache-bytes``);
            without one, the cache budget itself.
        limit: bytes weights, cache and activations may take together (``--max-memory``), or None.
        span: the blocks the user chose (``--blocks``), if any.
        num_blocks: how many blocks the user asked for (``--num-blocks``), if any.
        device_free: free bytes of the device; without a limit the blocks fill 90% of it.

    Raises:
        CorollaError: under the cap, the chosen blocks, or not even one block, fit (says what would).
    """
    total = len(block_bytes)
    widest = max(block_bytes)
    fixed = span[1] - span[0] if span is not None else num_blocks
    if fixed is not None:
        fixed = min(fixed, total)

    def per_token(blocks: int) -> int:  # the chosen span's blocks, else any ``blocks`` counted at the largest
        if span is not None:
            return sum(block_token_bytes[span[0] : span[1]])
        return blocks * max(block_token_bytes)

    if limit is None:
        if fixed is None:
            usable = int((device_free or 0) * DEVICE_RESERVE) - min_cache_bytes
            fixed = max(1, min(total, usable // widest)) if device_free is not None else total
        weights = sum(block_bytes[span[0] : span[1]]) if span is not None else fixed * widest
        return MemoryPlan(fixed, weights, min_cache_bytes, activation_bytes, None, per_token(fixed))
    if fixed is not None:
        weights = sum(block_bytes[span[0] : span[1]]) if span is not None else fixed * widest
        left = limit - weights - activation_bytes
        if left <= 0:
            raise CorollaError(
                f"--max-memory {format_size(limit)} cannot hold {fixed} blocks: their weights take "
                f"{_mib(weights)} and activations {_mib(activation_bytes)}; raise --max-memory to at least "
                f"{_at_least(weights + activation_bytes + min_cache_bytes)}, serve fewer blocks, or use "
                "--quant int8 or nf4"
            )
        if left < min_cache_bytes:
            logger.warning("only %s of attention cache fit next to %d blocks under --max-memory", _mib(left), fixed)
        return MemoryPlan(fixed, weights, left, activation_bytes, limit, per_token(fixed))
    count = min(total, (limit - activation_bytes - min_cache_bytes) // widest)
    if count < 1:
        need = widest + activation_bytes + min_cache_bytes
        raise CorollaError(
            f"--max-memory {format_size(limit)} holds not even one block: a block takes {_mib(widest)}, "
            f"activations {_mib(activation_bytes)} and the cache at least {_mib(min_cache_bytes)} (--cache-bytes); "
            f"give --max-memory {_at_least(need)} or more, or lower --cache-bytes or --max-chunk-tokens, "
            "or use --quant int8 or nf4"
        )
    weights = count * widest
    return MemoryPlan(count, weights, limit - weights - activation_bytes, activation_bytes, limit, per_token(count))


def block_weight_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str) -> list[int]:
    """Weight bytes of each block of the model in ``dtype`` with ``quant`` (built on the meta device)."""
    with torch.device("meta"):
        span = BlockSpan(config, 0, int(config.num_hidden_layers), empty=True)
    return [quantized_weight_bytes(layer, quant, dtype) for layer in span.layers]


def estimate_activation_bytes(config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype, quant: str) -> int:
    """Bytes kept free for activations (see the module docstring for what is counted)."""
    hidden = int(config.hidden_size)
    with torch.device("meta"):
        block = BlockSpan(config, 0, 1, empty=True)
    linears = [m for m in block.layers.modules() if isinstance(m, nn.Linear)]
    width = max([hidden * 4, *(m.out_features for m in linears)])
    tokens = min(cfg.max_chunk_tokens, cfg.max_batch_size * cfg.max_length)
    work = max(dtype.itemsize, 4)  # norms and softmax work in float32
    job = tokens * (8 * hidden + 3 * width) * work + 2 * tokens * cfg.max_length * dtype.itemsize  # + masks
    in_flight = cfg.max_tokens_in_flight * hidden * 4  # received hidden states (float32 at most on the wire)
    widest = max((m.in_features * m.out_features for m in linears), default=0)
    dequant = {"nf4": widest * (4 + 4 + dtype.itemsize), "int8": 2 * widest * dtype.itemsize}.get(quant, 0)
    return job + in_flight + dequant


def device_free_bytes(device: str) -> int | None:
    """Free memory of the device: ``torch.cuda.mem_get_info`` on CUDA, free RAM elsewhere (None: unknown)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def server_memory_plan(config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype, quant: str) -> MemoryPlan:
    """The plan for this server's config on its device (reads the device's free memory)."""
    from corolla.engine.config import parse_span

    free = device_free_bytes(cfg.device)
    limit = cfg.max_memory
    if limit is not None and free is not None and limit > free:
        if cfg.device.startswith("cuda"):
            logger.warning(
                "--max-memory %s is more than %s free on %s; planning for what is free",
                format_size(limit),
                _mib(free),
                cfg.device,
            )
            limit = free
        else:
            logger.info("--max-memory %s is more than the %s of RAM free now", format_size(limit), _mib(free))
    span = parse_span(cfg.blocks, int(config.num_hidden_layers)) if cfg.blocks else None
    return plan_memory(
        block_weight_bytes(config, dtype, quant),
        token_cache_bytes(config, dtype),
        estimate_activation_bytes(config, cfg, dtype, quant),
        cfg.cache_bytes,
        limit,
        span=span,
        num_blocks=cfg.num_blocks,
        device_free=free,
    )

"""How much a server takes: its blocks' weights, its attention cache and its activations, under one cap.

With ``--max-memory`` the three together stay within the cap: the server takes as many blocks as fit
next to the activations of its largest job and a cache of at least ``--cache-bytes`` that also holds one
sequence of ``--max-length`` tokens over those blocks (at what each block's layer really stores per token:
DeepSeek's latent attention stores 576 numbers, grouped-query blocks their key/value heads, sliding-window
blocks every token), and the cache gets everything the blocks leave. Without a cap, the count comes from the device's free memory as before and
the cache budget is ``--cache-bytes``. :func:`plan_memory` is pure; :func:`server_memory_plan` reads the
model's shapes, what each block's layer stores per cached token (``models/cache_size.py``) and the device's
free memory (``torch.cuda.mem_get_info`` on CUDA) and calls it.

A block's bytes come from its config alone: the block is built on the meta device (no weights) and counted
as ``--quant`` will hold it, routed experts included (``models/quant.py`` quantizes them too). A block that
fits under no cap is refused with what would make it fit: the ``--quant`` under which it does (with its
size), or the ``--max-memory`` it needs. A checkpoint published in FP8 or MXFP4 is dequantized to the
server's dtype before anything else, so ``--quant none`` holds the dtype's bytes, not the published ones: the
plan says both.

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
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.engine.config import ServerConfig, format_size
from corolla.engine.errors import CorollaError
from corolla.engine.models.cache_size import token_cache_bytes
from corolla.engine.models.formats import PLAIN, WeightFormat, published_weight_bytes
from corolla.engine.models.quant import EXPERT_TENSORS, QUANT_MODES, quantized_weight_bytes
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


@dataclass(frozen=True)
class QuantOption:
    """What the largest block takes with one ``--quant``: what a refusal offers when the chosen one does not fit."""

    quant: str  # none, int8 or nf4
    block_bytes: int  # the largest block's weights
    activation_bytes: int  # activations kept free with it (see estimate_activation_bytes)


@dataclass(frozen=True)
class BlockFacts:
    """How a refusal names the block: what it is held as and, for a published FP8/MXFP4 checkpoint, its size."""

    held_as: str = "the server's dtype"  # e.g. "bfloat16", "int8"
    model: str = ""  # e.g. "deepseek_v3"
    published: str = ""  # e.g. "FP8", when the checkpoint is published quantized
    published_bytes: int = 0  # the largest block as published
    options: tuple[QuantOption, ...] = field(default=())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _gb(n: int) -> str:
    """A size as a card's memory is sold: ``23.0 GB``, or MB under one GB."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n / 1e3:.1f} KB"


def _advice(limit: int, blocks: int, need_cache: int, facts: BlockFacts) -> str:
    """Which other ``--quant`` makes ``blocks`` blocks fit under ``limit`` (with their sizes), or that none does."""
    fits = [o for o in facts.options if blocks * o.block_bytes + o.activation_bytes + need_cache <= limit]
    if fits:
        ways = " or ".join(f"--quant {o.quant} ({_gb(o.block_bytes)} a block)" for o in fits)
        return f"it fits in {format_size(limit)} with {ways}; or "
    smallest = min(facts.options, key=lambda o: o.block_bytes, default=None)
    if smallest is not None:
        return f"not even with --quant {smallest.quant} ({_gb(smallest.block_bytes)} a block); "
    return "use --quant int8 or nf4 (if not used yet), or "


def _published_note(facts: BlockFacts) -> str:
    if not facts.published:
        return ""
    return (
        f" (the checkpoint publishes it in {facts.published}, {_gb(facts.published_bytes)} a block; the server "
        f"dequantizes it to {facts.held_as} to run it)"
    )


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
    min_cache_tokens: int = 0,
    facts: BlockFacts = BlockFacts(),
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
        min_cache_tokens: with a cap, the cache also holds this many tokens of one sequence over the blocks
            counted (``--max-length``), at ``block_token_bytes``.
        facts: how to name the block in a refusal, and the other ``--quant`` options to offer.

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

    def cache_floor(blocks: int) -> int:  # --cache-bytes, and room for one --max-length sequence over the blocks
        return max(min_cache_bytes, per_token(blocks) * min_cache_tokens)

    if fixed is not None:
        weights = sum(block_bytes[span[0] : span[1]]) if span is not None else fixed * widest
        left = limit - weights - activation_bytes
        if left <= 0:
            raise CorollaError(
                f"--max-memory {format_size(limit)} cannot hold {fixed} blocks: their weights take "
                f"{_mib(weights)} in {facts.held_as} and activations {_mib(activation_bytes)}"
                f"{_published_note(facts)}; {_advice(limit, fixed, cache_floor(fixed), facts)}"
                f"raise --max-memory to at least {_at_least(weights + activation_bytes + cache_floor(fixed))}, "
                "serve fewer blocks, or use a smaller --quant"
            )
        if left < cache_floor(fixed):
            logger.warning("only %s of attention cache fit next to %d blocks under --max-memory", _mib(left), fixed)
        return MemoryPlan(fixed, weights, left, activation_bytes, limit, per_token(fixed))
    # The most blocks n with n * widest + activations + max(--cache-bytes, n * token bytes * --max-length) <= limit.
    room = limit - activation_bytes
    count = min(total, (room - min_cache_bytes) // widest)
    if min_cache_tokens:
        count = min(count, room // (widest + max(block_token_bytes) * min_cache_tokens))
    if count < 1:
        need = widest + activation_bytes + cache_floor(1)
        of = f" of {facts.model}" if facts.model else ""
        raise CorollaError(
            f"--max-memory {format_size(limit)} holds not even one block: one block{of} needs {_gb(widest)} in "
            f"{facts.held_as}{_published_note(facts)}, next to activations {_gb(activation_bytes)} and a "
            f"cache of at least {_gb(cache_floor(1))} (--cache-bytes, --max-length); "
            f"{_advice(limit, 1, cache_floor(1), facts)}give --max-memory {_at_least(need)} or more, "
            "or lower --cache-bytes, --max-length or --max-chunk-tokens"
        )
    weights = count * widest
    return MemoryPlan(count, weights, limit - weights - activation_bytes, activation_bytes, limit, per_token(count))


def _meta_blocks(config: PretrainedConfig) -> nn.ModuleList:
    """Every block of the model, built on the meta device (shapes only: no memory, no weights)."""
    with torch.device("meta"):
        return BlockSpan(config, 0, int(config.num_hidden_layers), empty=True).layers


def block_weight_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str) -> list[int]:
    """Weight bytes of each block of the model in ``dtype`` with ``quant``, experts included (built on meta)."""
    return [quantized_weight_bytes(layer, quant, dtype) for layer in _meta_blocks(config)]


def weight_bytes_by_quant(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, list[int]]:
    """:func:`block_weight_bytes` for every ``--quant`` (one meta build)."""
    layers = _meta_blocks(config)
    return {quant: [quantized_weight_bytes(layer, quant, dtype) for layer in layers] for quant in QUANT_MODES}


def published_block_bytes(config: PretrainedConfig, fmt: WeightFormat) -> list[int]:
    """About the bytes each block takes as the checkpoint publishes it (FP8, MXFP4; bf16 for plain tensors)."""
    return [published_weight_bytes(layer, fmt) for layer in _meta_blocks(config)]


def estimate_activation_bytes(config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype, quant: str) -> int:
    """Bytes kept free for activations (see the module docstring for what is counted)."""
    hidden = int(config.hidden_size)
    layers = _meta_blocks(config)  # every block: dense and mixture-of-experts blocks differ (DeepSeek's first 3)
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    width = max([hidden * 4, *(m.out_features for m in linears)])
    # One expert's matrix: what quantized experts dequantize at a time (see models/quant.py).
    experts = [p for m in layers.modules() for n, p in m.named_parameters(recurse=False) if n in EXPERT_TENSORS]
    tokens = min(cfg.max_chunk_tokens, cfg.max_batch_size * cfg.max_length)
    work = max(dtype.itemsize, 4)  # norms and softmax work in float32
    job = tokens * (8 * hidden + 3 * width) * work + 2 * tokens * cfg.max_length * dtype.itemsize  # + masks
    in_flight = cfg.max_tokens_in_flight * hidden * 4  # received hidden states (float32 at most on the wire)
    widest = max([0, *(m.in_features * m.out_features for m in linears), *(p.shape[1] * p.shape[2] for p in experts)])
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


def server_memory_plan(
    config: PretrainedConfig, cfg: ServerConfig, dtype: torch.dtype, quant: str, published: WeightFormat = PLAIN
) -> MemoryPlan:
    """The plan for this server's config on its device (reads the device's free memory).

    ``published``: how the checkpoint publishes its blocks (FP8, MXFP4), said next to what the server holds.
    """
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
    by_quant = weight_bytes_by_quant(config, dtype)
    options = tuple(
        QuantOption(q, max(by_quant[q]), estimate_activation_bytes(config, cfg, dtype, q))
        for q in QUANT_MODES
        if max(by_quant[q]) < max(by_quant[quant])
    )
    held_as = str(dtype).removeprefix("torch.") if quant == "none" else quant
    facts = BlockFacts(held_as, str(config.model_type), options=options)
    if published.method != "none":
        published_bytes = max(published_block_bytes(config, published))
        facts = BlockFacts(held_as, facts.model, published.method.upper(), published_bytes, options)
        logger.info(
            "blocks published in %s (up to %s each) are held dequantized: %s each in %s",
            facts.published,
            _gb(published_bytes),
            _gb(max(by_quant[quant])),
            facts.held_as,
        )
    return plan_memory(
        by_quant[quant],
        token_cache_bytes(config, dtype),
        estimate_activation_bytes(config, cfg, dtype, quant),
        cfg.cache_bytes,
        limit,
        span=span,
        num_blocks=cfg.num_blocks,
        device_free=free,
        min_cache_tokens=cfg.max_length,
        facts=facts,
    )

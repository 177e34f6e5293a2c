"""A server's measured speed: one block's single-token steps/s and forward tokens/s on its device
and dtype, measured once and cached on disk (keyed by model shape, device, dtype and torch version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from corolla.engine.models.quant import quantize_block
from corolla.engine.models.span import BlockSpan, SpanCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speed:
    """Measured speed of ONE block."""

    inference_rps: float  # single-token cached steps per second
    forward_rps: float  # tokens per second in a 256-token forward


def _key(config: PretrainedConfig, device: str, dtype: torch.dtype, quant: str = "none") -> str:
    shape = {
        k: getattr(config, k, None)
        for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    }
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    raw = json.dumps([shape, name, str(dtype), torch.__version__, torch.get_num_threads(), quant], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def measure_block_speed(
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    steps: int = 16,
    forward_tokens: int = 256,
    quant: str = "none",
) -> Speed:
    """Time one randomly initialised block (the weights' values do not change its speed), quantized as served."""
    block = BlockSpan(config, 0, 1).to(device)
    block.layers.to(dtype)
    quantize_block(block.layers, quant)
    hidden = torch.randn(1, 1, config.hidden_size, device=device, dtype=dtype)
    with torch.inference_mode():
        cache = SpanCache(0, 1, steps + 2)
        block(hidden, cache)  # warm-up
        _sync(device)
        began = time.perf_counter()
        for _ in range(steps):
            block(hidden, cache)
        _sync(device)
        inference_rps = steps / (time.perf_counter() - began)
        long = torch.randn(1, forward_tokens, config.hidden_size, device=device, dtype=dtype)
        block(long)
        _sync(device)
        began = time.perf_counter()
        block(long)
        _sync(device)
        forward_rps = forward_tokens / (time.perf_counter() - began)
    return Speed(inference_rps, forward_rps)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def block_speed(
    config: PretrainedConfig, device: str, dtype: torch.dtype, cache_dir: Path, quant: str = "none"
) -> Speed:
    """Cached :func:`measure_block_speed` (measured on the first start of each device/dtype/quant/model shape)."""
    path = cache_dir / f"throughput-{_key(config, device, dtype, quant)}.json"
    try:
        return Speed(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    logger.info("measuring this machine's speed for %s blocks on %s (%s), once", config.model_type, device, dtype)
    speed = measure_block_speed(config, device, dtype, quant=quant)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(speed)))
    tmp.replace(path)
    logger.info("speed: %.1f steps/s and %.0f tokens/s per block", speed.inference_rps, speed.forward_rps)
    return speed

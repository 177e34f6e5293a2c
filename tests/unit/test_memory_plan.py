"""Memory-aware servers: weights, cache and activations under one --max-memory, checked on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from corolla.engine.config import ServerConfig, parse_size
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import Checkpoint, load_span
from corolla.engine.models.quant import tensor_bytes
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.memory import (
    block_weight_bytes,
    estimate_activation_bytes,
    plan_memory,
    server_memory_plan,
)

pytestmark = pytest.mark.timeout(120)

MiB = 2**20
KiB = 2**10


def tokens(blocks: list[int]) -> list[int]:
    """Cache bytes per token of each block: 1 KiB, the same for all."""
    return [KiB] * len(blocks)


def test_a_limit_that_fits_exactly_n_blocks_gets_n() -> None:
    blocks, act, cache = [10 * MiB] * 8, 3 * MiB, 2 * MiB
    for n in (1, 3, 8):
        limit = n * 10 * MiB + act + cache
        plan = plan_memory(blocks, tokens(blocks), act, cache, limit)
        assert plan.num_blocks == n and plan.cache_bytes == cache
        assert plan.weight_bytes + plan.cache_bytes + plan.activation_bytes == limit
        if n > 1:
            one_less = plan_memory(blocks, tokens(blocks), act, cache, limit - 1)
            assert one_less.num_blocks == n - 1
            assert one_less.cache_bytes == cache + 10 * MiB - 1  # the cache takes what the blocks leave
            assert one_less.weight_bytes + one_less.cache_bytes + one_less.activation_bytes == limit - 1
    huge = plan_memory(blocks, tokens(blocks), act, cache, 10**12)
    assert huge.num_blocks == 8 and huge.cache_bytes == 10**12 - 80 * MiB - act  # never more blocks than exist


def test_not_even_one_block_is_a_clear_error_that_names_a_size_that_works() -> None:
    blocks, act, cache = [10 * MiB] * 4, 3 * MiB, 2 * MiB
    with pytest.raises(CorollaError, match="not even one block") as info:
        plan_memory(blocks, tokens(blocks), act, cache, 15 * MiB - 1)
    message = str(info.value)
    assert "--quant" in message and "--cache-bytes" in message
    suggested = re.search(r"give --max-memory (\S+) or more", message)
    assert suggested is not None
    assert plan_memory(blocks, tokens(blocks), act, cache, parse_size(suggested.group(1))).num_blocks == 1


def test_given_blocks_must_fit_and_the_cache_gets_the_rest() -> None:
    blocks = [4 * MiB, 4 * MiB, 9 * MiB, 4 * MiB]  # block 2 is bigger (e.g. a dense block among experts)
    plan = plan_memory(blocks, tokens(blocks), MiB, MiB, 30 * MiB, span=(1, 3))
    assert plan.num_blocks == 2 and plan.weight_bytes == 13 * MiB and plan.cache_bytes == 16 * MiB
    with pytest.raises(CorollaError, match="cannot hold 2 blocks"):
        plan_memory(blocks, tokens(blocks), MiB, MiB, 14 * MiB, span=(1, 3))
    counted = plan_memory(
        blocks, tokens(blocks), MiB, MiB, 30 * MiB, num_blocks=3
    )  # any 3 blocks: counted at the widest
    assert counted.weight_bytes == 27 * MiB and counted.cache_bytes == 2 * MiB
    auto = plan_memory(blocks, tokens(blocks), MiB, MiB, 30 * MiB)
    assert auto.num_blocks == 3  # (30 - 1 - 1) // 9


def test_the_plan_counts_the_tokens_its_cache_holds_over_its_blocks() -> None:
    blocks = [4 * MiB] * 4
    token_bytes = [KiB, KiB, 3 * KiB, KiB]  # block 2 stores more per token (e.g. more key heads)
    given = plan_memory(blocks, token_bytes, MiB, MiB, 30 * MiB, span=(1, 3))
    assert given.token_bytes == 4 * KiB and given.cache_tokens == given.cache_bytes // (4 * KiB)
    counted = plan_memory(blocks, token_bytes, MiB, MiB, 30 * MiB, num_blocks=2)  # any 2: counted at the largest
    assert counted.token_bytes == 6 * KiB
    assert f"({counted.cache_tokens} tokens)" in counted.describe()


def test_without_a_limit_the_device_free_memory_decides_and_the_cache_is_as_given() -> None:
    blocks = [10 * MiB] * 8
    plan = plan_memory(blocks, tokens(blocks), MiB, 5 * MiB, None, device_free=50 * MiB)
    assert plan.num_blocks == (45 * MiB - 5 * MiB) // (10 * MiB) and plan.cache_bytes == 5 * MiB
    assert (
        plan_memory(blocks, tokens(blocks), MiB, 5 * MiB, None, device_free=MiB).num_blocks == 1
    )  # as before: at least one
    assert plan_memory(blocks, tokens(blocks), MiB, 5 * MiB, None, num_blocks=3).num_blocks == 3


@torch.inference_mode()
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_server_plan_on_a_tiny_model_holds_in_loaded_bytes(tiny_checkpoint: Callable[..., Path], quant: str) -> None:
    ckpt = Checkpoint(str(tiny_checkpoint("llama")))
    config = ckpt.config()
    # 64 tokens x 256 bytes a token (2 key/value heads of 16 float32) x 4 blocks: the same 64 KiB as --cache-bytes.
    base = ServerConfig(
        cache_bytes=64 * 1024, max_length=64, max_chunk_tokens=64, max_tokens_in_flight=256, quant=quant
    )
    block = block_weight_bytes(config, torch.float32, quant)[0]
    act = estimate_activation_bytes(config, base, torch.float32, quant)
    limit = 4 * block + act + base.cache_bytes  # exactly four blocks
    for given, blocks in ((limit, 4), (limit - 1, 3)):
        cfg = ServerConfig(**{**base.__dict__, "max_memory": given})
        plan = server_memory_plan(config, cfg, torch.float32, quant)
        assert plan.num_blocks == blocks
        span = load_span(ckpt, config, 0, blocks, torch.float32, "cpu", quant)
        backend = SpanBackend(span, config, ServerConfig(cache_bytes=plan.cache_bytes), torch.float32)
        try:
            held = tensor_bytes(span.layers) + backend.budget.capacity + plan.activation_bytes
            assert tensor_bytes(span.layers) == plan.weight_bytes
            assert held <= given
            assert backend.cache_tokens_left() == plan.cache_tokens  # the plan and the server count alike
        finally:
            backend.shutdown()


MEASURE = """
import json, resource, sys, torch
from corolla.engine.config import ServerConfig
from corolla.engine.models.span import BlockSpan
from corolla.engine.server.memory import estimate_activation_bytes
from corolla.engine.apps.tiny_models import tiny_config
torch.set_num_threads(1)


def peak():
    # The RSS high-water mark of this process's memory (VmHWM starts afresh at exec; ru_maxrss carries the
    # parent's RSS at fork over, which hides the growth when the parent is large).
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


config = tiny_config("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=1)
cfg = ServerConfig(max_chunk_tokens=1024, max_length=1024, max_tokens_in_flight=1024)
block = BlockSpan(config, 0, 1).eval()
x = torch.randn(1, 1024, 256)
with torch.inference_mode():
    block(x[:, :256])  # warm-up at a quarter of the size: kernels, pools and allocator arenas are not activations
before = peak()
with torch.inference_mode():
    block(x)
after = peak()
print(json.dumps({"peak_growth": after - before, "estimate": estimate_activation_bytes(config, cfg, torch.float32, "none")}))
"""


def test_activation_estimate_covers_the_peak_of_the_largest_job() -> None:
    """The RSS peak of one block running the largest message a peer may send stays below the estimate."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < figures["peak_growth"] <= figures["estimate"], figures


def test_server_refuses_a_cap_that_holds_no_block_before_joining(tiny_checkpoint: Callable[..., Path]) -> None:
    from corolla.engine.server.server import Server

    cfg = ServerConfig(model=str(tiny_checkpoint("llama")), new_swarm=True, max_memory=10**6)
    with pytest.raises(CorollaError, match="holds not even one block"):  # `corolla server` prints it, exit 2
        Server(cfg)

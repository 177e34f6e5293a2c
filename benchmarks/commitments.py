"""Cost of signing every inference step (wire/commitment.py) next to the step itself.

Per one-token step a server extends the session's running input hash by one row, hashes the output and signs
a 32-byte digest with Ed25519. This prints that cost in microseconds, and as a share of a one-token decode step
of the tiny llama (all its 6 blocks, local transformers with a KV cache: the least compute a step can have),
measured in the same run. Also the cost for a 4096-wide bf16 row (a 7-8B model's hidden size).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/commitments.py
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from corolla.engine.apps.tiny_models import tiny_config
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.wire.commitment import InputChain, commitment_digest, sign_commitment

STEPS = 300


def commit_us(hidden: int, dtype: torch.dtype, identity: PeerIdentity) -> float:
    """Mean microseconds to commit one one-token step of width ``hidden``."""
    chain = InputChain()
    rows = [torch.randn(1, 1, hidden).to(dtype) for _ in range(STEPS)]
    began = time.perf_counter()
    for position, x in enumerate(rows):
        input_hash = chain.extend(x)
        sign_commitment(identity, commitment_digest("model", 0, 6, position, position + 1, input_hash, x))
    return (time.perf_counter() - began) / STEPS * 1e6


@torch.inference_mode()
def tiny_step_us() -> float:
    """Mean microseconds of a one-token decode step through the tiny llama's 6 blocks (KV cache)."""
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    layers = model.model
    ids = torch.randint(7, 100, (1, 8))
    cache = DynamicCache()
    layers(input_ids=ids, past_key_values=cache, use_cache=True)
    token = torch.randint(7, 100, (1, 1))
    began = time.perf_counter()
    for _ in range(STEPS):
        layers(input_ids=token, past_key_values=cache, use_cache=True)
    return (time.perf_counter() - began) / STEPS * 1e6


def main() -> None:
    identity = PeerIdentity.generate()
    commit_us(64, torch.float32, identity)  # warm-up
    tiny = commit_us(64, torch.float32, identity)
    wide = commit_us(4096, torch.bfloat16, identity)
    step = tiny_step_us()
    print(f"commit a one-token step, hidden 64 fp32:    {tiny:7.1f} us")
    print(f"commit a one-token step, hidden 4096 bf16:  {wide:7.1f} us")
    print(f"tiny llama decode step (6 blocks, local):   {step:7.1f} us")
    print(f"commit / tiny step:                         {tiny / step:7.1%}")


if __name__ == "__main__":
    main()

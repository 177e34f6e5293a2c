"""Forwards and first tokens: a 2-server loopback swarm against plain transformers, as ratios from one run.

Two measurements per model, each a ratio local time / swarm time (1.0: the swarm is as fast as local; target
>= 0.95): ``model(ids)`` on a batch of 8 sequences of 128 tokens (a stateless forward through every server,
logits of every position), and the first token of a 16-token prompt (``generate(max_new_tokens=1)``: the
prompt through every server and the LM head). Same weights, float32, the same thread count for the local
model and each server; local and swarm runs alternate, ``--sets`` times after a warm-up, so both see the same
load. Prints median [min-max] of the per-set ratios and the machine's load; asserts nothing. On a machine
other jobs load, wall-clock ratios favour the swarm's three processes (they get more of the CPU than one), so
the ratio of CPU seconds (this process; for the swarm also the servers' process trees) is printed as well.

    python benchmarks/forward_vs_local.py [--model llama-250m|tiny|smollm2|PATH] [--sets 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401 - first: the thread environment before torch
import torch
from _common import cpu_seconds, load_average, stop_on_sigterm
from concurrency import MODELS
from transformers import AutoConfig, AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, split_blocks


def timed(fn: Callable[[], object], servers: list[int], with_servers: bool) -> tuple[float, float]:
    """Wall seconds of ``fn`` and the CPU seconds it took: this process's (servers left out), plus the servers'
    process trees if ``with_servers``."""

    def used() -> float:
        own = cpu_seconds(os.getpid(), skip=servers)
        return own + sum(cpu_seconds(pid) for pid in servers) if with_servers else own

    cpu = used()
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began, used() - cpu


def measure(path: Path, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per measurement, the per-set ratios (local seconds / swarm seconds, local CPU / swarm CPU)."""
    config = AutoConfig.from_pretrained(path)
    vocab = int(config.vocab_size)
    batch = torch.randint(10, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(10, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spans = split_blocks(int(config.num_hidden_layers), 2)
    torch.set_num_threads(args.threads)
    ratios: dict[str, list[tuple[float, float]]] = {"forward 8x128": [], "first token, 16-token prompt": []}
    with Swarm(path, spans=spans, threads=args.threads) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        servers = [s.pid for s in swarm.servers]
        try:
            runs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
                "forward 8x128": (lambda: local(batch), lambda: model(batch)),
                "first token, 16-token prompt": (
                    lambda: local.generate(
                        prompt, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0
                    ),
                    lambda: model.generate(prompt, max_new_tokens=1, eos_token_id=[]),
                ),
            }
            with torch.inference_mode():
                for i in range(args.sets + 1):  # the first set warms both up
                    for name, (run_local, run_swarm) in runs.items():
                        (local_s, local_cpu), (swarm_s, swarm_cpu) = (
                            timed(run_local, servers, False),
                            timed(run_swarm, servers, True),
                        )
                        logging.info(
                            "%s: local %.1f ms (CPU %.1f), swarm %.1f ms (CPU %.1f)",
                            *(name, local_s * 1e3, local_cpu * 1e3, swarm_s * 1e3, swarm_cpu * 1e3),
                        )
                        if i:
                            ratios[name].append((local_s / swarm_s, local_cpu / swarm_cpu))
        finally:
            model.close()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-250m", help="llama-250m, tiny, smollm2 or a checkpoint folder")
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads: local model, each server")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run's times")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("corolla").setLevel(logging.WARNING)
    stop_on_sigterm()
    path = MODELS[args.model]() if args.model in MODELS else Path(args.model)
    print(f"start: {load_average()}; {os.uname().nodename}")
    ratios = measure(path, args)
    print(
        f"model: {path.name}, fp32, 2 servers x {args.threads} threads, local {args.threads} threads, "
        f"{args.sets} sets after a warm-up; end: {load_average()}"
    )
    for name, pairs in ratios.items():
        for k, what in enumerate(("time", "CPU seconds")):
            values = [pair[k] for pair in pairs]
            print(
                f"{name}: local {what} / swarm {what} = {statistics.median(values):.2f} "
                f"[{min(values):.2f}-{max(values):.2f}] (target >= 0.95)"
            )


if __name__ == "__main__":
    main()

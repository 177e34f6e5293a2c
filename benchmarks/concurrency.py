"""Concurrent sessions on one 2-server swarm against the limit: the same prompts as one local batch.

N sessions (1, 8, 16 by default) generate at once, each greedy, from one client process (one thread per
session). Servers batch the decode steps of sessions that are ready together into one forward. The limit is
what plain transformers does with the same N prompts as ONE batch in this process (``generate``, greedy, with
its cache, the same thread count as each server): no swarm can beat one process running one batched model.
Local and swarm runs alternate, ``--sets`` times, so both see the same load. Prints, per N, the aggregate
tokens/s of both, Corolla / limit as median [min-max] over the sets, p50/p95 step latency, and CPU per token
with its ratio (on a machine other jobs load, wall-clock ratios favour the swarm's three processes, which get
more of the CPU than the one local process; the CPU ratio does not depend on the load); asserts nothing. With ``--unbatched`` the swarm run is repeated on servers started with ``--batch-rows 1``.

    python benchmarks/concurrency.py [--model tiny|llama-250m|smollm2|PATH] [--sessions 1 8 16] [--sets 3]
                                     [--new-tokens 32] [--threads 2] [--unbatched]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
from pathlib import Path

import _common  # noqa: F401 - first: the thread environment before torch
import torch
from _common import TokenClock, cpu_seconds, llama_250m, load_average, quantile, random_checkpoint, stop_on_sigterm
from transformers import AutoConfig, AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint, split_blocks

logger = logging.getLogger("concurrency")

# The tiny model of issue #29: 8 Llama blocks of hidden size 256 (random weights, the test models' tokenizer).
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4)
MODELS = {
    "tiny": lambda: random_checkpoint("llama-tiny-8x256", **TINY),
    "llama-250m": llama_250m,
    "smollm2": smollm2_checkpoint,
}


def prompts_of(n: int, prompt_len: int, vocab: int) -> list[torch.Tensor]:
    """``n`` random prompts [1, prompt_len] (the same for the swarm and the local batch)."""
    return [torch.randint(10, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def run_sessions(model: DistributedModelForCausalLM, n: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """``n`` sessions at once; aggregate tokens/s, p50 and p95 step latency in s, tokens."""
    prompts = prompts_of(n, prompt_len, vocab)
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


def run_local(local: torch.nn.Module, n: int, prompt_len: int, new_tokens: int, vocab: int, threads: int) -> dict:
    """The limit: the same ``n`` prompts as one batch of plain transformers in this process; tokens/s, CPU/token."""
    batch = torch.cat(prompts_of(n, prompt_len, vocab), dim=0)  # [n, prompt_len]
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = time.process_time()
        began = time.perf_counter()
        out = local.generate(  # type: ignore[operator]
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        wall = time.perf_counter() - began
        cpu = time.process_time() - cpu
    finally:
        torch.set_num_threads(before_threads)
    tokens = (out.shape[1] - prompt_len) * n
    return {"tps": tokens / wall, "cpu": cpu / tokens}


def measure(path: Path, args: argparse.Namespace, extra: list[str]) -> dict[int, list[dict]]:
    """Per N, one record per set: the swarm's figures and the local batch's (``limit_tps``, ``limit_cpu``)."""
    config = AutoConfig.from_pretrained(path)
    vocab = int(config.vocab_size)
    spans = split_blocks(int(config.num_hidden_layers), 2)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
            run_sessions(model, 2, args.prompt_tokens, 4, vocab)  # warm-up
            run_local(local, 2, args.prompt_tokens, 4, vocab, args.threads)
            figures: dict[int, list[dict]] = {n: [] for n in args.sessions}
            servers = [s.pid for s in swarm.servers]  # children of this process: counted apart from the client
            for _ in range(args.sets):
                for n in args.sessions:
                    limit = run_local(local, n, args.prompt_tokens, args.new_tokens, vocab, args.threads)
                    # Where the CPU goes: this process (every session's client, the bootstrap DHT) and the servers.
                    before = [cpu_seconds(os.getpid(), servers), *(cpu_seconds(pid) for pid in servers)]
                    f = run_sessions(model, n, args.prompt_tokens, args.new_tokens, vocab)
                    after = [cpu_seconds(os.getpid(), servers), *(cpu_seconds(pid) for pid in servers)]
                    used = [b - a for a, b in zip(before, after, strict=True)]
                    f["client_cpu"] = used[0] / f["tokens"]
                    f["server_cpu"] = sum(used[1:]) / f["tokens"]
                    f["limit_tps"], f["limit_cpu"] = limit["tps"], limit["cpu"]
                    logger.info("%d sessions: %s", n, f)
                    figures[n].append(f)
            return figures
        finally:
            model.close()


def spread(values: list[float]) -> str:
    """median [min-max]"""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def report(title: str, figures: dict[int, list[dict]]) -> None:
    print(title)
    print(
        f"{'sessions':>8}{'tokens/s':>10}{'limit':>8}{'Corolla / limit':>22}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'CPU ms/token: client':>22}{'servers':>9}{'limit':>8}{'CPU: limit / Corolla':>24}"
    )
    for n, runs in figures.items():

        def med(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        ratio = spread([r["tps"] / r["limit_tps"] for r in runs])
        cpu = spread(cpu_ratios(runs))
        print(
            f"{n:>8}{med('tps'):>10.1f}{med('limit_tps'):>8.1f}{ratio:>22}{med('p50') * 1e3:>9.1f}"
            f"{med('p95') * 1e3:>9.1f}{med('client_cpu') * 1e3:>22.1f}{med('server_cpu') * 1e3:>9.1f}"
            f"{med('limit_cpu') * 1e3:>8.1f}{cpu:>24}"
        )


def cpu_ratios(runs: list[dict]) -> list[float]:
    """Per set, the local batch's CPU per token / Corolla's (client and servers): the speed ratio a machine
    with the cores to spare would show, whatever the load."""
    return [r["limit_cpu"] / (r["client_cpu"] + r["server_cpu"]) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--sets", type=int, default=3, help="alternating local/swarm rounds per N")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per server and of the local batch")
    parser.add_argument("--model", default="tiny", help="tiny, llama-250m, smollm2 or a checkpoint folder")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="client stall timeout, s")
    parser.add_argument("--unbatched", action="store_true", help="also run with servers that do not batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop_on_sigterm()
    logging.getLogger("corolla").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the client: embeddings and the LM head of every session
    path = MODELS[args.model]() if args.model in MODELS else Path(args.model)
    print(f"start: {load_average()}; {os.uname().nodename}, {os.cpu_count()} cores")
    batched = measure(path, args, [])
    print(
        f"model: {path.name}, fp32, 2 servers x {args.threads} thread(s), local batch {args.threads} thread(s), "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.sets} sets; end: {load_average()}"
    )
    report("batching across sessions (default):", batched)
    if args.unbatched:
        unbatched = measure(path, args, ["--batch-rows", "1"])
        report("no batching (--batch-rows 1):", unbatched)
    for n in args.sessions:
        ratios = [r["tps"] / r["limit_tps"] for r in batched[n]]
        print(
            f"{n} sessions: Corolla / one local batch of {n} = {spread(ratios)} in tokens/s, "
            f"{spread(cpu_ratios(batched[n]))} in CPU per token (target >= 0.8 at 8 and 16)"
        )
    print(
        "CPU ms/token: CPU seconds used per generated token; client = this process (every session's embeddings, "
        "LM head, sampling and RPCs, plus the bootstrap DHT), servers = both server process trees, "
        "limit = the local batch"
    )


if __name__ == "__main__":
    main()

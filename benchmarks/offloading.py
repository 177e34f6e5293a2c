"""Corolla versus disk offloading, under one memory budget: greedy decoding of a model that does not fit it.

The seeds claim Petals is "up to 10x faster than offloading". The model here is the random llama-250m
(16 blocks, 1.08 GB in float32; or ``--model PATH``) and the budget 512 MiB (``--budget``). Both sides get the
same weights, dtype (float32), prompt, thread count and number of greedy tokens, in one run on this machine:

- **offloading**: transformers + accelerate, ``device_map="auto"``, ``max_memory={"cpu": budget}``,
  ``offload_folder=...``: the blocks that do not fit are read from disk at every token. Measured twice: with
  the weights file in the OS page cache (warm: RAM outside the budget serves the "disk"), and with the file
  evicted from the page cache before every token (``posix_fadvise(DONTNEED)``, cold: what a machine whose
  RAM is the budget does). This machine's virtual disk may itself be cached by its host, so even "cold" can be
  faster than a real disk.
- **Corolla**: ``corolla server --max-memory budget`` processes, each holding the blocks that fit its budget
  next to its attention cache and activations (the server's own memory plan decides), as many as cover the
  model; the client holds the embeddings and the LM head. All run on this one machine, so this measures what
  a swarm of volunteers each under the budget gives, minus real network latency.

Prints time to first token, decode tokens/s, Corolla/offloading ratios, and whether every side produced
the same tokens; asserts nothing. Every server is stopped on exit, Ctrl-C or SIGTERM.

    python benchmarks/offloading.py [--budget 512MiB] [--new-tokens 16] [--threads 1] [--model PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - first: the thread environment before torch
import psutil
import torch
from _common import TokenClock, llama_250m, load_average, prompt_ids, stop_on_sigterm
from transformers import AutoConfig, AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.config import ServerConfig, format_size, parse_size
from corolla.engine.server.memory import server_memory_plan

logger = logging.getLogger("offloading")

# Server limits sized for one short session, so that the budget goes to blocks (the defaults plan for 8k-token
# chunks and 64k tokens in flight, hundreds of MiB of activations).
SERVER_LIMITS = {"max_length": 1024, "max_chunk_tokens": 256, "max_tokens_in_flight": 1024, "cache_bytes": 32 * 2**20}


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the OS page cache (pages mapped by a process stay)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rss() -> int:
    """This process's resident memory in bytes."""
    return int(psutil.Process().memory_info().rss)


def measure_offloading(path: Path, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Warm and cold offloaded decoding; the device map and the tokens."""
    folder = Path(tempfile.mkdtemp(prefix="corolla-offload-"))
    try:
        began = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="auto", max_memory={"cpu": args.budget}, offload_folder=folder
        ).eval()
        load_s = time.perf_counter() - began
        where = dict(getattr(model, "hf_device_map", {}))
        on_disk = [name for name, device in where.items() if device == "disk"]
        if not on_disk:
            raise SystemExit(f"the model fits {format_size(args.budget)}: nothing was offloaded; lower --budget")
        # What accelerate reads at every token: the checkpoint's own safetensors files, or its offload folder.
        files = [*path.glob("*.safetensors"), *(p for p in folder.rglob("*") if p.is_file())]

        def generate(clock: TokenClock, n: int) -> None:
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, eos_token_id=None)

        generate(TokenClock(), 1)  # warm-up
        warm = TokenClock()
        generate(warm, args.new_tokens)
        evict(files)
        cold = TokenClock(on_token=lambda: evict(files))
        generate(cold, args.new_tokens)
        return {"load_s": load_s, "map": where, "on_disk": on_disk, "warm": warm, "cold": cold, "rss": rss()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def server_spans(path: Path, args: argparse.Namespace) -> tuple[list[str], str]:
    """Spans covering the model, each as large as one server's memory plan allows under the budget."""
    config = AutoConfig.from_pretrained(path)
    cfg = ServerConfig(model=str(path), max_memory=args.budget, **SERVER_LIMITS)  # type: ignore[arg-type]
    plan = server_memory_plan(config, cfg, torch.float32, "none")
    total = int(config.num_hidden_layers)
    count = math.ceil(total / plan.num_blocks)
    bounds = [round(i * total / count) for i in range(count + 1)]  # even spans, none above the plan's size
    spans = [f"{a}:{b}" for a, b in itertools.pairwise(bounds)]
    widest = max(spans, key=lambda s: int(s.split(":")[1]) - int(s.split(":")[0]))
    served = server_memory_plan(config, dataclasses.replace(cfg, blocks=widest), torch.float32, "none")
    return spans, served.describe()


def measure_corolla(path: Path, ids: torch.Tensor, spans: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Decoding through a loopback swarm whose servers each stay under the budget."""
    flags = ["--max-memory", str(args.budget)]
    for name, value in SERVER_LIMITS.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    flags += ["--max-tokens-in-flight-per-peer", str(SERVER_LIMITS["max_tokens_in_flight"])]
    began = time.perf_counter()
    with Swarm(path, spans=spans, threads=args.threads, extra_args=flags, start_timeout=600) as swarm:
        start_s = time.perf_counter() - began
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, stall_timeout=args.stall_timeout
        )
        try:

            def generate(clock: TokenClock, n: int) -> None:
                model.generate(ids, max_new_tokens=n, streamer=clock, eos_token_id=[])

            generate(TokenClock(), 1)  # warm-up
            clock = TokenClock()
            generate(clock, args.new_tokens)
            servers = [psutil.Process(s.pid).memory_info().rss for s in swarm.servers]
            return {"start_s": start_s, "clock": clock, "server_rss": servers, "client_rss": rss()}
        finally:
            model.close()


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: random llama-250m)")
    parser.add_argument("--budget", type=parse_size, default=512 * 2**20, help="memory budget, e.g. 512MiB")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: offloading process, each server")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="client stall timeout, s (loaded CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("corolla").setLevel(logging.WARNING)
    stop_on_sigterm()
    torch.set_num_threads(args.threads)
    path = args.model or llama_250m()
    ids = prompt_ids(path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    spans, plan = server_spans(path, args)
    print(f"start: {load_average()}")
    logger.info("offloading: loading %s under %s", path.name, format_size(args.budget))
    off = measure_offloading(path, ids, args)
    gc.collect()
    logger.info("corolla: starting %d servers (%s)", len(spans), " ".join(spans))
    swarm = measure_corolla(path, ids, spans, args)

    warm: TokenClock = off["warm"]
    cold: TokenClock = off["cold"]
    ours: TokenClock = swarm["clock"]
    in_ram = sum(1 for d in off["map"].values() if d == "cpu")
    print(
        f"model: {path.name}, {mib(weights)} of float32 weights; budget {mib(args.budget)}; prompt {ids.shape[1]} "
        f"tokens, {args.new_tokens} greedy tokens, {args.threads} thread(s) per process; end: {load_average()}"
    )
    print(
        f"offloading: {in_ram} modules in RAM, {len(off['on_disk'])} on disk ({', '.join(off['on_disk'][:2])}, ...); "
        f"loaded in {off['load_s']:.1f} s; process RSS after decoding {mib(off['rss'])}"
    )
    rss_text = ", ".join(mib(r) for r in swarm["server_rss"])
    print(
        f"corolla: {len(spans)} servers ({' '.join(spans)}) on this machine, the largest planned as: {plan}; started in "
        f"{swarm['start_s']:.1f} s; server RSS {rss_text} (with the Python/torch runtime)"
    )
    print(f"{'':32}{'first token':>12}{'tokens/s':>10}{'corolla / this':>16}")
    rows = [("offloading, page cache warm", warm), ("offloading, evicted every token", cold), ("corolla", ours)]
    for name, clock in rows:
        print(f"{name:32}{clock.ttft:>11.2f}s{clock.decode_tps:>10.2f}{ours.decode_tps / clock.decode_tps:>16.2f}")
    same = warm.tokens == cold.tokens == ours.tokens
    print(f"same tokens on every side: {'yes' if same else 'NO'} ({len(ours.tokens)} tokens)")
    if not same:
        print(f"  offloading {warm.tokens}\n  cold       {cold.tokens}\n  corolla    {ours.tokens}")
    print(
        f"corolla decodes {ours.decode_tps / warm.decode_tps:.1f}x faster than warm offloading and "
        f"{ours.decode_tps / cold.decode_tps:.1f}x faster than cold; first token {warm.ttft / ours.ttft:.1f}x and "
        f"{cold.ttft / ours.ttft:.1f}x sooner"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None

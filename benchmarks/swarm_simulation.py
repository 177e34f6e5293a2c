"""Simulate a churning swarm to measure block placement and route planning.

    python benchmarks/swarm_simulation.py [--servers 1000 --blocks 80 --steps 200 --seed 0]

Model. Servers are heterogeneous: a GPU memory size drawn from a fixed mix sets how many
consecutive blocks each can hold, and a lognormal draw sets its throughput (tokens/s per block,
as announced in its DHT record). The swarm boots with ``--servers`` servers joining one by one,
then runs ``--steps`` steps of churn: every server has an exponential lifetime (mean
``--mean-lifetime`` steps) and new ones arrive as a Poisson stream that keeps the population
around ``--servers``. A joining server picks its blocks with ``choose_best_start`` (what
``choose_best_blocks`` does, on an array kept up to date here) and serves them after
``--load-steps`` steps of loading; while loading it counts for placement (it announces JOINING)
but not for serving. Each step every online server re-checks its placement with probability
``1 / --check-every`` using ``better_start`` (what ``should_choose_other_blocks`` does by
default); a server that moves reloads, so it stops serving for ``--load-steps`` steps.

Figures, measured twice a step (right after departures, the worst moment, and at step end):

* coverage: share of instants with every block served by some online server, and the lowest
  share of blocks served at any instant;
* swarm throughput: the bottleneck, ``min over blocks of the summed throughput of the online
  servers hosting the block``: the tokens/s a perfectly load-balanced pipeline can push through
  every block. Its upper bound is ``sum over online servers of throughput x span length / blocks``,
  the bottleneck if every server's capacity were spread evenly over the model, which no whole-
  window placement can beat. Reported as the time-average of bottleneck / bound, and its minimum;
* route planning: wall time of ``spans_from_records`` (1,000 servers' DHT records) and of
  ``plan_inference_route`` over the whole model, median and p95.

``--outage-step N`` adds a correlated failure: at step N every server hosting block 0 leaves.

Two baselines run on the same draws: the same joins without moves, and random placement.
A small swarm (``--small-servers``) is also run, where coverage is actually at risk.
Prints figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import MissingBlocksError
from corolla.engine.routing.planner import plan_inference_route
from corolla.engine.routing.spans import spans_from_records
from corolla.engine.server.block_selection import better_start, choose_best_start

GPU_MEMORY_GB = np.array([8, 12, 16, 24, 40, 80])
GPU_SHARE = np.array([0.25, 0.15, 0.20, 0.25, 0.10, 0.05])
MODEL_GB = 72.0  # all blocks together (a 70B model in 8 bits); a block is MODEL_GB / blocks
USABLE_MEMORY = 0.85  # the rest is activations and attention cache

TARGET_COVERAGE = 0.999
TARGET_THROUGHPUT = 0.90
TARGET_PLAN_MS = 50.0


@dataclass
class Swarm:
    """Array state of every server that ever joined (index = server number)."""

    num_blocks: int
    start: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    speed: list[float] = field(default_factory=list)  # announced throughput, tokens/s per block
    rps: list[float] = field(default_factory=list)  # single-token steps/s per block
    rtt: list[float] = field(default_factory=list)  # seconds, as the client would measure
    cache: list[int] = field(default_factory=list)  # free attention cache, tokens
    online_at: list[int] = field(default_factory=list)  # step from which it serves
    alive: set[int] = field(default_factory=set)

    def per_block(self, online_only: bool, step: int, skip: int = -1) -> np.ndarray:
        """Summed throughput per block of alive servers (only those serving if ``online_only``)."""
        diff = np.zeros(self.num_blocks + 1)
        for i in self.alive:
            if i == skip or (online_only and self.online_at[i] > step):
                continue
            diff[self.start[i]] += self.speed[i]
            diff[self.start[i] + self.length[i]] -= self.speed[i]
        return np.maximum(np.cumsum(diff[:-1]), 0.0)

    def bound(self, step: int) -> float:
        """Throughput bound: all online capacity spread evenly over the blocks."""
        online = [i for i in self.alive if self.online_at[i] <= step]
        return sum(self.speed[i] * self.length[i] for i in online) / self.num_blocks


@dataclass
class Result:
    """Figures of one run."""

    covered: list[bool] = field(default_factory=list)
    covered_share: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    population: list[int] = field(default_factory=list)
    moves: int = 0
    joins: int = 0
    leaves: int = 0
    spans_ms: list[float] = field(default_factory=list)
    plan_ms: list[float] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    no_route: int = 0  # plans that failed with MissingBlocksError


Placer = Callable[[np.ndarray, int, float, np.random.Generator], int]


def place_best(per_block: np.ndarray, length: int, speed: float, rng: np.random.Generator) -> int:
    return choose_best_start(per_block, length, speed)


def place_random(per_block: np.ndarray, length: int, speed: float, rng: np.random.Generator) -> int:
    return int(rng.integers(0, len(per_block) - length + 1))


def new_server(swarm: Swarm, draws: np.random.Generator) -> tuple[int, float]:
    """Draw a server's hardware; returns its span length and throughput (placement comes later)."""
    memory = float(draws.choice(GPU_MEMORY_GB, p=GPU_SHARE))
    block_gb = MODEL_GB / swarm.num_blocks
    length = int(min(max(math.floor(memory * USABLE_MEMORY / block_gb), 1), swarm.num_blocks))
    speed = float(draws.lognormal(math.log(100.0), 0.7))
    swarm.rps.append(float(draws.lognormal(math.log(30.0), 0.5)))
    swarm.rtt.append(float(draws.lognormal(math.log(0.05), 0.6)))
    swarm.cache.append(int(draws.choice([0, 2_000, 20_000, 200_000], p=[0.05, 0.15, 0.4, 0.4])))
    return length, speed


def join(
    swarm: Swarm,
    draws: np.random.Generator,
    placer: Placer,
    picks: np.random.Generator,
    step: int,
    load_steps: int,
) -> None:
    length, speed = new_server(swarm, draws)
    start = placer(swarm.per_block(online_only=False, step=step), length, speed, picks)
    swarm.start.append(start)
    swarm.length.append(length)
    swarm.speed.append(speed)
    swarm.online_at.append(step + load_steps)
    swarm.alive.add(len(swarm.start) - 1)


def measure(swarm: Swarm, step: int, result: Result) -> None:
    serving = swarm.per_block(online_only=True, step=step)
    bound = swarm.bound(step)
    result.covered.append(bool((serving > 0).all()))
    result.covered_share.append(float((serving > 0).mean()))
    result.ratio.append(float(serving.min()) / bound if bound > 0 else 0.0)
    result.population.append(len(swarm.alive))


def time_planning(swarm: Swarm, step: int, result: Result, repeats: int) -> None:
    """Build DHT-shaped records for the online servers, then time decoding them and planning."""
    records_by_block: dict[int, dict[str, ServerRecord]] = {b: {} for b in range(swarm.num_blocks)}
    rtt: dict[str, float] = {}
    for i in sorted(swarm.alive):
        if swarm.online_at[i] > step:
            continue
        peer = f"peer{i:06d}"
        start, end = swarm.start[i], swarm.start[i] + swarm.length[i]
        rec = ServerRecord(
            state=ServerState.ONLINE,
            start=start,
            end=end,
            throughput=swarm.speed[i],
            inference_rps=swarm.rps[i],
            cache_tokens_left=swarm.cache[i],
        )
        for block in range(start, end):
            records_by_block[block][peer] = rec
        rtt[peer] = swarm.rtt[i]
    for _ in range(repeats):
        began = time.perf_counter()
        spans = spans_from_records(records_by_block, num_blocks=swarm.num_blocks)
        decoded = time.perf_counter()
        try:
            route = plan_inference_route(spans, 0, swarm.num_blocks, rtt=rtt, cache_tokens_needed=4_096)
        except MissingBlocksError:
            result.no_route += 1
            continue
        planned = time.perf_counter()
        result.spans_ms.append((decoded - began) * 1e3)
        result.plan_ms.append((planned - decoded) * 1e3)
        result.hops.append(len(route))


def run(args: argparse.Namespace, servers: int, placer: Placer, moves: bool, timing: bool) -> tuple[Result, float]:
    """One simulation; returns its figures and the final bottleneck in tokens/s."""
    draws = np.random.default_rng(args.seed)  # same hardware and churn draws for every policy
    churn = np.random.default_rng(args.seed + 1)
    picks = np.random.default_rng(args.seed + 2)  # used by random placement only
    checks = np.random.default_rng(args.seed + 3)  # used by re-checks only
    swarm = Swarm(num_blocks=args.blocks)
    result = Result()
    for _ in range(servers):
        join(swarm, draws, placer, picks, step=-args.load_steps, load_steps=args.load_steps)
    p_leave = 1.0 - math.exp(-1.0 / args.mean_lifetime)
    arrivals = servers / args.mean_lifetime
    for step in range(args.steps):
        leaving = [i for i in sorted(swarm.alive) if churn.random() < p_leave]
        if step == args.outage_step:  # every server hosting block 0 drops out at once
            leaving += [i for i in sorted(swarm.alive) if swarm.start[i] == 0 and i not in leaving]
        swarm.alive.difference_update(leaving)
        result.leaves += len(leaving)
        measure(swarm, step, result)
        for _ in range(int(churn.poisson(arrivals))):
            join(swarm, draws, placer, picks, step, args.load_steps)
            result.joins += 1
        if moves:
            for i in sorted(swarm.alive):
                if swarm.online_at[i] > step or checks.random() >= 1.0 / args.check_every:
                    continue
                others = swarm.per_block(online_only=False, step=step, skip=i)
                target = better_start(others, swarm.start[i], swarm.length[i], swarm.speed[i], 0.75)
                if target is not None:
                    swarm.start[i] = target
                    swarm.online_at[i] = step + args.load_steps
                    result.moves += 1
        measure(swarm, step, result)
        if timing and step % args.plan_every == 0:
            time_planning(swarm, step, result, repeats=3)
    return result, float(swarm.per_block(online_only=True, step=args.steps).min())


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(name: str, result: Result, bottleneck: float) -> None:
    coverage = sum(result.covered) / len(result.covered)
    ratio = statistics.fmean(result.ratio)
    print(f"  {name}")
    print(
        f"    population {min(result.population)}..{max(result.population)} servers; "
        f"{result.joins} joins, {result.leaves} leaves, {result.moves} moves"
    )
    print(
        f"    coverage: every block served at {coverage:.2%} of instants "
        f"(target >= {TARGET_COVERAGE:.1%}: {verdict(coverage >= TARGET_COVERAGE)}); "
        f"lowest share of blocks served {min(result.covered_share):.1%}"
    )
    print(
        f"    throughput: bottleneck / bound {ratio:.1%} on average, {min(result.ratio):.1%} at worst, "
        f"p5 {pct(result.ratio, 5):.1%} (target >= {TARGET_THROUGHPUT:.0%} on average: "
        f"{verdict(ratio >= TARGET_THROUGHPUT)}); final bottleneck {bottleneck:,.0f} tokens/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=1000, help="target population")
    parser.add_argument("--blocks", type=int, default=80, help="blocks in the model")
    parser.add_argument("--steps", type=int, default=200, help="churn steps (think of one as a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-lifetime", type=float, default=100.0, help="mean server lifetime, in steps")
    parser.add_argument("--check-every", type=float, default=10.0, help="mean steps between re-checks")
    parser.add_argument("--load-steps", type=int, default=1, help="steps a joining or moving server loads")
    parser.add_argument("--plan-every", type=int, default=10, help="steps between planning measurements")
    parser.add_argument("--outage-step", type=int, default=-1, help="step at which every server hosting block 0 leaves")
    parser.add_argument("--small-servers", type=int, default=40, help="population of the small swarm (0: skip)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the no-move and random runs")
    args = parser.parse_args()

    began = time.perf_counter()
    print(
        f"swarm simulation: {args.servers} servers, {args.blocks} blocks, {args.steps} steps, "
        f"mean lifetime {args.mean_lifetime:g} steps, re-check every {args.check_every:g} steps, "
        f"seed {args.seed}" + (f", outage of block 0 at step {args.outage_step}" if args.outage_step >= 0 else "")
    )
    print("  bound = sum(throughput x span length of online servers) / blocks")
    result, bottleneck = run(args, args.servers, place_best, moves=True, timing=True)
    report("choose_best_blocks + should_choose_other_blocks", result, bottleneck)
    if not args.no_baselines:
        for name, placer, moves in (("choose_best_blocks, never moving", place_best, False),):
            other, final = run(args, args.servers, placer, moves=moves, timing=False)
            report(name, other, final)
        other, final = run(args, args.servers, place_random, moves=False, timing=False)
        report("random placement (baseline)", other, final)
    median = statistics.median(result.plan_ms)
    p95 = pct(result.plan_ms, 95)
    print(
        f"  route planning over {args.blocks} blocks, about {args.servers} servers "
        f"({len(result.plan_ms)} plans): plan_inference_route median {median:.1f} ms, p95 {p95:.1f} ms "
        f"(target < {TARGET_PLAN_MS:.0f} ms: {verdict(p95 < TARGET_PLAN_MS)}); "
        f"{statistics.fmean(result.hops):.1f} hops on average; {result.no_route} found blocks missing"
    )
    print(
        f"    spans_from_records on the same records: median {statistics.median(result.spans_ms):.1f} ms, "
        f"p95 {pct(result.spans_ms, 95):.1f} ms"
    )
    if args.small_servers > 0:
        print(f"small swarm: {args.small_servers} servers, same model and churn")
        small, final = run(args, args.small_servers, place_best, moves=True, timing=False)
        report("choose_best_blocks + should_choose_other_blocks", small, final)
        if not args.no_baselines:
            other, final = run(args, args.small_servers, place_random, moves=False, timing=False)
            report("random placement (baseline)", other, final)
    print(f"done in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()

"""Simulate a churning swarm to measure block placement and route planning.

    python benchmarks/swarm_simulation.py [--servers 1000 --blocks 80 --steps 200 --seed 0]
                                          [--part all|placement|adversaries --generations 1000]

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

Adversaries and internet churn (``--part adversaries``; ``--adversaries 0.05``): in a swarm of
``--servers`` servers, that share are liars (they serve, announce 1e6 tokens/s and answer wrong
outputs on ``--lie-rate`` of their steps, each liar its own wrong output) or fake records (1e9 tokens/s,
nobody behind them); one server of any kind leaves every simulated second and a new one joins. One
client runs ``--generations`` generations of ``--gen-tokens`` tokens with the client's own pure functions:
``plan_inference_route`` with claims capped by its measurements, probing (fakes never answer),
``should_verify`` / ``settled`` / ``judge`` for spot checks with ``ClientConfig``'s defaults, and
``ban_seconds`` for bans. Printed: the share of generations that complete with honest output
(target >= 99.9%), how many accepted a lie or failed, and the liars caught.

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

from corolla.engine.config import ClientConfig
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import MissingBlocksError
from corolla.engine.routing.planner import RouteHop, plan_inference_route
from corolla.engine.routing.spans import RemoteSpan, spans_from_records
from corolla.engine.routing.trust import (
    MAX_OPINIONS,
    Judgement,
    Opinion,
    Verdict,
    ban_seconds,
    judge,
    settled,
    should_verify,
)
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


# ---- adversaries and internet churn ---------------------------------------------------------------
# The client's own pure functions decide everything below: plan_inference_route (with claims capped by
# measurements), should_verify, settled/judge (spot checks), ban_seconds (bans). Only the network is
# simulated: who answers, what each server outputs, how long it takes.

HONEST, LIAR, FAKE = "honest", "liar", "fake"
TARGET_HONEST = 0.999
CLIENT = ClientConfig()


@dataclass
class SimClient:
    """The state a client keeps across generations (what SequenceManager holds)."""

    bans: dict[str, tuple[float, int]] = field(default_factory=dict)  # peer -> (until, strikes)
    rtt: dict[str, float] = field(default_factory=dict)
    block_s: dict[str, float] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    convicted: set[str] = field(default_factory=set)

    def banned(self, now: float) -> set[str]:
        return {p for p, (until, _) in self.bans.items() if until > now}

    def ban(self, peer: str, now: float) -> None:
        strikes = self.bans[peer][1] + 1 if peer in self.bans else 1
        self.bans[peer] = (now + ban_seconds(strikes, CLIENT.min_backoff, CLIENT.max_backoff), strikes)

    def convict(self, peer: str, now: float) -> None:
        self.bans[peer] = (now + CLIENT.liar_ban, 32)
        self.convicted.add(peer)


@dataclass
class World:
    """Servers (as in the placement simulation) with a kind each, the spans clients see, and a clock."""

    swarm: Swarm
    kind: list[str] = field(default_factory=list)
    spans: dict[str, RemoteSpan] = field(default_factory=dict)
    now: float = 0.0
    next_leave: float = 1.0
    leaves: int = 0


def _peer(i: int) -> str:
    return f"peer{i:06d}"


def _index(peer: str) -> int:
    return int(peer[4:])


def _record(world: World, i: int) -> ServerRecord:
    s = world.swarm
    if world.kind[i] == HONEST:
        speed, rps, cache = s.speed[i], s.rps[i], s.cache[i]
    else:  # liars and fakes claim to be the fastest servers of the swarm, with room for everyone
        speed, rps, cache = (1e6, 1e6, 10**6) if world.kind[i] == LIAR else (1e9, 1e9, 10**6)
    end = s.start[i] + s.length[i]
    return ServerRecord(
        state=ServerState.ONLINE,
        start=s.start[i],
        end=end,
        throughput=speed,
        inference_rps=rps,
        cache_tokens_left=cache,
    )


def _join(world: World, draws: np.random.Generator, kinds: np.random.Generator, adversaries: float) -> None:
    join(world.swarm, draws, place_best, draws, step=-1, load_steps=0)
    i = len(world.swarm.start) - 1
    roll = kinds.random()
    world.kind.append(HONEST if roll >= adversaries else (LIAR if roll < adversaries / 2 else FAKE))
    rec = _record(world, i)
    world.spans[_peer(i)] = RemoteSpan(_peer(i), rec.start, rec.end, rec)


def _advance(world: World, seconds: float, draws: np.random.Generator, kinds: np.random.Generator, adv: float) -> None:
    """Move the clock; one server (any kind) leaves every second and a new one joins."""
    world.now += seconds
    while world.now >= world.next_leave:
        world.next_leave += 1.0
        alive = sorted(world.swarm.alive)
        gone = alive[int(kinds.integers(len(alive)))]
        world.swarm.alive.discard(gone)
        world.spans.pop(_peer(gone), None)
        world.leaves += 1
        _join(world, draws, kinds, adv)


def _alive(world: World, peer: str) -> bool:
    return _index(peer) in world.swarm.alive


def _plan(world: World, client: SimClient, start: int, end: int, exclude: set[str]) -> list[RouteHop] | None:
    """What client/opening.open_route does: plan, probe the route's servers (fakes never answer), re-plan without them."""
    exclude = set(exclude)
    while True:
        try:
            route = plan_inference_route(
                world.spans,
                start,
                end,
                rtt=client.rtt,
                banned=client.banned(world.now) | exclude,
                cache_tokens_needed=1_024,
                measured_block_s=client.block_s,
            )
        except MissingBlocksError:
            return None
        bad = [h.peer_id for h in route if world.kind[_index(h.peer_id)] == FAKE or not _alive(world, h.peer_id)]
        if not bad:
            return route
        for peer in bad:
            client.ban(peer, world.now)
            exclude.add(peer)


def _lies(world: World, peer: str, rng: np.random.Generator, lie_rate: float) -> bool:
    return world.kind[_index(peer)] == LIAR and rng.random() < lie_rate


def _spot_check(
    world: World,
    client: SimClient,
    hop: RouteHop,
    lied: bool,
    avoid: set[str],
    rng: np.random.Generator,
    lie_rate: float,
) -> Judgement:
    """What spot_check does, with each liar's output distinct and every honest route's output the truth."""
    fresh = iter(range(1, 10**9))
    opinions = [Opinion((hop.peer_id,), next(fresh) if lied else 0)]
    used = {hop.peer_id, *avoid}
    while not settled(opinions) and len(opinions) < MAX_OPINIONS:
        try:
            route = plan_inference_route(
                world.spans,
                hop.start,
                hop.end,
                rtt=client.rtt,
                banned=client.banned(world.now) | used,
                measured_block_s=client.block_s,
            )
        except MissingBlocksError:
            break
        peers = tuple(h.peer_id for h in route)
        used.update(peers)
        dead = [p for p in peers if world.kind[_index(p)] == FAKE or not _alive(world, p)]
        if dead:
            client.ban(dead[0], world.now)
            continue
        wrong = any(_lies(world, p, rng, lie_rate) for p in peers)
        opinions.append(Opinion(peers, next(fresh) if wrong else 0))
    return judge(opinions)


def _hop_seconds(world: World, client: SimClient, hop: RouteHop) -> float:
    i = _index(hop.peer_id)
    return world.swarm.rtt[i] + hop.length / world.swarm.rps[i]


def generation(
    world: World,
    client: SimClient,
    tokens: int,
    rng: np.random.Generator,
    draws: np.random.Generator,
    kinds: np.random.Generator,
    args: argparse.Namespace,
    tally: dict[str, int],
) -> str:
    """One generation of ``tokens`` steps; returns "honest", "wrong" or "failed"."""
    avoid: set[str] = set()
    route = _plan(world, client, 0, world.swarm.num_blocks, avoid)
    if route is None:
        return "failed"
    honest = True
    for _ in range(tokens):
        i = 0
        while i < len(route):
            hop = route[i]
            _advance(world, _hop_seconds(world, client, hop), draws, kinds, args.adversaries)
            if not _alive(world, hop.peer_id):  # left mid-generation: failover of this hop
                client.ban(hop.peer_id, world.now)
                new = _plan(world, client, hop.start, hop.end, {hop.peer_id, *avoid})
                if new is None:
                    return "failed"
                route[i : i + 1] = new
                tally["failovers"] += 1
                continue
            peer, idx = hop.peer_id, _index(hop.peer_id)
            old = client.rtt.get(peer)
            seconds = _hop_seconds(world, client, hop)
            client.rtt[peer] = seconds if old is None else 0.8 * old + 0.2 * seconds
            client.block_s[peer] = 1.0 / world.swarm.rps[idx]
            lied = _lies(world, peer, rng, args.lie_rate)
            draw = float(rng.random())
            if should_verify(
                client.checked.get(peer, 0), first_steps=CLIENT.verify_first_steps, rate=CLIENT.verify_rate, draw=draw
            ):
                tally["checks"] += 1
                verdict = _spot_check(world, client, hop, lied, avoid, rng, args.lie_rate)
                avoid.update(verdict.liars, verdict.suspects)
                for liar in verdict.liars:
                    if liar not in client.convicted:
                        tally["caught"] += 1
                        tally["false_convictions"] += world.kind[_index(liar)] != LIAR
                    client.convict(liar, world.now)
                if verdict.verdict is Verdict.AGREE:
                    client.checked[peer] = client.checked.get(peer, 0) + 1
                if verdict.verdict not in (Verdict.AGREE, Verdict.UNVERIFIED):
                    new = _plan(world, client, hop.start, hop.end, {peer, *avoid})
                    if new is None:
                        return "failed"
                    route[i : i + 1] = new
                    continue
            honest = honest and not lied
            i += 1
    return "honest" if honest else "wrong"


def adversarial_run(args: argparse.Namespace) -> None:
    draws = np.random.default_rng(args.seed + 10)
    kinds = np.random.default_rng(args.seed + 11)
    rng = np.random.default_rng(args.seed + 12)
    world = World(Swarm(num_blocks=args.blocks))
    for _ in range(args.servers):
        _join(world, draws, kinds, args.adversaries)
    client = SimClient()
    tally = {"honest": 0, "wrong": 0, "failed": 0, "checks": 0, "caught": 0, "false_convictions": 0, "failovers": 0}
    began = time.perf_counter()
    for _ in range(args.generations):
        tally[generation(world, client, args.gen_tokens, rng, draws, kinds, args, tally)] += 1
    share = tally["honest"] / args.generations
    bad = sum(world.kind[i] != HONEST for i in world.swarm.alive)
    print(
        f"adversaries: {args.servers} servers, {args.adversaries:.0%} of them liars (lying on {args.lie_rate:.0%} of "
        f"steps) or fake records, one server leaving every second ({world.leaves} left in {world.now:,.0f} s); "
        f"{bad} adversaries online at the end"
    )
    print(
        f"  {args.generations} generations of {args.gen_tokens} tokens by one client (verify_rate "
        f"{CLIENT.verify_rate:g}, first {CLIENT.verify_first_steps} steps of each new server): "
        f"{share:.2%} complete with honest output (target >= {TARGET_HONEST:.1%}: {verdict(share >= TARGET_HONEST)}); "
        f"{tally['wrong']} accepted a lie, {tally['failed']} failed"
    )
    print(
        f"  {tally['checks']} spot checks, {tally['caught']} liars caught ({tally['false_convictions']} honest servers "
        f"convicted), {tally['failovers']} failovers; {time.perf_counter() - began:.1f} s"
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
    parser.add_argument("--part", choices=["all", "placement", "adversaries"], default="all")
    parser.add_argument("--adversaries", type=float, default=0.05, help="share of servers that lie or are fake")
    parser.add_argument("--lie-rate", type=float, default=1.0, help="share of steps on which a liar lies")
    parser.add_argument("--generations", type=int, default=1000, help="generations run in the adversarial swarm")
    parser.add_argument("--gen-tokens", type=int, default=16, help="tokens of each generation")
    args = parser.parse_args()
    if args.part in ("all", "adversaries"):
        adversarial_run(args)
    if args.part == "adversaries":
        return

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

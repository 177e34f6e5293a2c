"""Audits against liars: catch rates, false positives of honest recomputation, and the cost in tokens/s.

Three parts (``--part``):

* ``schedule``: a pure simulation of the client's audit schedule (``corolla.engine.routing.trust``:
  ``audit_due``, ``choose_auditor``) over ``--runs`` runs per scenario: a liar lying on a share of its steps
  (10%, 2%), from its first step or only after each session's first 3, alone or with a colluder in its address
  group next to one honest replica. A run is *caught within 50* when the first audit of the liar that covers
  its first lie comes at most 50 of the liar's steps after that lie (the lie's own step counted as 1). The
  spot-check schedule this replaces (only the checked step recomputed, any replica) is simulated for contrast.
* ``tolerance``: honest recomputation must never look like a lie. A tiny Llama (``--model smollm2``: SmolLM2's
  trained weights, whose hidden states have massive-activation dimensions) decodes sequences step by step with
  its attention cache (what a server answers) and the same sequences go through one stateless forward (what an
  auditor recomputes); each step's output is compared with ``outputs_agree`` at the dtype's tolerance, in
  float32, bfloat16, float16 and int8 weights (``--quant int8`` servers; audits only compare servers of one
  quant), and so are four lies about it (random values of its spread, the attack servers' roll, x1.05, half an
  RMS added to one element). Distances are given relative to the position's RMS and to RMS + |value|.
* ``swarm``: real server processes in three address groups (127.0.1.1, 127.0.2.1, liar 127.0.3.1): tokens/s of
  a client with audits off and on (same swarm, alternating), in ``--sets`` sets of ``--rounds`` generations each
  (the cost per set, then its median and range), with what audits did: how many per 100 tokens, their seconds
  (they run in the background) and the seconds the generation waited for them; then ``--swarm-runs`` fresh
  clients each generating 50 tokens next to a liar lying on ``--lie-rate`` of its steps: caught, and text equal
  to transformers' greedy.

Run: ``.venv/bin/python benchmarks/verification.py`` (all parts; ``--part schedule`` alone takes seconds).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common
import torch

from corolla.engine.config import ClientConfig
from corolla.engine.routing.trust import audit_due, choose_auditor, should_verify

WITHIN = 50  # liar steps after its first lie
HORIZON = 2000  # liar steps simulated at most per run


@dataclass(frozen=True)
class Scenario:
    name: str
    lie_rate: float  # share of the liar's steps that lie
    wait: int  # steps of each session the liar is honest on
    colluder: bool  # a second liar in the same address group (same lie), next to one honest replica


def simulate_audits(s: Scenario, rng: random.Random, config: ClientConfig, gen_steps: int) -> int | None:
    """Liar steps from its first lie to the audit that catches it (None: not caught within HORIZON)."""
    groups = {"liar": "A", "colluder": "A", "honest": "B"}
    candidates = ["honest", "colluder"] if s.colluder else ["honest"]
    passed, unaudited, first_lie, lied = 0, 0, None, False
    for step in range(1, HORIZON + 1):
        in_session = (step - 1) % gen_steps + 1
        if in_session > s.wait and rng.random() < s.lie_rate:
            lied = True
            first_lie = first_lie or step
        unaudited += 1
        end = in_session == gen_steps  # a generation ends audited
        due = end or audit_due(
            unaudited,
            passed=passed,
            first_steps=config.verify_first_steps,
            every=config.audit_every,
            rate=config.verify_rate,
            draw=rng.random(),
        )
        if not due:
            continue
        record = {"honest": passed, "colluder": passed}
        auditor = choose_auditor(candidates, record=record, groups=groups, exclude_groups={"A"}, rng=rng)
        if lied and auditor == "honest":  # the whole unaudited run is recomputed: any lie in it shows
            assert first_lie is not None
            return step - first_lie + 1
        if not lied:
            passed += 1
        unaudited = 0
    return None


def simulate_spot_checks(s: Scenario, rng: random.Random, first_steps: int, rate: float, gen_steps: int) -> int | None:
    """The replaced schedule: only the checked step is recomputed, by the fastest replica (the colluder, if any)."""
    checked, first_lie = 0, None
    for step in range(1, HORIZON + 1):
        in_session = (step - 1) % gen_steps + 1
        lie = in_session > s.wait and rng.random() < s.lie_rate
        if lie:
            first_lie = first_lie or step
        if should_verify(checked, first_steps=first_steps, rate=rate, draw=rng.random()):
            if lie and not s.colluder:
                assert first_lie is not None
                return step - first_lie + 1
            checked += 1
    return None


def schedule(args: argparse.Namespace) -> None:
    config = ClientConfig()
    scenarios = [
        Scenario("10% from the start", 0.10, 0, False),
        Scenario("2% from the start", 0.02, 0, False),
        Scenario("10% after 3 steps", 0.10, 3, False),
        Scenario("2% after 3 steps", 0.02, 3, False),
        Scenario("10%, colluding pair", 0.10, 0, True),
        Scenario("2% after 3, colluding pair", 0.02, 3, True),
    ]
    print(
        f"audit schedule: first {config.verify_first_steps} steps of a new server, then at most every "
        f"{config.audit_every} steps, at random {config.verify_rate:g}, and at each generation's end "
        f"({args.gen_steps} steps); {args.runs} runs each"
    )
    for s in scenarios:
        rng = random.Random(args.seed)
        new = [simulate_audits(s, rng, config, args.gen_steps) for _ in range(args.runs)]
        old = [simulate_spot_checks(s, rng, 2, 0.05, args.gen_steps) for _ in range(args.runs)]
        caught = [d for d in new if d is not None and d <= WITHIN]
        before = sum(d is not None and d <= WITHIN for d in old)
        mean = statistics.mean(caught) if caught else float("nan")
        print(
            f"  {s.name:28s} caught within {WITHIN}: audits {len(caught) / args.runs:7.2%} "
            f"(mean {mean:4.1f} steps after the first lie, max {max(caught, default=0)}); "
            f"old spot checks {before / args.runs:7.2%}"
        )


def _rms_distance(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """max |mine - ref| / RMS of the position's hidden state (what a tolerance relative to the RMS bounds)."""
    d, ref = (mine.float() - ref.float()).abs(), ref.float()
    return float((d / ref.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)).max())


def _scaled_distance(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """max over elements of |mine - ref| / (RMS of the position + |ref| of the element): rounding grows with each
    value's own magnitude, so an element of a model's massive-activation dimensions gets its own scale."""
    d, ref = (mine.float() - ref.float()).abs(), ref.float()
    return float((d / (ref.pow(2).mean(-1, keepdim=True).sqrt() + ref.abs()).clamp_min(1e-6)).max())


def _lies(ref: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Lies about an output ``ref`` [1, 1, hidden]: the attack servers' two, and two subtle ones."""
    ref = ref.float()
    rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
    one = ref.clone()
    one[..., 3] += 0.5 * rms[..., 0]
    return {
        "noise": torch.randn(ref.shape, generator=gen) * ref.std(),
        "roll": ref.roll(1, dims=-1),
        "x1.05": ref * 1.05,
        "+0.5 RMS on one": one,
    }


def tolerance(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from corolla.engine.apps.local_swarm import smollm2_checkpoint
    from corolla.engine.apps.tiny_models import make_tiny_checkpoint
    from corolla.engine.client.verify import outputs_agree
    from corolla.engine.client.verify import tolerance as dtype_tolerance
    from corolla.engine.models.quant import quantize_linears

    if args.model == "smollm2":
        path = smollm2_checkpoint()
    else:
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llama", "llama", seed=0)
    print(f"  model {args.model}; distances: 'rms' max |d| / RMS, 'scaled' max |d| / (RMS + |x|), per position")
    for name, dtype, quant in (
        ("float32", torch.float32, None),
        ("bfloat16", torch.bfloat16, None),
        ("float16", torch.float16, None),
        ("int8", torch.float32, "int8"),
    ):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if quant is not None:
            quantize_linears(model.model.layers, quant)
        model.model.norm = torch.nn.Identity()  # the last hidden state is the last block's output, as servers send
        tol = dtype_tolerance({str(dtype).removeprefix("torch.")})
        steps = bad = 0
        worst = {"rms": 0.0, "scaled": 0.0}
        nearest: dict[str, dict[str, float]] = {}  # lie -> distance -> smallest seen
        caught: dict[str, int] = {}
        gen = torch.Generator().manual_seed(args.seed)
        vocab = int(model.config.vocab_size)
        with torch.inference_mode():
            for _ in range(args.sequences):
                ids = torch.randint(0, vocab, (1, args.length), generator=gen)
                full = model(ids, output_hidden_states=True).hidden_states[-1]  # the auditor: one forward
                cache = None
                for t in range(args.length):
                    out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, output_hidden_states=True)
                    cache = out.past_key_values
                    mine = out.hidden_states[-1]
                    ref = full[:, t : t + 1]
                    steps += 1
                    bad += not outputs_agree(mine, ref, tol)
                    worst["rms"] = max(worst["rms"], _rms_distance(mine, ref))
                    worst["scaled"] = max(worst["scaled"], _scaled_distance(mine, ref))
                    if float(ref.float().abs().max()) == 0:  # an all-zero output: nothing to lie about
                        continue
                    for lie, told in _lies(mine, gen).items():
                        seen = nearest.setdefault(lie, {"rms": float("inf"), "scaled": float("inf")})
                        seen["rms"] = min(seen["rms"], _rms_distance(told, ref))
                        seen["scaled"] = min(seen["scaled"], _scaled_distance(told, ref))
                        caught[lie] = caught.get(lie, 0) + (not outputs_agree(told.to(ref.dtype), ref, tol))
        lies = "; ".join(
            f"{lie} {d['rms']:.2e} / {d['scaled']:.2e} (caught {caught[lie]})" for lie, d in nearest.items()
        )
        print(
            f"  {name:9s} {steps} checked steps, {bad} beyond tolerance {tol:g} (honest steps that would look like "
            f"lies); worst honest distance rms {worst['rms']:.2e}, scaled {worst['scaled']:.2e}; nearest lies "
            f"(rms / scaled): {lies}"
        )


def swarm(args: argparse.Namespace) -> None:
    from attack_servers import scheduled_liar
    from transformers import AutoModelForCausalLM

    from corolla.engine import DistributedModelForCausalLM
    from corolla.engine.apps.local_swarm import Swarm
    from corolla.engine.apps.tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llama", "llama", seed=0)
    ids = torch.randint(7, 150, (1, 8), generator=torch.Generator().manual_seed(args.seed))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def hf_greedy(ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, eos_token_id=[]
            )
        return out

    with Swarm(path, spans=[]) as swarm:
        for address in ("127.0.1.1", "127.0.2.1"):
            swarm.add_server("0:6", wait=False, extra_args=["--throughput", "50", "--host", address])
        swarm.wait_ready()
        off = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers, verify_rate=0.0)
        on = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            reference = hf_greedy(ids, args.tokens)
            on.generate(ids, max_new_tokens=4, eos_token_id=[])  # both servers' first audits
            print(
                f"  tokens/s, {args.tokens} tokens, {args.sets} sets x {args.rounds} rounds (audits off and on "
                "alternating), two honest servers in two groups:"
            )
            costs = []
            audits = seconds = waited = 0.0
            for n in range(args.sets):
                times: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(args.rounds):
                    for name, model in (("off", off), ("on", on)):
                        with model.inference_session(ids.shape[1] + args.tokens) as session:
                            start = time.perf_counter()
                            out = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[], session=session)
                            times[name].append(args.tokens / (time.perf_counter() - start))
                        assert torch.equal(out, reference), f"audits {name}: output changed"
                        if name == "on":
                            audits += session.checks
                            seconds += session.pending_audits.seconds
                            waited += session.pending_audits.waited
                t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
                costs.append(1 - t_on / t_off)
                print(
                    f"    set {n + 1}: audits off {t_off:.1f}, on {t_on:.1f} (cost {costs[-1]:.1%}); "
                    f"{_common.load_average()}"
                )
            generations = args.sets * args.rounds
            print(
                f"  cost of audits: median {statistics.median(costs):.1%}, range {min(costs):.1%} to {max(costs):.1%}; "
                f"{100 * audits / (generations * args.tokens):.1f} audits per 100 tokens, "
                f"{1000 * seconds / max(audits, 1):.1f} ms each in the background, the generation waited "
                f"{1000 * waited / generations:.1f} ms per generation ({waited / max(seconds, 1e-9):.0%} of their time)"
            )
        finally:
            off.close()
            on.close()
        if args.swarm_runs <= 0:
            return
        swarm.add_server(
            "0:6",
            wait=True,
            extra_args=["--throughput", "1e6", "--host", "127.0.3.1"],
            launcher=scheduled_liar(rate=args.lie_rate, seed=args.seed),
        )
        honest = caught = 0
        for run in range(args.swarm_runs):
            run_ids = torch.randint(7, 150, (1, 8), generator=torch.Generator().manual_seed(args.seed + run))
            fresh = DistributedModelForCausalLM.from_pretrained(
                str(path), initial_peers=swarm.initial_peers, report_file=str(Path(tempfile.mkdtemp()) / "r.jsonl")
            )
            try:
                with fresh.inference_session(8 + 50) as session:
                    out = fresh.generate(run_ids, max_new_tokens=50, eos_token_id=[], session=session)
                honest += torch.equal(out, hf_greedy(run_ids, 50))
                caught += bool(session.liars)
            finally:
                fresh.close()
        print(
            f"  real swarm, liar lying on {args.lie_rate:.0%} of its steps, {args.swarm_runs} fresh clients x 50 "
            f"tokens: caught {caught}/{args.swarm_runs}, text equal to transformers' greedy {honest}/{args.swarm_runs}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["schedule", "tolerance", "swarm", "all"], default="all")
    parser.add_argument("--runs", type=int, default=2000, help="simulated runs per scenario")
    parser.add_argument("--gen-steps", type=int, default=64, help="steps of one simulated generation")
    parser.add_argument("--sequences", type=int, default=50, help="sequences per dtype (tolerance)")
    parser.add_argument("--length", type=int, default=200, help="tokens per sequence (tolerance)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="checkpoint (tolerance)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per timed generation (swarm)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per setting and set (swarm)")
    parser.add_argument("--sets", type=int, default=3, help="sets of timed rounds, each giving a cost (swarm)")
    parser.add_argument("--lie-rate", type=float, default=0.1, help="share of the real liar's steps that lie (swarm)")
    parser.add_argument("--swarm-runs", type=int, default=5, help="fresh clients next to a real liar (swarm)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.part in ("schedule", "all"):
        schedule(args)
    if args.part in ("tolerance", "all"):
        print(f"honest recomputation, {args.sequences} sequences x {args.length} tokens per dtype:")
        tolerance(args)
    if args.part in ("swarm", "all"):
        print("real swarm:")
        swarm(args)


if __name__ == "__main__":
    main()

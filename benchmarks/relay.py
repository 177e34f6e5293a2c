"""Relayed vs direct: decode speed of a volunteer behind a NAT (served through a relay) against one on a public
address, through the same network namespaces, with a real WAN delay on every public leg.

Needs root. It makes network namespaces as tests/swarm/test_nat.py does (public hosts, a home host behind a
masquerading router with no port forwarded), but with ``Lab(wan_delay_ms=...)``: the public network routes
every packet between hosts through a userspace delaying router (tests/swarm/wan_delay.py, whole packets held
``--delay-ms`` each way, addresses untouched, so the relay's dial-back check still sees real sources). Server
a (public, blocks 0:N/2, the relay), b (public, N/2:N) and n (home, N/2:N, reached through a's relay circuit)
all run; the user u (public) opens one session per route, avoiding the other server of the second half
for each: direct u → a, u → b and relayed u → a, u → a → n, and alternates their steps, so both routes are
timed under the same load (this machine's varies a lot). In each set, for the added delay and for none, and
with and without forwarding; local transformers' decode once a set. Prints each set, then medians [min-max]
over the sets of each session's median ms/token, speed ratios, what relaying costs against the extra legs,
the machine and its load; asserts nothing.

Legs a token crosses (d one way each): classic (the client relays every hop) direct u→a→u, u→b→u = 4d,
relayed u→a→u, u→a→n→a→u = 6d; forwarding direct u→a→b→u = 3d, relayed u→a→n→a→u = 4d.

    sudo OMP_WAIT_POLICY=PASSIVE python benchmarks/relay.py [--delay-ms 25] [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "swarm"))  # the namespace lab of the NAT tests (a test helper)

from netns_lab import Lab, read_json_line, why_no_namespaces  # noqa: E402

from corolla.engine.apps.local_swarm import ServerProcess  # noqa: E402

PORT = 31337  # every host has its own address: one port for all
FAST = ["--throughput", "1000", "--announce-period", "2", "--record-ttl", "20", "--num-threads", "1"]
ROUTES = ("direct", "relayed")
MODES = {False: "classic", True: "forwarding"}
LEGS = {(False, "direct"): 4, (False, "relayed"): 6, (True, "direct"): 3, (True, "relayed"): 4}


def decode_both(model: Any, forwarding: bool, new: int, routes: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Greedy decode after a 16-token prompt in one session per route (``routes``: route → (server to use,
    server to avoid)), their steps alternating so both see the same load; the median ms of a step per route
    and the routes' peer ids."""
    prompt = torch.randint(7, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    steps: dict[str, list[float]] = {route: [] for route in routes}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        sessions, tokens = {}, {}
        for route, (use, avoid) in routes.items():  # a route is planned at its session's first step
            model.manager.mark_ok(use)
            model.manager.ban(avoid, "the benchmark measures the other route")
            session = stack.enter_context(model.inference_session(max_length=prompt.shape[1] + new + 1))
            session.use_forwarding(forwarding)
            hidden = session.step(model.head.embed(prompt))
            sessions[route], tokens[route] = session, model.head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
        for _ in range(new):
            for route, session in sessions.items():
                began = time.perf_counter()
                hidden = session.step(model.head.embed(tokens[route]))
                tokens[route] = model.head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
                steps[route].append(time.perf_counter() - began)
        hops = {route: [hop.stream.peer_id for hop in session.hops] for route, session in sessions.items()}
    return {"ms": {route: 1000 * statistics.median(times) for route, times in steps.items()}, "hops": hops}


def measure(path: str, peers: list[str]) -> None:
    """Run in the user's namespace: for each JSON line on stdin ``{"routes", "forwarding", "new"}``, print
    :func:`decode_both`'s answer as one JSON line; for ``{"local": true, "new"}``, ``{"ms"}``: the median ms of
    a step of local transformers' greedy decode of the same model (1 thread)."""
    from transformers import AutoModelForCausalLM

    from corolla.engine import DistributedModelForCausalLM

    torch.set_num_threads(1)
    model = DistributedModelForCausalLM.from_pretrained(
        path, initial_peers=peers, verify_rate=0.0, step_timeout=60.0, min_backoff=3600.0, max_backoff=3600.0
    )
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    try:
        for line in sys.stdin:
            ask = json.loads(line)
            if ask.get("local"):
                answer: dict[str, Any] = {"ms": local_step_ms(local, ask["new"])}
            else:
                answer = decode_both(model, ask["forwarding"], ask["new"], ask["routes"])
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        model.close()


def local_step_ms(model: Any, new: int) -> float:
    """The median ms of a step of local transformers' greedy decode after the same 16-token prompt."""
    prompt = torch.randint(7, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    clock = _common.TokenClock()
    with torch.inference_mode():
        model.generate(
            prompt, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, eos_token_id=[], streamer=clock
        )
    return 1000 * statistics.median(clock.steps())


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):3.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay added on every public leg")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="sets (each: both delays, both modes, both routes)")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # internal: PATH PEER... in the user's ns
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1:])
        return
    if reason := why_no_namespaces():
        raise SystemExit(f"cannot run: {reason}")
    _common.stop_on_sigterm()
    path = _common.llama_small()
    total = int(_common.LLAMA_SMALL["num_hidden_layers"])
    half, rest = f"0:{total // 2}", f"{total // 2}:{total}"
    lab = Lab(wan_delay_ms=args.delay_ms)
    servers: list[ServerProcess] = []
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"corolla-relay-bench-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)

    def server(name: str, ns: str, blocks: str, peers: list[str], *extra: str) -> ServerProcess:
        launcher = [*lab.launcher(ns), sys.executable, "-m", "corolla.engine.apps.cli"]
        extra_args = [*FAST, "--host", "0.0.0.0", "--port", str(PORT), *extra]
        proc = ServerProcess(
            str(path), blocks, peers, log_dir / f"{name}.log", extra_args=extra_args, launcher=launcher
        )
        servers.append(proc)
        return proc

    def wait(name: str, proc: ServerProcess) -> None:
        deadline = time.monotonic() + 300
        while not proc.ready():
            if not proc.alive() or time.monotonic() > deadline:
                raise SystemExit(f"server {name} did not start:\n{proc.log_tail()}")
            time.sleep(0.3)

    delays = (args.delay_ms, 0.0)
    step_ms: dict[tuple[float, bool, str], list[float]] = {}  # median ms of a step, one per set
    sets: list[str] = []
    local: list[float] = []  # local transformers' median ms of a step, once a set (the machine's load changes)
    began = time.monotonic()
    try:
        a_ns, a_ip = lab.add_public("a")
        b_ns, _ = lab.add_public("b")
        u_ns, _ = lab.add_public("u")
        n_ns, _, _ = lab.add_home("n")
        a = server("a", a_ns, half, [], "--new-swarm")
        wait("a", a)
        a_addr = f"/ip4/{a_ip}/tcp/{PORT}/p2p/{a.peer_id}"
        b, n = server("b", b_ns, rest, [a_addr]), server("n", n_ns, rest, [a_addr])
        wait("b", b)
        wait("n", n)
        if not n.status().get("relayed"):
            raise SystemExit(f"n is not relayed:\n{n.log_tail()}")
        if "reachable directly at" not in b.log_path.read_text():
            raise SystemExit(f"b was not found reachable:\n{b.log_tail()}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(path), a_addr]
        user = lab.popen(u_ns, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(HERE.parent))
        peers = {"direct": (b.peer_id, n.peer_id), "relayed": (n.peer_id, b.peer_id)}

        def ask(question: dict[str, Any]) -> dict[str, Any]:
            assert user.stdin is not None
            user.stdin.write(json.dumps(question) + "\n")
            user.stdin.flush()
            return read_json_line(user, 600)

        def both(forwarding: bool, new: int, order: tuple[str, ...]) -> dict[str, float]:
            result = ask({"routes": {route: peers[route] for route in order}, "forwarding": forwarding, "new": new})
            for route in order:
                if result["hops"][route][-1] != peers[route][0]:
                    raise SystemExit(f"the {route} route did not reach its server: {result}")
            return {route: float(ms) for route, ms in result["ms"].items()}

        for forwarding in MODES:  # warm up: connections, streams, the relay circuit
            both(forwarding, 4, ROUTES)
        ask({"local": True, "new": 4})
        for i in range(args.repeats):
            order = ROUTES if i % 2 == 0 else ROUTES[::-1]
            local.append(float(ask({"local": True, "new": args.new_tokens})["ms"]))
            line = [f"local {local[-1]:.0f} ms"]
            for delay in delays:
                lab.set_wan_delay(delay)
                for forwarding in MODES:
                    got = both(forwarding, args.new_tokens, order)
                    for route, ms in got.items():
                        step_ms.setdefault((delay, forwarding, route), []).append(ms)
                    line.append(
                        f"{delay:g} ms {MODES[forwarding]} {got['direct']:.0f}/{got['relayed']:.0f} "
                        f"({got['direct'] / got['relayed']:.2f}x)"
                    )
            sets.append(", ".join(line))
        assert user.stdin is not None
        user.stdin.close()
        user.wait(timeout=60)
    finally:
        for proc in servers:
            proc.stop(grace=5)
        lab.close()
    elapsed = time.monotonic() - began
    local_ms = statistics.median(local)
    print(f"machine: {platform.processor() or platform.machine()}, {_common.load_average()}")
    print(
        f"model: llama-small ({total} blocks of hidden {_common.LLAMA_SMALL['hidden_size']}), servers a {half} "
        f"(public, the relay), b {rest} (public) and n {rest} (behind a NAT, through a's relay), 1 thread each; "
        f"greedy decode of {args.new_tokens} tokens in two sessions, direct and relayed, their steps alternating; "
        f"{args.repeats} sets in {elapsed:.0f} s; figures are medians [min-max] over sets of each session's median "
        f"ms/token; local transformers (1 thread, in the user's process) {summary(local)} ms/token"
    )
    for i, figures in enumerate(sets):
        print(f"  set {i + 1} (ms/token direct/relayed, relayed/direct speed): {figures}")
    for delay in delays:
        print(f"{delay:g} ms one way on every public leg:")
        for forwarding, mode in MODES.items():
            d, r = (step_ms[(delay, forwarding, route)] for route in ROUTES)
            ratios = [x / y for x, y in zip(d, r, strict=True)]
            costs = [y - x for x, y in zip(d, r, strict=True)]
            legs = LEGS[(forwarding, "relayed")] - LEGS[(forwarding, "direct")]
            print(
                f"  {mode:<10} direct {summary(d)} ms/token ({local_ms / statistics.median(d):.2f}x local), "
                f"relayed {summary(r)} ms/token ({local_ms / statistics.median(r):.2f}x local): relayed/direct speed "
                f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]; relaying costs "
                f"{summary(costs)} ms/token, of which {legs} more leg(s): {legs * delay:g} ms"
            )


if __name__ == "__main__":
    main()

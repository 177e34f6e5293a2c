"""Relayed vs direct: decode speed of a volunteer behind a NAT (served through a relay) against one on a public
address, through the same network namespaces.

Needs root (it makes network namespaces like tests/swarm/test_nat.py: public hosts on a bridge, a home host
behind a masquerading router, no port forwarded). Server a (public, blocks 0:N/2, the relay) and the user u
stay; the second half is served first by b (public: the route u → a, u → b), then by n (behind the NAT:
u → a, u → a → n through a's relay circuit). Prints tokens/s of each route, local transformers' on the same
machine, the machine and its load; asserts nothing.

No WAN delay is added: this kernel has no netem, and the userspace delaying relay (benchmarks/_relay.py)
cannot sit in front of a relay here (the relay then sees its peers come from 127.0.0.1, so its dial-back
check cannot judge them; with it in front, the volunteer's relay slot also dropped after ~30 s, not yet
understood). What a WAN adds is counted instead: without forwarding, a token crosses 4 one-way network
legs direct (u→a→u, u→b→u) and 6 relayed (u→a→u, u→a→n→a→u), so with a one-way delay d on every leg a
relayed token costs 2d more (printed for d = ``--delay-ms``).

    sudo OMP_WAIT_POLICY=PASSIVE python benchmarks/relay.py [--new-tokens 24] [--repeats 3] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "swarm"))  # the namespace lab of the NAT tests (a test helper)

from netns_lab import Lab, read_json_line, why_no_namespaces  # noqa: E402

from corolla.engine.apps.local_swarm import ServerProcess  # noqa: E402

SMALL = dict(  # a small random Llama (as multihop.py's): compute stays small next to the link delays
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
)
PORT = 31337  # every host has its own address: one port for all
FAST = ["--throughput", "1000", "--announce-period", "2", "--record-ttl", "20", "--num-threads", "1"]


def measure(path: str, peers: list[str], new: int, repeats: int) -> None:
    """Run in the user's namespace: decode tokens/s through the swarm (median of ``repeats``) as one JSON line."""
    from corolla.engine import DistributedModelForCausalLM

    torch.set_num_threads(1)
    model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, verify_rate=0.0, step_timeout=60.0)
    prompt = torch.randint(7, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        speeds, hops = [], []
        for i in range(repeats + 1):  # the first warms the streams up
            with model.inference_session(max_length=prompt.shape[1] + new + 1) as session, torch.inference_mode():
                session.use_forwarding(False)
                hidden = session.step(model.head.embed(prompt))
                token = model.head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
                began = time.perf_counter()
                for _ in range(new):
                    hidden = session.step(model.head.embed(token))
                    token = model.head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
                if i:
                    speeds.append(new / (time.perf_counter() - began))
                hops = [hop.stream.peer_id for hop in session.hops]
    finally:
        model.close()
    sys.stdout.write(json.dumps({"tps": statistics.median(speeds), "hops": hops}) + "\n")
    sys.stdout.flush()


def local_speed(path: Path, new: int) -> float:
    """Local transformers greedy decode tokens/s on this machine (1 thread), for the ratios."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(7, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=[])
        began = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=[])
    return new / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way WAN delay to count per leg")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # internal: PATH PEER... in the user's ns
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1:], args.new_tokens, args.repeats)
        return
    if reason := why_no_namespaces():
        raise SystemExit(f"cannot run: {reason}")
    _common.stop_on_sigterm()
    path = _common.random_checkpoint("llama-small", **SMALL)
    half = f"0:{SMALL['num_hidden_layers'] // 2}"
    rest = f"{SMALL['num_hidden_layers'] // 2}:{SMALL['num_hidden_layers']}"
    lab = Lab()
    servers: list[ServerProcess] = []
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"corolla-relay-bench-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)

    def server(name: str, ns: str, blocks: str, peers: list[str], *extra: str) -> ServerProcess:
        args = [*FAST, "--host", "0.0.0.0", "--port", str(PORT), *extra]
        launcher = [*lab.launcher(ns), sys.executable, "-m", "corolla.engine.apps.cli"]
        proc = ServerProcess(str(path), blocks, peers, log_dir / f"{name}.log", extra_args=args, launcher=launcher)
        servers.append(proc)
        deadline = time.monotonic() + 300
        while not proc.ready():
            if not proc.alive() or time.monotonic() > deadline:
                raise SystemExit(f"server {name} did not start:\n{proc.log_tail()}")
            time.sleep(0.3)
        return proc

    def user(peers: list[str]) -> dict[str, object]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--new-tokens", str(args.new_tokens)]
        cmd += ["--repeats", str(args.repeats), "--measure", str(path), *peers]
        proc = lab.popen(u_ns, cmd, stdout=subprocess.PIPE, text=True, cwd=str(HERE.parent))
        result = read_json_line(proc, 600)
        proc.wait(timeout=30)
        return result

    results: dict[str, float] = {}
    try:
        a_ns, a_ip = lab.add_public("a")
        b_ns, _ = lab.add_public("b")
        u_ns, _ = lab.add_public("u")
        n_ns, _, _ = lab.add_home("n")
        a = server("a", a_ns, half, [], "--new-swarm")
        a_addr = f"/ip4/{a_ip}/tcp/{PORT}/p2p/{a.peer_id}"
        b = server("b", b_ns, rest, [a_addr])
        results["direct"] = float(user([a_addr])["tps"])  # type: ignore[arg-type]
        b.stop()
        n = server("n", n_ns, rest, [a_addr])
        if not n.status().get("relayed"):
            raise SystemExit(f"n is not relayed:\n{n.log_tail()}")
        result = user([a_addr])
        if result["hops"][-1] != n.peer_id:  # type: ignore[index]
            raise SystemExit(f"the route did not reach n: {result}")
        results["relayed"] = float(result["tps"])  # type: ignore[arg-type]
    finally:
        for proc in servers:
            proc.stop(grace=5)
        lab.close()
    local = local_speed(path, args.new_tokens)
    print(f"machine: {platform.processor() or platform.machine()}, {_common.load_average()}")
    print(
        f"model: llama-small ({SMALL['num_hidden_layers']} blocks of hidden {SMALL['hidden_size']}), servers "
        f"a {half} (the relay) and b or n {rest}, 1 thread each, greedy decode of {args.new_tokens} tokens without "
        f"forwarding, median of {args.repeats}; local transformers: {local:.2f} tokens/s"
    )
    d, r = results["direct"], results["relayed"]
    print(
        f"  direct {d:6.2f} tokens/s ({1000 / d:6.1f} ms/token, {d / local:.2f}x local), relayed {r:6.2f} tokens/s "
        f"({1000 / r:6.1f} ms/token, {r / local:.2f}x local): relayed/direct {r / d:.2f}x"
    )
    wan = args.delay_ms / 1000
    print(
        f"  with {args.delay_ms:g} ms one way on every leg: direct {1000 / d + 4000 * wan:.0f} ms/token, relayed "
        f"{1000 / r + 6000 * wan:.0f} ms/token (4 and 6 legs): relayed/direct {(1 / d + 4 * wan) / (1 / r + 6 * wan):.2f}x"
    )


if __name__ == "__main__":
    main()

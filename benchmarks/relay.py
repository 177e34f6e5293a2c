"""Relayed vs direct: decode speed of a volunteer behind a NAT (served through a relay) against one on a public
address, through the same network namespaces, with a WAN delay on every link to a public host.

Needs root (it makes network namespaces like tests/swarm/test_nat.py: public hosts on a bridge, a home host
behind a masquerading router). Server a (public, blocks 0:N/2, the relay) and the user u stay; the second
half is served first by b (public: the direct route u → a → b), then by n (behind the NAT: u → a → a's relay
circuit → n). Every public server sits behind a userspace TCP relay (benchmarks/_relay.py) in its own namespace
that delays each chunk by ``--delay-ms`` one way, and announces that port, so every link to a public host
crosses one delay; n's link to its relay a crosses one in n's home. Without forwarding a token costs 4 one-way delays
direct (u↔a, u↔b) and 6 relayed (u↔a, u↔a↔n): the bound for pure latency is 6/4 = 1.5x slower. Prints
tokens/s per route with and without the delay, local transformers' on the same machine, the machine and its
load; asserts nothing.

    sudo OMP_WAIT_POLICY=PASSIVE python benchmarks/relay.py [--delay-ms 25] [--new-tokens 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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
PORT, DELAYED = 31337, 31338  # each server's own port, and its delaying relay's (announced)
HOME_OUT = 31339  # n's delaying relay to a, inside n's home
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
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay on every link to a public host")
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
    delays: list[subprocess.Popen[str]] = []
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"corolla-relay-bench-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)

    def server(name: str, ns: str, ip: str | None, blocks: str, peers: list[str], *extra: str) -> ServerProcess:
        args = [*FAST, "--host", "0.0.0.0", "--port", str(PORT), *extra]
        if ip:  # public: announce the delaying relay's port, which forwards to the server's
            delay_cmd = [sys.executable, str(HERE / "_relay.py"), "--delay-ms", str(args_delay)]
            delay_cmd += ["--listen-host", ip, f"{DELAYED}:{PORT}"]
            delay = lab.popen(ns, delay_cmd, stdout=subprocess.PIPE, text=True)
            delays.append(delay)
            args += ["--announce-host", ip, "--announce-port", str(DELAYED)]
        launcher = [*lab.launcher(ns), sys.executable, "-m", "corolla.engine.apps.cli"]
        proc = ServerProcess(str(path), blocks, peers, log_dir / f"{name}.log", extra_args=args, launcher=launcher)
        servers.append(proc)
        deadline = time.monotonic() + 300
        while not proc.ready():
            if not proc.alive() or time.monotonic() > deadline:
                raise SystemExit(f"server {name} did not start:\n{proc.log_tail()}")
            time.sleep(0.3)
        return proc

    args_delay = args.delay_ms

    def user(peers: list[str]) -> dict[str, object]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--new-tokens", str(args.new_tokens)]
        cmd += ["--repeats", str(args.repeats), "--measure", str(path), *peers]
        proc = lab.popen(u_ns, cmd, stdout=subprocess.PIPE, text=True, cwd=str(HERE.parent))
        result = read_json_line(proc, 600)
        proc.wait(timeout=30)
        return result

    def set_delay(on: bool) -> None:
        for delay in delays:
            if delay.poll() is None:
                os.killpg(delay.pid, signal.SIGUSR2 if on else signal.SIGUSR1)

    results: dict[str, dict[str, float]] = {}
    try:
        a_ns, a_ip = lab.add_public("a")
        b_ns, b_ip = lab.add_public("b")
        u_ns, _ = lab.add_public("u")
        n_ns, _, _ = lab.add_home("n")
        a = server("a", a_ns, a_ip, half, [], "--new-swarm")
        a_addr = f"/ip4/{a_ip}/tcp/{DELAYED}/p2p/{a.peer_id}"
        b = server("b", b_ns, b_ip, rest, [a_addr])
        for on in (True, False):
            set_delay(on)
            results.setdefault("direct", {})[f"delay {on}"] = float(user([a_addr])["tps"])  # type: ignore[arg-type]
        b.stop()
        # n reaches a through a delaying relay in its own home (behind its router), so a sees n's connection
        # come from the router and its dial-back fails as at home; n's link to its relay is delayed too.
        out = [sys.executable, str(HERE / "_relay.py"), "--delay-ms", str(args_delay), "--target-host", a_ip]
        delays.append(lab.popen(n_ns, [*out, f"{HOME_OUT}:{PORT}"], stdout=subprocess.PIPE, text=True))
        n = server("n", n_ns, None, rest, [f"/ip4/127.0.0.1/tcp/{HOME_OUT}/p2p/{a.peer_id}"])
        if not n.status().get("relayed"):
            raise SystemExit(f"n is not relayed:\n{n.log_tail()}")
        for on in (True, False):
            set_delay(on)
            result = user([a_addr])
            if result["hops"][-1] != n.peer_id:  # type: ignore[index]
                raise SystemExit(f"the route did not reach n: {result}")
            results.setdefault("relayed", {})[f"delay {on}"] = float(result["tps"])  # type: ignore[arg-type]
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
    for delay in (True, False):
        label = f"{args.delay_ms:g} ms one way per public link" if delay else "no added delay"
        d, r = results["direct"][f"delay {delay}"], results["relayed"][f"delay {delay}"]
        print(
            f"  {label}: direct {d:6.2f} tokens/s ({1000 / d:6.1f} ms/token, {d / local:.2f}x local), "
            f"relayed {r:6.2f} tokens/s ({1000 / r:6.1f} ms/token, {r / local:.2f}x local), "
            f"relayed/direct {r / d:.2f}x"
        )
    print("  bound for pure latency: relayed costs 6 one-way delays a token against 4 direct (0.67x)")


if __name__ == "__main__":
    main()

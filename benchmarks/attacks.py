"""A normal client's latency while one stranger attacks the server, and the server's peak RSS. Prints figures.

One server hosts every block (default limits); a bare P2P peer sends oversized frames (4 MiB + 1 byte, and
1 GiB declared with part of it sent), floods a forward with empty parts, opens every session it can, and
queues many long forwards, each while the normal client generates. Output must equal the unattacked run.

Then liars (``--part liars``): two honest servers of every block, then two liars announcing 1e6 tokens/s
join (one answers random tensors, one serves other weights). Printed: the decode cost of spot checks at
the default rate (ms/token with verification off and on, two honest replicas), and how long a fresh client
takes to catch each liar, with its output compared to the honest one.

Then address groups (``--part groups``): one honest server (default limits), a normal client on 127.0.1.1.
8 identities on 127.0.2.1 open 8 sessions each and keep them alive with a step every 20 s that adds nothing;
printed: the sessions they got and the normal client's time and ms/token against the unattacked run. Then
34 dead records and 16 live identities that answer info but never inference, all on 127.0.3.1, claiming
1e6 tokens/s: printed, a fresh client's first-token time against a fresh client's in the same swarm before.

    python benchmarks/attacks.py [--model smollm2|tiny] [--tokens 16] [--forwards 16] [--forward-tokens 8192]
                                 [--part all|floods|liars|groups] [--cost-tokens 64] [--cost-rounds 5]
                                 [--fresh-rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - first: the thread environment before torch, tests/support on sys.path
import torch
from attack_servers import LYING_SERVER, PeakRss, hold_sessions, identities, silent_identities, tree_rss
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint
from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import remote_forward, remote_info
from corolla.engine.dht.announce import make_dht
from corolla.engine.wire.messages import RPC_FORWARD, RPC_INFERENCE, ForwardRequest, OpenSession, StepResult

MiB = 1024 * 1024


async def oversized(p2p: P2P, peer: str, declared: int, sent: int) -> str:
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), RPC_INFERENCE)

    async def write() -> None:
        writer.write(P2P.MESSAGE_MARKER + declared.to_bytes(8, "big"))
        for _ in range(sent // MiB):
            writer.write(bytes(MiB))
            await writer.drain()

    async def read() -> bytes:
        got = b""
        with contextlib.suppress(ConnectionError):  # the server may reset the stream after answering
            while chunk := await reader.read(65536):
                got += chunk
        return got

    writing = asyncio.ensure_future(write())
    try:
        answer = await asyncio.wait_for(read(), 120)
    finally:
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing
        writer.close()
    return "answered with an error" if answer[:1] == P2P.MESSAGE_MARKER else "closed"


async def part_flood(p2p: P2P, peer: str, parts: int, end: int) -> str:
    meta = ForwardRequest(start=0, end=end).encode()

    async def requests() -> Any:
        for _ in range(parts):
            yield runtime_pb2.ExpertRequest(metadata=meta)

    responses = await p2p.iterate_protobuf_handler(
        PeerID.from_base58(peer), RPC_FORWARD, requests(), runtime_pb2.ExpertResponse
    )
    async for _ in responses:
        break
    await responses.aclose()  # type: ignore[attr-defined]
    return "answered"


async def session_flood(p2p: P2P, peer: str, count: int, end: int) -> tuple[int, list[Any], asyncio.Event]:
    """Open ``count`` sessions, each on its own stream that stays open (silent) until ``release`` is set."""
    opened, streams, release = 0, [], asyncio.Event()
    for i in range(count):
        msg = OpenSession(session_id=f"flood{i}", start=0, end=end, max_length=2048, batch_size=1)

        async def requests(msg: OpenSession = msg) -> Any:
            yield runtime_pb2.ExpertRequest(metadata=msg.encode())
            await release.wait()

        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer), RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )
        with contextlib.suppress(Exception):
            opened += StepResult.decode((await anext(responses)).metadata).ok
        streams.append(responses)
    return opened, streams, release


async def forward_flood(p2p: P2P, peer: str, count: int, tokens: int, hidden: int, end: int) -> str:
    x = torch.randn(1, tokens, hidden)
    results = await asyncio.gather(
        *(remote_forward(p2p, peer, 0, end, x, 2 * MiB, 1200.0) for _ in range(count)), return_exceptions=True
    )
    done = sum(isinstance(r, torch.Tensor) for r in results)
    return f"{done} done, {count - done} refused"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--tokens", type=int, default=16, help="tokens the normal client generates per run")
    parser.add_argument("--forwards", type=int, default=16, help="long forwards the attacker queues at once")
    parser.add_argument("--forward-tokens", type=int, default=8192, help="tokens of each of them")
    parser.add_argument("--part", choices=["all", "floods", "liars", "groups"], default="all")
    parser.add_argument("--cost-tokens", type=int, default=64, help="tokens per run when timing spot checks")
    parser.add_argument("--cost-rounds", type=int, default=5, help="runs with verification off and on, alternated")
    parser.add_argument("--fresh-rounds", type=int, default=5, help="fresh clients timed before and under attack")
    args = parser.parse_args()
    path = smollm2_checkpoint() if args.model == "smollm2" else make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    if args.part in ("all", "floods"):
        floods(path, args)
    if args.part in ("all", "liars"):
        liars(path, args)
    if args.part in ("all", "groups"):
        groups(path, args)


def other_weights(path: Path) -> Path:
    """A copy of the checkpoint with every weight perturbed by 10% noise (a server with other weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
    out = Path(tempfile.mkdtemp()) / path.name
    model.save_pretrained(out)
    with contextlib.suppress(Exception):
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def liars(path: Path, args: argparse.Namespace) -> None:
    """Spot-check cost on an honest swarm, then the time a fresh client takes to catch two liars."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    blocks = int(config.num_hidden_layers)
    ids = torch.randint(7, min(int(config.vocab_size), 150), (1, 8), generator=torch.Generator().manual_seed(0))
    span = f"0:{blocks}"
    with Swarm(path, spans=[]) as swarm:
        # Each server in its own /24 of loopback: audits ask only replicas of another address group.
        for address in ("127.0.1.1", "127.0.2.1"):
            swarm.add_server(span, wait=False, extra_args=["--throughput", "50", "--host", address])
        swarm.wait_ready()
        off = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, verify_rate=0.0, verify_first_steps=0
        )
        on = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            reference = off.generate(ids, max_new_tokens=args.cost_tokens, eos_token_id=[])
            on.generate(ids, max_new_tokens=4, eos_token_id=[])  # both servers' first steps checked
            times: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.cost_rounds):
                for name, model in (("off", off), ("on", on)):
                    start = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=args.cost_tokens, eos_token_id=[])
                    times[name].append((time.perf_counter() - start) * 1000 / args.cost_tokens)
                    assert torch.equal(out, reference), f"verification {name}: output changed"
            t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
            rate = on.client_config.verify_rate
            print(
                f"audits at verify_rate={rate:g} (two honest replicas in two address groups, {args.cost_tokens} tokens a run, "
                f"median of {args.cost_rounds}): {t_off:.1f} ms/token off, {t_on:.1f} ms/token on, "
                f"decode slowdown {100 * (t_on / t_off - 1):+.1f}% (target <= 10%)"
            )
        finally:
            off.close()
            on.close()
        fast = ["--throughput", "1e6"]
        random_liar = swarm.add_server(
            span, wait=False, extra_args=[*fast, "--host", "127.0.3.1"], launcher=LYING_SERVER
        )
        weights_liar = swarm.add_server(
            span, wait=False, extra_args=[*fast, "--host", "127.0.4.1"], model=other_weights(path)
        )
        swarm.wait_ready()
        names = {str(random_liar.peer_id): "random tensors", str(weights_liar.peer_id): "other weights"}
        reports = Path(tempfile.mkdtemp()) / "reports.jsonl"
        fresh = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, report_file=str(reports)
        )
        caught: dict[str, float] = {}
        convict = fresh.manager.convict

        def timed_convict(peer_id: str, start: int, end: int, reason: str) -> None:
            caught.setdefault(peer_id, time.perf_counter())
            convict(peer_id, start, end, reason)

        fresh.manager.convict = timed_convict  # type: ignore[method-assign]
        try:
            began = time.perf_counter()
            out = fresh.generate(ids, max_new_tokens=args.cost_tokens, eos_token_id=[])
            elapsed = time.perf_counter() - began
        finally:
            fresh.close()
        for peer, name in names.items():
            when = f"caught {caught[peer] - began:.2f} s after the request" if peer in caught else "NOT caught"
            print(f"liar ({name}, announcing 1e6 tokens/s): {when}")
        print(
            f"fresh client with two liars in a swarm of four: {args.cost_tokens} tokens in {elapsed:.2f} s, "
            f"output identical to the honest one: {torch.equal(out, reference)}; reports in {reports}"
        )


def floods(path: Path, args: argparse.Namespace) -> None:
    """The normal client's latency and the server's peak RSS under each flood."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    blocks, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    ids = torch.randint(7, min(int(config.vocab_size), 150), (1, 8), generator=torch.Generator().manual_seed(0))
    with Swarm(path, spans=[f"0:{blocks}"]) as swarm:
        server = swarm.servers[0]
        peer = str(server.peer_id)
        dht = make_dht(swarm.initial_peers, "127.0.0.1", client_mode=True)
        loop = LoopThread("attacker")
        p2p = loop.run(dht.replicate_p2p(), 60)
        model = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            reference = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
            idle_rss = tree_rss(server.pid)
            print(f"server idle RSS {idle_rss / MiB:.0f} MiB")

            def measure(name: str, attack: Callable[[], Any] | None, lead: float = 0.5) -> None:
                """Start the attack, give it ``lead`` seconds to get going, then time the normal client."""
                peak = PeakRss(server.pid)
                with ThreadPoolExecutor(1) as pool:
                    attacking = pool.submit(attack) if attack is not None else None
                    time.sleep(lead if attack is not None else 0.0)
                    start = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
                    elapsed = time.perf_counter() - start
                    outcome = attacking.result() if attacking is not None else "-"
                top = peak.stop()
                print(
                    f"{name:34} normal client {elapsed * 1000 / args.tokens:7.0f} ms/token, "
                    f"identical {torch.equal(out, reference)}; server peak RSS {top / MiB:6.0f} MiB "
                    f"(+{(top - idle_rss) / MiB:.0f}); attack: {outcome}"
                )

            measure("no attack", None)
            measure("frame of 4 MiB + 1 byte", lambda: loop.run(oversized(p2p, peer, 4 * MiB + 1, 4 * MiB + 1), 300))
            measure(
                "frame of 1 GiB declared (256 MiB sent)",
                lambda: loop.run(oversized(p2p, peer, 1 << 30, 256 * MiB), 300),
            )
            measure("forward of 100,000 empty parts", lambda: loop.run(part_flood(p2p, peer, 100_000, blocks), 300))
            held: list[Any] = []

            def sessions() -> str:
                opened, streams, release = loop.run(session_flood(p2p, peer, 64, blocks), 300)
                held.extend([*streams, release])
                return f"{opened} of 64 sessions opened"

            measure("64 sessions from one peer", sessions)
            *streams, release = held
            loop.loop.call_soon_threadsafe(release.set)
            for s in streams:
                with contextlib.suppress(Exception):
                    loop.run(s.aclose(), 10)
            flood = f"{args.forwards} forwards of {args.forward_tokens} tokens"
            measure(
                flood,
                lambda: loop.run(forward_flood(p2p, peer, args.forwards, args.forward_tokens, hidden, blocks), 3000),
                lead=3.0,  # the forwards are sent and queued before the normal client starts
            )
        finally:
            model.close()
            loop.run(p2p.shutdown(), 10)
            loop.stop()
            dht.shutdown()


HONEST_HOST = "127.0.1.1"  # the normal clients' address (its own /24 on loopback)


def fresh_first_token(path: Path, swarm: Swarm, ids: torch.Tensor, rounds: int) -> list[float]:
    """Seconds from a fresh client's first request to its first token, once per fresh client."""
    times = []
    for _ in range(rounds):
        fresh = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, host=HONEST_HOST
        )
        try:
            start = time.perf_counter()
            fresh.generate(ids, max_new_tokens=1, eos_token_id=[])
            times.append(time.perf_counter() - start)
        finally:
            fresh.close()
    return times


def groups(path: Path, args: argparse.Namespace) -> None:
    """Many identities from one address: kept-alive sessions, then dead and silent records."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    blocks, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    ids = torch.randint(7, min(int(config.vocab_size), 150), (1, 8), generator=torch.Generator().manual_seed(0))
    with Swarm(path, spans=[f"0:{blocks}"]) as swarm:
        server = str(swarm.servers[0].peer_id)
        loop = LoopThread("attackers")
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, host=HONEST_HOST
        )
        try:
            reference = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
            calm = time.perf_counter() - start
            before = fresh_first_token(path, swarm, ids, args.fresh_rounds)

            async def keep() -> tuple[list[Any], list[Any]]:
                peers = await identities(8, "127.0.2.1", swarm.initial_peers)
                held = [
                    await hold_sessions(p, server, f"k{i}-", 8, end=blocks, hidden=hidden, period=20.0)
                    for i, p in enumerate(peers)
                ]
                return peers, held

            peers, held = loop.run(keep(), 300)
            try:
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
                busy = time.perf_counter() - start
            finally:

                async def drop() -> None:
                    for h in held:
                        await h.close()
                    await asyncio.gather(*(p.shutdown() for p in peers), return_exceptions=True)

                loop.run(drop(), 120)
            print(
                f"{'8 identities x 8 kept-alive sessions':44} attacker got {sum(h.opened for h in held)} of 64 "
                f"sessions; normal client served in {busy:.2f} s ({busy / calm:.2f}x the unattacked "
                f"{calm:.2f} s for {args.tokens} tokens), identical {torch.equal(out, reference)}"
            )
            info = model.loop.run(remote_info(model.p2p, server, 30.0), 60)
            silent = loop.run(
                silent_identities(
                    info["model"], info, live=16, dead=34, host="127.0.3.1", initial_peers=swarm.initial_peers
                ),
                600,
            )
            try:
                under = fresh_first_token(path, swarm, ids, args.fresh_rounds)
            finally:
                loop.run(silent.shutdown(), 120)
            b, u = statistics.median(before), statistics.median(under)
            print(
                f"{'34 dead + 16 live silent identities, 1 addr':44} fresh client's first token {u:.2f} s "
                f"(median of {args.fresh_rounds}) vs {b:.2f} s before the attack: {u / b:.2f}x (target <= 1.2x)"
            )
        finally:
            model.close()
            loop.stop()


if __name__ == "__main__":
    main()

"""Floods and oversized input from one stranger, against a real server, while a normal client decodes.

Every test runs a normal client at the same time as the attack: its output must stay identical to
transformers, and the server's memory (its process tree's RSS, sampled all along) must stay bounded.
The attacker is a bare hivemind P2P peer, so it can send what Corolla's client never would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from attack_servers import PeakRss, tree_rss
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from swarm_helpers import client, forward_answer, hf_greedy, hf_model, peer_id, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine import CacheFullError, CorollaError, DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import remote_forward
from corolla.engine.dht.announce import make_dht
from corolla.engine.wire.messages import RPC_FORWARD, RPC_INFERENCE, ForwardRequest, OpenSession, Step, StepResult
from corolla.engine.wire.tensors import serialize

pytestmark = pytest.mark.swarm

T = TypeVar("T")
HIDDEN = 64  # TINY_DEFAULTS hidden_size
MiB = 1024 * 1024
MAX_SESSIONS = 5  # this server's slots (fewer than the default 64, so one test can fill them)
PER_PEER = 3  # sessions per peer (the default is 8 of 64)
RECLAIM_IDLE = 4.0  # seconds (the default is 60)
RSS_HEADROOM = 400 * MiB  # the server's process tree may grow at most this much over its idle size


@dataclass
class Raw:
    """A bare P2P peer (its own identity) on its own event loop thread."""

    loop: LoopThread
    p2p: P2P

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return self.loop.run(coro, timeout)


@dataclass
class Attack:
    path: Path
    swarm: Swarm
    server: str  # peer id of the one server (blocks 0:6)
    pid: int
    attacker: Raw
    other: Raw  # a second stranger with another peer id
    model: DistributedModelForCausalLM  # the normal client
    reference: PreTrainedModel
    idle_rss: int


@contextlib.contextmanager
def raw_peer(swarm: Swarm, name: str) -> Iterator[Raw]:
    dht = make_dht(swarm.initial_peers, "127.0.0.1", client_mode=True)
    loop = LoopThread(name)
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        try:
            yield Raw(loop, p2p)
        finally:
            loop.run(p2p.shutdown(), timeout=10)
    finally:
        loop.stop()
        dht.shutdown()


@pytest.fixture(scope="module")
def attack(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    """One server of all 6 blocks with default limits except fewer session slots and a short reclaim idle."""
    path = tiny_checkpoint("llama")
    args = ["--max-sessions", str(MAX_SESSIONS), "--max-sessions-per-peer", str(PER_PEER)]
    args += ["--session-reclaim-idle", str(RECLAIM_IDLE)]
    with running_swarm(path, [], tmp_path_factory) as swarm:
        server = swarm.add_server("0:6", extra_args=args)
        with (
            raw_peer(swarm, "attacker") as attacker,
            raw_peer(swarm, "other") as other,
            client(path, swarm) as model,
        ):
            model.generate(random_ids(1, 4, seed=1), max_new_tokens=2)  # warm up both sides
            rss = tree_rss(server.pid)
            yield Attack(path, swarm, peer_id(server), server.pid, attacker, other, model, hf_model(path), rss)


def under_attack(att: Attack, run_attack: Callable[[], T], seed: int, new_tokens: int = 8) -> T:
    """Run ``run_attack`` while the normal client generates; check its output and the server's memory."""
    ids = random_ids(1, 6, seed=seed)
    expected = hf_greedy(att.reference, ids, new_tokens, eos=False)
    sampler = PeakRss(att.pid)
    try:
        with ThreadPoolExecutor(1) as pool:
            normal = pool.submit(att.model.generate, ids, max_new_tokens=new_tokens, eos_token_id=[])
            result = run_attack()
            out = normal.result(timeout=240)
    finally:
        peak = sampler.stop()
    assert torch.equal(out, expected), "the normal client's output changed under attack"
    grown = (peak - att.idle_rss) / MiB
    assert peak < att.idle_rss + RSS_HEADROOM, f"server RSS grew by {grown:.0f} MiB under attack"
    return result


def frame_answer(raw: bytes) -> StepResult:
    """The first answer frame in bytes a server sent (marker, 8-byte length, ExpertResponse)."""
    assert raw[:1] == P2P.MESSAGE_MARKER, f"no answer frame: {raw[:16]!r}"
    length = int.from_bytes(raw[1:9], "big")
    return StepResult.decode(runtime_pb2.ExpertResponse.FromString(raw[9 : 9 + length]).metadata)


async def send_frame(p2p: P2P, peer: str, rpc: str, declared: int, body_bytes: int) -> bytes:
    """Send a frame header declaring ``declared`` bytes, then ``body_bytes`` zeros; all the server answers."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), rpc)

    async def write() -> None:
        writer.write(P2P.MESSAGE_MARKER + declared.to_bytes(8, "big"))
        chunk = bytes(MiB)
        for _ in range(body_bytes // MiB):
            writer.write(chunk)
            await writer.drain()
        writer.write(bytes(body_bytes % MiB))
        await writer.drain()

    writing = asyncio.ensure_future(write())
    try:
        return await asyncio.wait_for(reader.read(), 60)  # until the server hangs up
    finally:
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing
        writer.close()


# ---- oversized frames -----------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_oversized_frames_are_refused_from_the_header(attack: Attack) -> None:
    def run() -> list[StepResult]:
        p2p = attack.attacker.p2p
        over = 4 * MiB + 1
        answers = [frame_answer(attack.attacker.run(send_frame(p2p, attack.server, RPC_INFERENCE, over, over)))]
        # 1 GiB declared; 64 MiB of it sent: the server answers after the header and never buffers the body.
        answers.append(
            frame_answer(attack.attacker.run(send_frame(p2p, attack.server, RPC_FORWARD, 1 << 30, 64 * MiB)))
        )
        return answers

    small, huge = under_attack(attack, run, seed=10)
    assert not small.ok and "message of 4194305 bytes exceeds this server's limit of 4194304" in str(small.error)
    assert not huge.ok and "message of 1073741824 bytes exceeds" in str(huge.error)
    assert small.error_type == huge.error_type == "ProtocolError"


# ---- part floods ----------------------------------------------------------------------------
async def forward_parts(p2p: P2P, peer: str, parts: int) -> StepResult:
    meta = ForwardRequest(start=0, end=6).encode()
    result: StepResult = await forward_answer(p2p, peer, [runtime_pb2.ExpertRequest(metadata=meta)] * parts)
    return result


@pytest.mark.timeout(300)
def test_part_floods_are_cut_at_the_cap(attack: Attack) -> None:
    result = under_attack(
        attack, lambda: attack.attacker.run(forward_parts(attack.attacker.p2p, attack.server, 100_000)), seed=11
    )
    assert not result.ok and "at most 1024 messages" in str(result.error)


# ---- session floods and idle sessions -------------------------------------------------------
async def open_sessions(p2p: P2P, peer: str, prefix: str, count: int) -> tuple[list[StepResult], list[Any]]:
    """Open ``count`` sessions on separate streams; keep the streams (their queues) open for later steps."""
    answers, streams = [], []
    for i in range(count):
        queue: asyncio.Queue[Any] = asyncio.Queue()
        msg = OpenSession(session_id=f"{prefix}{i}", start=0, end=6, max_length=64, batch_size=1)
        queue.put_nowait(runtime_pb2.ExpertRequest(metadata=msg.encode()))

        async def requests(q: asyncio.Queue[Any] = queue) -> Any:
            while (item := await q.get()) is not None:
                yield item

        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer), RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )
        answers.append(StepResult.decode((await anext(responses)).metadata))
        streams.append((queue, responses))
    return answers, streams


async def step_all(streams: list[Any], prefix: str) -> list[StepResult]:
    out = []
    for i, (queue, responses) in enumerate(streams):
        step = Step(session_id=f"{prefix}{i}", position=0, step_id=1)
        queue.put_nowait(
            runtime_pb2.ExpertRequest(tensors=[serialize(torch.zeros(1, 1, HIDDEN))], metadata=step.encode())
        )
        out.append(StepResult.decode((await anext(responses)).metadata))
    return out


async def close_all(streams: list[Any]) -> None:
    for queue, responses in streams:
        queue.put_nowait(None)
        await responses.aclose()


@pytest.mark.timeout(300)
def test_one_peer_cannot_take_every_session_and_idle_ones_are_reclaimed(attack: Attack) -> None:
    raw, other = attack.attacker, attack.other

    def flood() -> tuple[list[StepResult], list[Any]]:
        return raw.run(open_sessions(raw.p2p, attack.server, "flood", MAX_SESSIONS + 2))  # type: ignore[no-any-return]

    answers, streams = under_attack(attack, flood, seed=12)
    kept = [s for s, a in zip(streams, answers, strict=True) if a.ok]
    assert [a.ok for a in answers] == [True] * PER_PEER + [False] * (MAX_SESSIONS + 2 - PER_PEER)
    assert "limit per peer" in str(answers[-1].error) and answers[-1].error_type == "CacheFullError"
    # A second stranger takes the remaining slots: the server is full.
    more, more_streams = other.run(open_sessions(other.p2p, attack.server, "other", MAX_SESSIONS - PER_PEER))
    assert all(a.ok for a in more)
    # Sessions that stay silent longer than the reclaim idle give their slots to a normal client (it retries
    # on CacheFullError until then), and their next step says why they were closed.
    ids = random_ids(1, 6, seed=13)
    deadline = time.monotonic() + 120
    out = None
    while out is None and time.monotonic() < deadline:
        try:
            out = attack.model.generate(ids, max_new_tokens=6, eos_token_id=[])
        except CorollaError:  # full (or the client's short ban of the full server): poll again
            time.sleep(0.5)
    assert out is not None and torch.equal(out, hf_greedy(attack.reference, ids, 6, eos=False))
    steps = raw.run(step_all(kept, "flood")) + other.run(step_all(more_streams, "other"))
    closed = [s for s in steps if not s.ok]
    assert closed and all("added no tokens" in str(s.error) and s.error_type == "SessionClosedError" for s in closed)
    raw.run(close_all(streams))
    other.run(close_all(more_streams))


# ---- forward floods -------------------------------------------------------------------------
async def forward_flood(p2p: P2P, peer: str, count: int, shape: tuple[int, int]) -> list[Any]:
    hidden = torch.randn(shape[0], shape[1], HIDDEN, generator=torch.Generator().manual_seed(0))
    calls = [remote_forward(p2p, peer, 0, 6, hidden, 2 * MiB, 200.0) for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.timeout(600)
def test_forward_floods_do_not_starve_a_normal_client(attack: Attack) -> None:
    # 16 forwards of 4 x 1024 tokens at once: the first 16384 tokens (the per-peer cap) queue behind the
    # normal client's steps, the rest are refused before they are read into memory.
    def flood() -> list[Any]:
        return attack.attacker.run(forward_flood(attack.attacker.p2p, attack.server, 16, (4, 1024)), timeout=500)  # type: ignore[no-any-return]

    results = under_attack(attack, flood, seed=14)
    done = [r for r in results if isinstance(r, torch.Tensor)]
    refused = [r for r in results if isinstance(r, CacheFullError)]
    assert done and all(r.shape == (4, 1024, HIDDEN) for r in done)
    assert refused and all("tokens in flight" in str(r) for r in refused)
    assert len(done) + len(refused) == 16, [r for r in results if not isinstance(r, torch.Tensor | CacheFullError)]


# ---- verification with one replica ----------------------------------------------------------
@pytest.mark.timeout(120)
def test_output_of_a_single_replica_is_flagged_unverified(attack: Attack) -> None:
    """Nobody else serves these blocks, so nothing can check the server: the session says so."""
    with attack.model.inference_session(16) as session:
        attack.model.generate(random_ids(1, 4, seed=15), max_new_tokens=2, eos_token_id=[], session=session)
    assert not session.verified
    assert session.unverified == {(0, 6): f"only …{attack.server[-6:]}'s address group serves blocks 0:6"}

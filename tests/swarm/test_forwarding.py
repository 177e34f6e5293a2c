"""Server-to-server forwarding: each hop pushes its output to the next one; the client still gets them all.

One swarm for the module: 0:2, 2:4 (twice: one is killed mid-generation), 4:6, and later a server of 0:2
whose pushes are garbage while its answers to the client are honest.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from swarm_helpers import client, hf_model, max_diff, running_swarm, track

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.wire.messages import RPC_PUSH, Push, StepResult
from corolla.engine.wire.tensors import serialize

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

PROMPT = 8
NEW = 6

# A server whose pushes to the next hop are random tensors of the right shape (its answers stay honest).
_GARBAGE_PUSHER = """
import sys, torch
from corolla.engine.apps.cli import main
from corolla.engine.server.forwarding import Forwarder
honest = Forwarder.push
async def garbage_push(self, next_peer, msg, hidden, within=None):
    return await honest(self, next_peer, msg, torch.randn_like(hidden), within)
Forwarder.push = garbage_push
sys.exit(main())
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fwd") / "tiny-llama", "llama", seed=5)


@pytest.fixture(scope="module")
def swarm(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with running_swarm(checkpoint, ["0:2", "2:4", "2:4", "4:6"], tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def model(swarm: Swarm, checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    m = client(checkpoint, swarm, stall_timeout=2.0)
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt, transformers' greedy continuation and the logits of every position of it."""
    ids = torch.randint(7, 100, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    hf = hf_model(checkpoint)
    with torch.inference_mode():
        for _ in range(NEW):
            token = hf(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
        logits = hf(ids).logits
    return ids[:, :PROMPT], ids, logits


def greedy(
    model: DistributedModelForCausalLM, prompt: torch.Tensor, *, forwarding: bool, avoid: set[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Greedy tokens and per-position logits through a session; (ids, logits, forwarded steps, forwarding on)."""
    with model.inference_session(max_length=32) as session:
        session.use_forwarding(forwarding)
        session.avoid_peers(avoid or ())
        ids, feed, logits = prompt, prompt, []
        with torch.inference_mode():
            for _ in range(NEW):
                step_logits = model.head.logits(session.step(model.head.embed(feed)))
                logits.append(step_logits)
                feed = step_logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, feed], dim=1)
        return ids, torch.cat(logits, dim=1), session.forwarded_steps, session.forwarding


def test_forwarding_matches_classic_and_transformers(model: DistributedModelForCausalLM, reference: tuple) -> None:
    prompt, expected, hf_logits = reference
    ids_on, logits_on, forwarded, _ = greedy(model, prompt, forwarding=True)
    ids_off, logits_off, classic, _ = greedy(model, prompt, forwarding=False)
    assert forwarded == NEW and classic == 0  # every step ran forwarded, and none with it off
    assert torch.equal(ids_on, expected) and torch.equal(ids_off, expected)
    assert max_diff(logits_on, hf_logits[:, : PROMPT + NEW - 1]) < 1e-4
    assert max_diff(logits_on, logits_off) < 1e-5


def test_a_strangers_push_is_refused(model: DistributedModelForCausalLM, reference: tuple) -> None:
    prompt, expected, _ = reference
    with model.inference_session(max_length=32) as session:
        hidden = session.step(model.head.embed(prompt))
        assert session.forwarded_steps == 1
        second = session.hops[1].stream.peer_id
        garbage = torch.randn(1, 1, hidden.shape[-1])

        async def push() -> StepResult:  # the client is not hop 1's predecessor: a stranger to the push
            _, reader, writer = await model.p2p.call_binary_stream_handler(PeerID.from_base58(second), RPC_PUSH)
            try:
                msg = Push(session_id=session.session_id, position=PROMPT, step_id=session._step_id + 2)
                await P2P.send_protobuf(
                    runtime_pb2.ExpertRequest(tensors=[serialize(garbage)], metadata=msg.encode()), writer
                )
                response, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                return StepResult.decode(response.metadata)
            finally:
                writer.close()

        answer = model.loop.run(asyncio.wait_for(push(), 30))
        assert not answer.ok and "not the previous hop" in (answer.error or "")
        ids = prompt
        token = model.head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW - 1):
            ids = torch.cat([ids, token], dim=1)
            token = model.head.logits(session.step(model.head.embed(token)))[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(torch.cat([ids, token], dim=1), expected)
        assert session.forwarded_steps == NEW


def test_a_hop_killed_mid_generation(model: DistributedModelForCausalLM, swarm: Swarm, reference: tuple) -> None:
    prompt, expected, _ = reference
    with model.inference_session(max_length=32) as session:
        first = model.generate(prompt, max_new_tokens=3, session=session)  # the prompt and 3 tokens
        middle = session.hops[1].stream.peer_id
        victim = next(s for s in swarm.servers if s.peer_id == middle)
        victim.kill()
        rest = model.generate(None, max_new_tokens=NEW - 3, session=session)  # the new tokens only
        assert torch.equal(torch.cat([first, rest], dim=1), expected)
        assert session.failovers >= 1 and session.hops[1].stream.peer_id != middle
        assert session.forwarding and session.forwarded_steps >= NEW - 1  # back to forwarding after the repair


def test_a_pusher_of_garbage_is_caught_by_the_digests(
    model: DistributedModelForCausalLM, swarm: Swarm, reference: tuple
) -> None:
    prompt, expected, _ = reference
    honest_first = {s.peer_id for s in swarm.servers if s.blocks == "0:2" and s.alive()}
    liar = swarm.add_server("0:2", launcher=(sys.executable, "-c", _GARBAGE_PUSHER))
    track(liar)
    model.manager.refresh()  # see the new server now
    ids, _, forwarded, forwarding = greedy(model, prompt, forwarding=True, avoid={p for p in honest_first if p})
    assert torch.equal(ids, expected)
    assert not forwarding and forwarded == 0  # the first step's digests disagreed: forwarding stopped

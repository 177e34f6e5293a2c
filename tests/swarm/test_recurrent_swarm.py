"""Qwen3-Next through a real swarm: its linear-attention blocks' recurrent states are rebuilt by replay after a
server dies mid-answer (failover) and after the client rewinds a session; the answer stays identical."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from swarm_helpers import ATOL, FAMILY_OVERRIDES, client, hf_greedy, hf_model, max_diff, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine import DistributedModelForCausalLM, InferenceSession
from corolla.engine.apps.local_swarm import Swarm

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(180)]

NEW_TOKENS = 12


class Killer:
    """A transformers-style streamer that kills the server of hop ``hop`` when token ``step`` comes out."""

    def __init__(self, swarm: Swarm, session: InferenceSession, step: int, hop: int) -> None:
        self.swarm, self.session, self.at, self.hop = swarm, session, step, hop
        self.step = -1
        self.killed: str | None = None

    def put(self, ids: torch.Tensor) -> None:
        self.step += 1
        if self.step == self.at:
            peer = self.session.hops[self.hop].stream.peer_id
            next(s for s in self.swarm.servers if s.peer_id == peer).kill()
            self.killed = peer

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def qwen3_next(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Swarm, DistributedModelForCausalLM, PreTrainedModel]]:
    """Blocks 0:3 on one server and 3:6 on two (each span holds linear-attention and attention blocks)."""
    path = tiny_checkpoint("qwen3_next", **FAMILY_OVERRIDES["qwen3_next"])
    with running_swarm(path, ["0:3", "3:6", "3:6"], tmp_path_factory) as swarm, client(path, swarm) as model:
        yield swarm, model, hf_model(path)


def test_failover_rebuilds_recurrent_states_by_replay(
    qwen3_next: tuple[Swarm, DistributedModelForCausalLM, PreTrainedModel],
) -> None:
    swarm, model, hf = qwen3_next
    prompt = random_ids(1, 9, seed=11)
    expected = hf_greedy(hf, prompt, NEW_TOKENS, eos=False)
    with model.inference_session(max_length=64) as session:
        killer = Killer(swarm, session, step=5, hop=1)
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session, streamer=killer, eos_token_id=[])
        assert killer.killed is not None and session.failovers == 1
        assert session.hops[1].stream.peer_id != killer.killed  # the other 3:6 server took over
    assert torch.equal(out, expected)


@torch.inference_mode()
def test_rewound_session_replays_recurrent_states(
    qwen3_next: tuple[Swarm, DistributedModelForCausalLM, PreTrainedModel], caplog: pytest.LogCaptureFixture
) -> None:
    """Rewinding to 6 of 11 tokens: servers cannot cut a recurrent state back there, so the client replays each
    hop's inputs from 0 (without it the servers refuse the step); the logits are transformers' for the new text."""
    _swarm, model, hf = qwen3_next
    first = random_ids(1, 11, seed=12)
    second = torch.cat([first[:, :6], random_ids(1, 4, seed=13)], dim=1)
    with model.inference_session(max_length=64) as session:
        assert session.recurrent
        hidden = session.step(model.head.embed(first[:, :8]))
        hidden = session.step(model.head.embed(first[:, 8:]))
        assert max_diff(model.head.logits(hidden), hf(first).logits[:, 8:]) <= ATOL
        session.rewind(6)
        with caplog.at_level("INFO", logger="corolla.engine.client.session"):
            hidden = session.step(model.head.embed(second[:, 6:]))
        assert max_diff(model.head.logits(hidden), hf(second).logits[:, 6:]) <= ATOL
        assert session.failovers == 0  # a rewind bans nobody and replaces no server
        hidden = session.step(model.head.embed(first[:, :1]))  # and the session goes on from there
        assert max_diff(model.head.logits(hidden), hf(torch.cat([second, first[:, :1]], 1)).logits[:, -1:]) <= ATOL
    assert [r for r in caplog.records if "rewound to 6: replayed the recurrent states of 2 hops" in r.getMessage()]

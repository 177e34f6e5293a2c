"""Speculative decoding over a real two-server swarm: a local draft proposes, the swarm verifies in one step.

Greedy output must equal local transformers' greedy output whatever the draft proposes: a random draft (mostly
wrong), the target's own weights (mostly right), a draft that is always wrong; the servers' caches must hold only
accepted tokens (a continued session still matches), and a server killed mid-generation changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from swarm_helpers import client, hf_greedy, hf_model, random_ids, running_swarm
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.client.speculative import Drafter

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(120)]

SPANS = ["0:3", "3:6", "3:6"]  # two servers on the route; the second span has a spare for failover
NEW = 20


@dataclass
class Setup:
    path: Path
    swarm: Swarm
    model: DistributedModelForCausalLM
    hf: PreTrainedModel
    random_draft: PreTrainedModel


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    path = tiny_checkpoint("llama")
    other = make_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "draft", "llama", seed=7, num_hidden_layers=2)
    with running_swarm(path, SPANS, tmp_path_factory) as swarm, client(path, swarm, stall_timeout=1.0) as model:
        yield Setup(path, swarm, model, hf_model(path), hf_model(other))


class Contrarian(nn.Module):
    """A draft that always proposes the token its inner model likes least (so never the target's choice)."""

    def __init__(self, inner: PreTrainedModel) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor, cache: Any = None, use_cache: bool = True) -> Any:
        out = self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache)
        out.logits = -out.logits
        return out


def test_greedy_with_the_targets_own_weights_matches_transformers(setup: Setup) -> None:
    ids = random_ids(1, 8, seed=1)
    drafter = Drafter(setup.hf, num_tokens=4)
    with setup.model.inference_session(max_length=64) as session:
        out = setup.model.generate(ids, max_new_tokens=NEW, eos_token_id=[], session=session, draft_model=drafter)
        # The servers hold the prompt and every generated token but the last (pending): no rejected draft.
        assert session.position == ids.shape[1] + NEW - 1
    assert torch.equal(out, hf_greedy(setup.hf, ids, NEW, eos=False))
    assert drafter.stats.acceptance_rate > 0.8
    assert drafter.stats.rounds < NEW / 2  # several tokens per round trip


def test_greedy_with_a_random_draft_matches_transformers(setup: Setup) -> None:
    ids = random_ids(1, 6, seed=2)
    drafter = Drafter(setup.random_draft, num_tokens=3)
    out = setup.model.generate(ids, max_new_tokens=NEW, eos_token_id=[], assistant_model=drafter)
    assert torch.equal(out, hf_greedy(setup.hf, ids, NEW, eos=False))
    assert drafter.stats.rounds > 0 and drafter.stats.drafted > 0


def test_a_draft_that_is_always_wrong_still_gives_greedy_output(setup: Setup) -> None:
    ids = random_ids(1, 7, seed=3)
    drafter = Drafter(Contrarian(setup.hf), num_tokens=4)
    out = setup.model.generate(ids, max_new_tokens=12, eos_token_id=[], draft_model=drafter)
    assert torch.equal(out, hf_greedy(setup.hf, ids, 12, eos=False))
    assert drafter.stats.accepted == 0 and drafter.stats.drafted > 0
    assert drafter.stats.rounds == 11  # one token per round after the prompt's
    assert drafter.stats.drafted < 2 * drafter.stats.rounds  # the adaptive schedule drafts less and less


def test_a_continued_session_sees_only_accepted_tokens(setup: Setup) -> None:
    """Rejected drafts must leave the servers' caches: a second turn continues from the accepted tokens."""
    ids = random_ids(1, 6, seed=4)
    drafter = Drafter(Contrarian(setup.hf), num_tokens=3, adaptive=False)  # every round: 3 drafts, all rejected
    with setup.model.inference_session(max_length=64) as session:
        first = setup.model.generate(ids, max_new_tokens=8, eos_token_id=[], session=session, draft_model=drafter)
        second = setup.model.generate(None, max_new_tokens=8, eos_token_id=[], session=session, draft_model=drafter)
    expected = hf_greedy(setup.hf, ids, 16, eos=False)
    assert torch.equal(torch.cat([first, second], dim=1), expected)


def test_repetition_penalty_and_eos_match_plain_decoding(setup: Setup) -> None:
    ids = random_ids(1, 6, seed=5)
    plain = setup.model.generate(ids, max_new_tokens=NEW, repetition_penalty=1.3, eos_token_id=[])
    eos = int(plain[0, ids.shape[1] + 5])  # a token the plain run emits: both must stop at its first occurrence
    plain_eos = setup.model.generate(ids, max_new_tokens=NEW, repetition_penalty=1.3, eos_token_id=eos)
    drafter = Drafter(setup.hf, num_tokens=4)
    spec = setup.model.generate(ids, max_new_tokens=NEW, repetition_penalty=1.3, eos_token_id=[], draft_model=drafter)
    spec_eos = setup.model.generate(
        ids, max_new_tokens=NEW, repetition_penalty=1.3, eos_token_id=eos, draft_model=drafter
    )
    assert torch.equal(spec, plain)
    assert torch.equal(spec_eos, plain_eos)
    assert plain_eos.shape[1] < plain.shape[1]


def test_sampling_with_a_draft_keeps_seeded_runs_reproducible(setup: Setup) -> None:
    ids = random_ids(1, 6, seed=6)
    drafter = Drafter(setup.hf, num_tokens=4)
    kwargs: dict[str, Any] = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=40, seed=11)
    a = setup.model.generate(ids, eos_token_id=[], draft_model=drafter, **kwargs)
    b = setup.model.generate(ids, eos_token_id=[], draft_model=drafter, **kwargs)
    assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + NEW)
    assert drafter.stats.acceptance_rate > 0.8  # the same model as draft: p / q is about 1 at every position


def test_server_killed_mid_generation_keeps_greedy_output(setup: Setup) -> None:
    ids = random_ids(1, 8, seed=8)
    drafter = Drafter(setup.random_draft, num_tokens=3)  # mixed accepts and rejects: the history is cut often
    killed: list[str] = []

    class Killer:
        def __init__(self, session: Any) -> None:
            self.session, self.count = session, 0

        def put(self, ids: torch.Tensor) -> None:
            self.count += 1
            if self.count == 8 and not killed:  # the prompt and 6 generated tokens went by
                peer = self.session.hops[1].stream.peer_id
                server = next(s for s in setup.swarm.servers if s.peer_id == peer)
                killed.append(peer)
                server.kill()

        def end(self) -> None:
            pass

    try:
        with setup.model.inference_session(max_length=64) as session:
            out = setup.model.generate(
                ids, max_new_tokens=NEW, eos_token_id=[], session=session, streamer=Killer(session), draft_model=drafter
            )
            assert session.failovers == 1
            assert session.position == ids.shape[1] + NEW - 1
    finally:
        for server in list(setup.swarm.servers):
            if not server.alive():
                server.stop(grace=1)  # reaps it and its DHT process
                setup.swarm.servers.remove(server)
    assert killed
    assert torch.equal(out, hf_greedy(setup.hf, ids, NEW, eos=False))


def test_default_draft_from_from_pretrained_drives_text_generation(setup: Setup) -> None:
    drafter = Drafter(setup.hf, num_tokens=4)
    with DistributedModelForCausalLM.from_pretrained(
        str(setup.path), initial_peers=setup.swarm.initial_peers, draft=drafter, step_timeout=20.0
    ) as model:
        assert model.drafter is drafter
        text = model.generate_text("abc", max_new_tokens=10).text
        assert drafter.stats.rounds > 0
        assert text == setup.model.generate_text("abc", max_new_tokens=10).text
        # A batch with the model's default draft decodes plainly; an explicit draft refuses it clearly.
        batch = random_ids(2, 5, seed=9)
        assert torch.equal(
            model.generate(batch, max_new_tokens=4, eos_token_id=[]), hf_greedy(setup.hf, batch, 4, eos=False)
        )
        with pytest.raises(ValueError, match="one sequence at a time"):
            model.generate(batch, max_new_tokens=4, draft_model=setup.hf)


def test_bad_drafts_are_refused_clearly(setup: Setup, tmp_path: Path) -> None:
    ids = random_ids(1, 4, seed=10)
    small_vocab = make_tiny_checkpoint(tmp_path / "v", "llama", seed=1, num_hidden_layers=1, vocab_size=50)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        setup.model.generate(ids, max_new_tokens=2, draft_model=AutoModelForCausalLM.from_pretrained(small_vocab))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        setup.model.generate(ids, max_new_tokens=2, draft_model=setup.hf, num_draft_tokens=0)
    with pytest.raises(TypeError, match="causal LM"):
        setup.model.generate(ids, max_new_tokens=2, draft_model=object())
    began = time.perf_counter()
    assert setup.model.generate(ids, max_new_tokens=2, draft_model=setup.hf).shape == (1, 6)
    assert time.perf_counter() - began < 30

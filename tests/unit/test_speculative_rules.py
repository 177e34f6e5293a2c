"""Speculative decoding's pure parts: the acceptance rules, and the draft's own cache."""

from __future__ import annotations

import pytest
import torch

from corolla.engine.apps.tiny_models import tiny_config
from corolla.engine.client.hops import Hop
from corolla.engine.client.sampling import SamplingParams
from corolla.engine.client.speculative import (
    MAX_DRAFT_TOKENS,
    Drafter,
    SpeculationStats,
    accept_greedy,
    accept_sampled,
    as_drafter,
    next_draft_tokens,
)


def test_greedy_keeps_drafts_up_to_the_first_disagreement_then_the_targets_token() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 9, 4]) == [5, 6, 9]
    assert accept_greedy([5, 6, 7], [1, 6, 7, 4]) == [1]
    assert accept_greedy([5, 6, 7], [5, 6, 7, 4]) == [5, 6, 7, 4]  # all agree: the target's next one too
    assert accept_greedy([], [3]) == [3]


def test_speculative_sampling_draws_each_token_from_the_targets_distribution() -> None:
    """Whatever the draft's q, the first token a round yields is distributed as the target's p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    accepted = 0
    runs = 20000
    for _ in range(runs):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        out = accept_sampled([d], q, p, gen)
        counts[out[0]] += 1
        accepted += len(out) == 2
    freq = counts / runs
    assert torch.allclose(freq, p[0], atol=0.015), freq
    # Acceptance probability is sum_x min(p, q) = 0.1 + 0.2 + 0.15 + 0.05 = 0.5.
    assert abs(accepted / runs - 0.5) < 0.02


def test_sampling_with_the_same_distribution_accepts_everything() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 10, generator=gen), -1)
    for _ in range(200):
        drafts = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        assert accept_sampled(drafts, p[:3], p, gen)[:3] == drafts


@pytest.fixture(scope="module")
def tiny_draft() -> Drafter:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return Drafter(LlamaForCausalLM(tiny_config("llama", num_hidden_layers=2)).eval(), num_tokens=3)


def test_the_draft_cache_rolls_back_to_the_ids_it_shares(tiny_draft: Drafter) -> None:
    """After a rejected round the draft reuses its cache for the shared prefix: proposals equal a fresh run's."""
    greedy = SamplingParams()
    ids = torch.randint(7, 150, (1, 9), generator=torch.Generator().manual_seed(2))
    run = tiny_draft.run(160)
    first, _ = run.propose(ids, 3, greedy, None)
    # The target took the first draft only, then its own token 42: the draft's cache must drop the other two.
    later = torch.cat([ids, first[:, :1], torch.tensor([[42]])], dim=1)
    again, _ = run.propose(later, 3, greedy, None)
    fresh, _ = tiny_draft.run(160).propose(later, 3, greedy, None)
    assert torch.equal(again, fresh)
    # A draft with a larger vocabulary than the target's never proposes ids past the target's.
    small, _ = tiny_draft.run(20).propose(ids, 3, greedy, None)
    assert int(small.max()) < 20


def test_draft_settings_are_checked(tiny_draft: Drafter) -> None:
    with pytest.raises(ValueError, match="num_draft_tokens"):
        Drafter(tiny_draft.model, num_tokens=0)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        tiny_draft.check_vocab(32000, None)
    tiny_draft.check_vocab(200, 150)  # a padded vocabulary that covers the tokenizer is fine
    with pytest.raises(TypeError, match="causal LM"):
        Drafter(42)
    assert as_drafter(None) is None
    assert SpeculationStats(rounds=2, drafted=8, accepted=6).tokens_per_round == 4.0


def test_a_hops_history_is_cut_at_the_kept_position() -> None:
    """Rejected drafts leave the replay history: what a failover replays is the accepted tokens only."""
    chunks = [torch.randn(1, n, 4) for n in (5, 1, 4)]
    hop = Hop(stream=None, inputs=list(chunks))  # type: ignore[arg-type]
    hop.truncate(8)
    assert [x.shape[1] for x in hop.inputs] == [5, 1, 2]
    assert torch.equal(hop.history(8), torch.cat(chunks, dim=1)[:, :8])
    hop.truncate(6)
    assert [x.shape[1] for x in hop.inputs] == [5, 1]
    hop.truncate(3)
    assert torch.equal(hop.history(3), chunks[0][:, :3])
    hop.truncate(0)
    assert hop.inputs == []


def test_the_adaptive_schedule_drafts_more_after_full_accepts_and_fewer_after_rejections() -> None:
    assert next_draft_tokens(4, 4, 4) == 6
    assert next_draft_tokens(4, 4, 3) == 3
    assert next_draft_tokens(1, 1, 0) == 1  # never below one
    assert next_draft_tokens(MAX_DRAFT_TOKENS, MAX_DRAFT_TOKENS, MAX_DRAFT_TOKENS) == MAX_DRAFT_TOKENS
    assert next_draft_tokens(5, 0, 0) == 5  # a round that drafted nothing (the end of the budget) changes nothing

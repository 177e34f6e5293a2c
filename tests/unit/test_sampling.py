"""Sampling matches transformers' own logits processors (the order and semantics generate() uses)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from corolla.engine.client.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_tokens,
)

VOCAB = 50


def random_case(seed: int, batch: int = 4, seen_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=gen) * 3  # [batch, vocab]
    seen = torch.randint(0, VOCAB, (batch, seen_len), generator=gen)  # [batch, n], repeats included
    return logits, seen


def assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same kept (finite) set, same values on it."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed: int, penalty: float) -> None:
    logits, seen = random_case(seed)
    ours = apply_repetition_penalty(logits.clone(), seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    torch.testing.assert_close(ours, theirs)
    changed = (ours != logits).any(-1)
    assert bool(changed.all())  # every row has seen tokens, so every row changes


def test_repetition_penalty_does_not_modify_its_input() -> None:
    logits, seen = random_case(0)
    before = logits.clone()
    apply_repetition_penalty(logits, seen, 1.5)
    assert torch.equal(logits, before)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits
    assert torch.equal(apply_repetition_penalty(logits, seen[:, :0], 1.5), logits)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 7, VOCAB - 1, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(seed: int, k: int) -> None:
    logits, seen = random_case(seed)
    ours = filter_top_k(logits.clone(), k)
    theirs = TopKLogitsWarper(k)(seen, logits.clone())
    assert_same_filter(ours, theirs)
    assert int(torch.isfinite(ours).sum(-1).max()) == min(k, VOCAB)


def test_top_k_zero_keeps_everything() -> None:
    logits, _ = random_case(0)
    assert torch.equal(filter_top_k(logits, 0), logits)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(seed: int, p: float) -> None:
    logits, seen = random_case(seed)
    ours = filter_top_p(logits.clone(), p)
    theirs = TopPLogitsWarper(p)(seen, logits.clone())
    assert_same_filter(ours, theirs)
    assert bool(torch.isfinite(ours).any(-1).all())  # at least one token survives in every row


def test_top_p_one_keeps_everything_and_tiny_p_keeps_the_argmax() -> None:
    logits, _ = random_case(1)
    assert torch.equal(filter_top_p(logits, 1.0), logits)
    tiny = filter_top_p(logits, 1e-6)
    assert torch.equal(torch.isfinite(tiny).sum(-1), torch.ones(logits.shape[0], dtype=torch.long))
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("seed", range(4))
def test_full_warper_chain_matches_transformers(seed: int) -> None:
    """penalty → temperature → top-k → top-p, as transformers' generate() orders them."""
    logits, seen = random_case(seed)
    penalty, temperature, k, p = 1.2, 0.7, 10, 0.9
    ours = filter_top_p(filter_top_k(apply_repetition_penalty(logits, seen, penalty) / temperature, k), p)
    theirs = logits.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(penalty),
        TemperatureLogitsWarper(temperature),
        TopKLogitsWarper(k),
        TopPLogitsWarper(p),
    ):
        theirs = processor(seen, theirs)
    assert_same_filter(ours, theirs)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax_after_penalty(seed: int) -> None:
    logits, seen = random_case(seed)
    params = SamplingParams(repetition_penalty=1.5)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(seen, logits.clone()).argmax(-1)
    assert torch.equal(next_tokens(logits, seen, params), expected)


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.8, -1.0]])
    seen = torch.tensor([[1]])
    assert int(next_tokens(logits, seen, SamplingParams())) == 1
    assert int(next_tokens(logits, seen, SamplingParams(repetition_penalty=1.2))) == 2


def test_greedy_ignores_sampling_knobs() -> None:
    logits, seen = random_case(3)
    greedy = next_tokens(logits, seen, SamplingParams())
    assert torch.equal(greedy, logits.argmax(-1))
    knobs = SamplingParams(do_sample=False, temperature=0.0, top_k=1, top_p=0.01)
    assert torch.equal(next_tokens(logits, seen, knobs), greedy)


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits, seen = random_case(5, batch=64)
    params = SamplingParams(do_sample=True, temperature=1.5)

    def draw(seed: int) -> torch.Tensor:
        return next_tokens(logits, seen, params, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_samples_stay_in_the_filtered_set() -> None:
    logits, seen = random_case(6, batch=8)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5, top_p=0.7, repetition_penalty=1.3)
    allowed = logits.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(5),
        TopPLogitsWarper(0.7),
    ):
        allowed = processor(seen, allowed)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        token = next_tokens(logits, seen, params, gen)  # [batch]
        assert bool(torch.isfinite(allowed.gather(1, token[:, None])).all())


def test_sampling_frequencies_follow_transformers_probabilities() -> None:
    rows = 20000
    base = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    logits = base.expand(rows, -1)
    seen = torch.zeros(rows, 0, dtype=torch.long)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=4, top_p=0.95)
    warped = TopPLogitsWarper(0.95)(seen, TopKLogitsWarper(4)(seen, TemperatureLogitsWarper(0.9)(seen, base.clone())))
    probs = warped.softmax(-1)[0]
    tokens = next_tokens(logits, seen, params, torch.Generator().manual_seed(0))
    freqs = torch.bincount(tokens, minlength=base.shape[1]).float() / rows
    torch.testing.assert_close(freqs, probs, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": True, "temperature": 0.0},
        {"do_sample": True, "temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -2.0},
    ],
)
def test_invalid_params_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_valid_edge_params_are_accepted() -> None:
    SamplingParams(temperature=0.0)  # greedy ignores temperature
    SamplingParams(do_sample=True, top_p=1.0, top_k=0, repetition_penalty=1.0)


def test_from_temperature_holds_the_greedy_rule() -> None:
    greedy = SamplingParams.from_temperature(0.0, top_p=0.5, seed=3)
    assert (greedy.do_sample, greedy.temperature, greedy.top_p, greedy.seed) == (False, 1.0, 0.5, 3)
    sampled = SamplingParams.from_temperature(0.7, top_k=None, repetition_penalty=None)
    assert sampled == SamplingParams(do_sample=True, temperature=0.7)

"""Every family through a real two-server swarm reproduces the local transformers model exactly: logits,
cached decoding, greedy generation, and the gradients of the inputs and of deep prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference_grads import reference_block_grads
from swarm_helpers import ATOL, FAMILY_OVERRIDES, client, hf_greedy, hf_model, max_diff, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.client.route_autograd import remote_blocks

pytestmark = pytest.mark.swarm

DECODE_STEPS = 10
RTOL = 1e-4  # gradients: relative to the largest magnitude of the reference


@dataclass
class FamilySwarm:
    family: str
    model: DistributedModelForCausalLM
    hf: PreTrainedModel


@pytest.fixture(scope="module", params=sorted(FAMILY_OVERRIDES))
def family_swarm(
    request: pytest.FixtureRequest,
    tiny_checkpoint: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FamilySwarm]:
    """Blocks 0:3 and 3:6 of one family's tiny checkpoint on two server processes, and a client."""
    family: str = request.param
    path = tiny_checkpoint(family, **FAMILY_OVERRIDES[family])
    with running_swarm(path, ["0:3", "3:6"], tmp_path_factory) as swarm, client(path, swarm) as model:
        yield FamilySwarm(family, model, hf_model(path))


@pytest.mark.timeout(120)
@torch.inference_mode()
def test_forward_logits_match_transformers(family_swarm: FamilySwarm) -> None:
    ids = random_ids(2, 12, seed=1)
    logits = family_swarm.model(ids).logits  # transformers-style output, as Petals users read it
    expected = family_swarm.hf(ids).logits
    assert max_diff(logits, expected) <= ATOL


@pytest.mark.timeout(60)
@torch.inference_mode()
def test_cached_decode_steps_match_transformers(family_swarm: FamilySwarm) -> None:
    model, hf = family_swarm.model, family_swarm.hf
    ids = random_ids(2, 6, seed=2)
    later = random_ids(2, DECODE_STEPS, seed=3)  # fed one at a time, as a decoding loop would
    with model.inference_session(max_length=ids.shape[1] + DECODE_STEPS) as session:
        hidden = session.step(model.head.embed(ids))
        assert max_diff(model.head.logits(hidden), hf(ids).logits) <= ATOL
        for i in range(DECODE_STEPS):
            token = later[:, i : i + 1]
            ids = torch.cat([ids, token], dim=1)
            hidden = session.step(model.head.embed(token))  # [2, 1, hidden]
            expected = hf(ids).logits[:, -1:]
            assert max_diff(model.head.logits(hidden), expected) <= ATOL, f"step {i}"
        assert session.position == ids.shape[1]
        assert [(h.start, h.end) for h in session.hops] == [(0, 3), (3, 6)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_matches_transformers(family_swarm: FamilySwarm, batch: int) -> None:
    model, hf = family_swarm.model, family_swarm.hf
    ids = random_ids(batch, 7, seed=4 + batch)
    # EOS disabled on both sides: both run the full length, every token is compared.
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (batch, 7 + 12)
    assert torch.equal(out, hf_greedy(hf, ids, 12, eos=False))
    # Default EOS handling (stop early, pad finished rows) agrees with transformers as well.
    assert torch.equal(model.generate(ids, max_new_tokens=12), hf_greedy(hf, ids, 12))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.timeout(60)
def test_input_and_deep_prompt_gradients_match_autograd(family_swarm: FamilySwarm) -> None:
    """Backward through both servers equals transformers' own autograd on the same weights (fp32)."""
    model, hf = family_swarm.model, family_swarm.hf
    hidden_size, num_blocks = int(hf.config.hidden_size), int(hf.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(7)
    # 7 positions: longer than the sliding windows (4 or 5) of the families that have one.
    hidden = torch.randn(2, 7, hidden_size, generator=gen).requires_grad_(True)
    prompts = (torch.randn(num_blocks, 2, 3, hidden_size, generator=gen) * 0.5).requires_grad_(True)
    grad_out = torch.randn(2, 7, hidden_size, generator=gen)
    out = remote_blocks(hidden, prompts, model.remote_blocks)
    out.backward(grad_out)
    trace = model.remote_blocks.last_trace
    assert [(step.hop.start, step.hop.end) for step in trace] == [(0, 3), (3, 6)]  # both servers took part
    out_ref, grad_ref, prompts_ref = reference_block_grads(hf, hidden, grad_out, prompts)
    assert hidden.grad is not None and prompts.grad is not None and prompts_ref is not None
    assert rel_diff(out.detach(), out_ref) <= RTOL
    assert rel_diff(hidden.grad, grad_ref) <= RTOL
    assert rel_diff(prompts.grad, prompts_ref) <= RTOL
    assert float(prompts_ref[:3].abs().max()) > 0 and float(prompts_ref[3:].abs().max()) > 0  # both spans count

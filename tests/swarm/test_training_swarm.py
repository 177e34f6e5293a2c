"""Training and LoRA adapters through one real swarm (tiny Llama; servers 0:3 and 3:6 serving a PEFT LoRA
adapter, and a second 3:6 without it).

Gradients of the inputs and of deep prompts equal transformers' own autograd; an adapter served remotely
gives PEFT's local logits, greedy tokens and gradients, and routes avoid the server without it; prompt
tuning lowers the loss with a standard optimizer; trained prompts save and load; a batch split into
micro-batches gives the whole batch's results; a server killed in the middle of a backward is routed around
and the loss curve stays the same. Every family's gradients through a swarm are checked in
tests/swarm/test_swarm_families.py (on its swarms), and at the server's level in
tests/unit/test_training_backend.py. The tests run in file order: the kill comes after the adapter tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from reference_grads import reference_block_grads
from swarm_helpers import client, hf_model, random_ids, running_swarm, track

from corolla.engine import (
    CorollaError,
    DistributedModelForCausalLM,
    DistributedModelForSequenceClassification,
    MissingBlocksError,
    ProtocolError,
)
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.client.remote_training import remote_train_call
from corolla.engine.client.route_autograd import RemoteBlocks, remote_blocks
from corolla.engine.routing.sequence_manager import with_adapter
from corolla.engine.wire.training import TrainRequest

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(240)]

RTOL = 1e-4
SPANS = ["0:3", "3:6", "3:6"]  # the first two serve the adapter
ADAPTER = "tiny-lora"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("training") / "tiny-llama", "llama", seed=5)


@pytest.fixture(scope="module")
def adapter(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A PEFT LoRA adapter with random (non-zero) weights on attention and MLP layers, and its local model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(hf_model(checkpoint), config).eval()
    folder = tmp_path_factory.mktemp("adapters") / ADAPTER
    peft_model.save_pretrained(folder)
    return folder, peft_model


@pytest.fixture(scope="module")
def swarm(checkpoint: Path, adapter: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with running_swarm(checkpoint, [], tmp_path_factory) as s:
        lora = ["--adapters", str(adapter[0])]
        for span, extra in zip(SPANS, [lora, lora, []], strict=True):
            s.add_server(span, wait=False, extra_args=extra)
        s.wait_ready()
        track(*s.servers)
        yield s


@pytest.fixture
def model(checkpoint: Path, swarm: Swarm) -> Iterator[DistributedModelForCausalLM]:
    with client(checkpoint, swarm, tuning_mode="deep_ptune", pre_seq_len=3, min_backoff=30.0) as m:
        yield m


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_input_and_deep_prompt_gradients_equal_local_autograd(
    checkpoint: Path, model: DistributedModelForCausalLM
) -> None:
    hf = hf_model(checkpoint)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 64, generator=gen).requires_grad_(True)
    prompts = (torch.randn(6, 2, 3, 64, generator=gen) * 0.5).requires_grad_(True)
    grad_out = torch.randn(2, 6, 64, generator=gen)
    out = remote_blocks(hidden, prompts, model.remote_blocks)
    (out * grad_out).sum().backward()
    assert len(model.remote_blocks.last_trace) == 2  # two servers: 0:3 and 3:6
    out_ref, grad_ref, prompts_ref = reference_block_grads(hf, hidden, grad_out, prompts)
    assert rel_diff(out.detach(), out_ref) <= RTOL
    assert hidden.grad is not None and prompts.grad is not None and prompts_ref is not None
    assert rel_diff(hidden.grad, grad_ref) <= RTOL
    assert rel_diff(prompts.grad, prompts_ref) <= RTOL
    # The same batch as micro-batches of one sequence (each its own route and calls): the same results.
    cfg = dataclasses.replace(model.client_config, micro_batch_size=1)
    split = RemoteBlocks(model.context.with_config(cfg))
    x, p = hidden.detach().requires_grad_(True), prompts.detach().requires_grad_(True)
    out_split = remote_blocks(x, p, split)
    (out_split * grad_out).sum().backward()
    assert x.grad is not None and p.grad is not None
    assert rel_diff(out_split.detach(), out.detach()) <= 1e-6
    assert rel_diff(x.grad, hidden.grad) <= 1e-6
    assert rel_diff(p.grad, prompts.grad) <= 1e-6


def test_malformed_training_calls_get_errors_and_the_server_keeps_serving(
    model: DistributedModelForCausalLM, swarm: Swarm
) -> None:
    first = swarm.servers[0].peer_id
    assert first is not None
    x = torch.randn(1, 4, 64)

    def call(req: TrainRequest, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return model.loop.run(remote_train_call(model.p2p, first, req, tensors, 1 << 20, 20.0))

    forward = TrainRequest(kind="forward", start=0, end=3, batch=1, length=4)
    with pytest.raises(ProtocolError, match="more than"):
        call(forward, [torch.randn(1, 5, 64)])  # more values than the header announced
    with pytest.raises(ProtocolError, match="not hosted"):
        call(TrainRequest(kind="backward", start=0, end=6, batch=1, length=4), [x, x])
    with pytest.raises(ProtocolError, match="NaN"):
        call(TrainRequest(kind="backward", start=0, end=3, batch=1, length=4), [x, torch.full_like(x, float("nan"))])
    with pytest.raises(ProtocolError, match="adapter"):
        call(TrainRequest(kind="forward", start=0, end=3, batch=1, length=4, adapter="not-served"), [x])
    (out,) = call(forward, [x])  # and then it serves a good call
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_adapter_served_remotely_equals_peft_locally(checkpoint: Path, swarm: Swarm, adapter: tuple[Path, Any]) -> None:
    peft_model = adapter[1]
    ids = random_ids(2, 6, seed=3)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert float((expected - base).abs().max()) > 1e-2  # the adapter changes the answer
    with client(checkpoint, swarm, active_adapter=ADAPTER) as model:
        for _ in range(3):  # several routes: none may go through the server without the adapter
            assert rel_diff(model(ids).logits, expected) <= RTOL
        with_lora = {swarm.servers[0].peer_id, swarm.servers[1].peer_id}
        assert set(model.manager.spans) == {*with_lora, swarm.servers[2].peer_id}  # it sees all three
        assert set(with_adapter(model.manager.spans, ADAPTER)) == with_lora  # and plans over two
        prompt = ids[:1]
        want = peft_model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=None,
            min_new_tokens=5,
            pad_token_id=0,
        )
        assert torch.equal(model.generate(prompt, max_new_tokens=5, eos_token_id=[]), want)  # sessions use it too
        # Gradients through the adapter's blocks equal PEFT's.
        gen = torch.Generator().manual_seed(4)
        hidden = torch.randn(1, 5, 64, generator=gen).requires_grad_(True)
        grad_out = torch.randn(1, 5, 64, generator=gen)
        (remote_blocks(hidden, None, model.remote_blocks) * grad_out).sum().backward()
        _, grad_ref, _ = reference_block_grads(peft_model, hidden, grad_out, None)
        assert hidden.grad is not None and rel_diff(hidden.grad, grad_ref) <= RTOL
        assert {step.hop.peer_id for step in model.remote_blocks.last_trace} == with_lora
    with client(checkpoint, swarm) as plain:
        assert rel_diff(plain(ids).logits, base) <= RTOL  # without an adapter: the base model
        with plain.inference_session(max_length=16, active_adapter=ADAPTER) as session:  # one session picks it
            assert torch.equal(plain.generate(prompt, max_new_tokens=5, eos_token_id=[], session=session), want)
    with client(checkpoint, swarm, active_adapter="not-served") as nowhere, pytest.raises(MissingBlocksError):
        nowhere(ids)


def adam_losses(
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    ids: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    on_loss: Callable[[int, torch.Tensor], None] = lambda step, loss: None,
) -> list[float]:
    """``steps`` Adam steps of ``model(ids, labels=labels).loss`` on one fixed batch; the losses seen.

    ``on_loss(step, loss)`` runs before each backward (to interfere with it).
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = model(ids, labels=labels).loss
        on_loss(step, loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def train(model: DistributedModelForCausalLM, steps: int, kill: Swarm | None = None) -> list[float]:
    """A few Adam steps of deep prompt tuning on one fixed batch, from the same start every time.

    With ``kill``, the server of the last hop is killed at the start of step 1's backward; the client
    must have avoided it (banned) to finish.
    """
    ptune = model.enable_prompt_tuning("deep_ptune", 3)  # same seed: the same starting prompts
    victims: list[str] = []

    def kill_last_hop(step: int, loss: torch.Tensor) -> None:
        if kill is None or step != 1:
            return
        # Kill the server of the last hop just before the backward needs it.
        victim = model.remote_blocks.last_trace[-1].hop.peer_id
        server = next(s for s in kill.servers if s.alive() and s.peer_id == victim)
        loss.register_hook(lambda g: (server.kill(), g)[1])
        victims.append(victim)

    ids = random_ids(2, 8, seed=9)
    losses = adam_losses(model, ptune.parameters(), ids, ids, steps, lr=0.05, on_loss=kill_last_hop)
    assert all(victim in model.manager.banned() for victim in victims)
    return losses


def test_prompt_tuning_lowers_the_loss_and_survives_a_killed_server(
    checkpoint: Path, model: DistributedModelForCausalLM, swarm: Swarm, tmp_path: Path
) -> None:
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"ptune.prompts", "ptune.deep"}
    clean = train(model, 4)
    assert clean[-1] < clean[0] - 0.05, clean
    assert model.ptune is not None
    model.ptune.save(tmp_path / "prompts.safetensors")
    trained = [p.detach().clone() for p in model.ptune.parameters()]
    # Again in micro-batches of one sequence (each retried on its own), with a server killed mid-backward.
    with client(checkpoint, swarm, tuning_mode="deep_ptune", pre_seq_len=3, min_backoff=30.0, micro_batch_size=1) as m:
        interrupted = train(m, 4, kill=swarm)
    assert sum(s.alive() for s in swarm.servers) == 2  # one of the 3:6 servers is gone
    assert max(abs(a - b) for a, b in zip(clean, interrupted, strict=True)) <= 1e-5, (clean, interrupted)
    model.ptune.load(tmp_path / "prompts.safetensors")
    for a, b in zip(model.ptune.parameters(), trained, strict=True):
        assert torch.equal(a.detach(), b)


def test_sequence_classification_matches_local_and_trains(checkpoint: Path, swarm: Swarm) -> None:
    alive = [s for s in swarm.servers if s.alive()]
    assert alive, "the swarm lost every server"
    with DistributedModelForSequenceClassification.from_pretrained(
        str(checkpoint), initial_peers=swarm.initial_peers, num_labels=3, step_timeout=20.0, connect_timeout=10.0
    ) as model:
        ids = random_ids(3, 5, seed=2)
        labels = torch.tensor([0, 2, 1])
        hf = hf_model(checkpoint)
        with torch.no_grad():
            last = hf(ids, output_hidden_states=True).hidden_states[-1][:, -1]  # after the final norm
            expected = model.score(last)
        out = model(ids, labels=labels)
        assert out.logits.shape == (3, 3) and rel_diff(out.logits.detach(), expected) <= RTOL
        losses = adam_losses(model, model.score.parameters(), ids, labels, 3, lr=0.1)
        assert losses[-1] < losses[0], losses


def test_peft_lora_on_the_local_head_trains(checkpoint: Path, swarm: Swarm) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    with client(checkpoint, swarm) as model:
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False), model.head)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2  # lora_A and lora_B of the head
        ids = random_ids(2, 6, seed=6)
        losses = adam_losses(model, trainable, ids, ids, 3, lr=0.05)
        assert losses[-1] < losses[0], losses


@pytest.mark.timeout(180)
@torch.no_grad()
def test_prompt_tuned_generation_runs_in_a_session_with_the_prompts_first(checkpoint: Path, swarm: Swarm) -> None:
    """A ``ptune`` model generates in one cached session whose first step carries its prompts: the tokens
    equal transformers' greedy decoding from the same prompts + embeddings, and sampling works too."""
    hf = hf_model(checkpoint)
    ids = random_ids(2, 5, seed=8)
    with client(checkpoint, swarm, tuning_mode="ptune", pre_seq_len=3) as model:
        assert model.ptune is not None
        model.ptune.prompts.normal_(generator=torch.Generator().manual_seed(5))  # prompts that change answers
        prompts = model.ptune.input_prompts(2).detach()
        want = ids
        for _ in range(4):  # transformers, no cache: the whole sequence each time
            embeds = torch.cat([prompts, hf.get_input_embeddings()(want)], dim=1)
            want = torch.cat([want, hf(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(model.generate(ids, max_new_tokens=4, eos_token_id=[]), want)
        sampled = model.generate(ids, max_new_tokens=4, do_sample=True, seed=3, eos_token_id=[])
        assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], ids)
        with model.inference_session(max_length=16) as session, pytest.raises(CorollaError, match="own session"):
            model.generate(ids, max_new_tokens=2, session=session)

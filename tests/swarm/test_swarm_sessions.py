"""Sessions over a three-server swarm: routes, concurrent clients, multi-turn reuse, text and chat."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from swarm_helpers import client, hf_greedy, hf_model, max_diff, peer_id, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.client.remote import remote_info
from corolla.engine.client.session import InferenceSession
from corolla.engine.wire.commitment import verify_commitment

pytestmark = pytest.mark.swarm

SPANS = ["0:2", "2:4", "4:6"]


@dataclass
class ThreeServers:
    path: Path
    swarm: Swarm
    model: DistributedModelForCausalLM
    hf: PreTrainedModel


@pytest.fixture(scope="module")
def three(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeServers]:
    """Blocks 0:2, 2:4 and 4:6 of the tiny llama on three server processes, and one client."""
    path = tiny_checkpoint("llama")
    with running_swarm(path, SPANS, tmp_path_factory) as swarm, client(path, swarm) as model:
        yield ThreeServers(path, swarm, model, hf_model(path))


def tokens_processed(model: DistributedModelForCausalLM, peers: list[str]) -> int:
    """Tokens the given servers have computed so far, summed (their info RPC's counter)."""
    return sum(int(model.loop.run(remote_info(model.p2p, peer, 10.0))["tokens_processed"]) for peer in peers)


def rows_batched(model: DistributedModelForCausalLM, peers: list[str]) -> int:
    """Decode rows the given servers ran in one forward with another session's, summed."""
    return sum(int(model.loop.run(remote_info(model.p2p, peer, 10.0))["rows_batched"]) for peer in peers)


@pytest.mark.timeout(120)
def test_session_route_uses_all_three_servers(three: ThreeServers) -> None:
    ids = random_ids(1, 8, seed=10)
    with three.model.inference_session(max_length=32) as session:
        out = three.model.generate(ids, max_new_tokens=10, eos_token_id=[], session=session)
        assert [(h.start, h.end) for h in session.hops] == [(0, 2), (2, 4), (4, 6)]
        assert len({h.stream.peer_id for h in session.hops}) == 3
    assert torch.equal(out, hf_greedy(three.hf, ids, 10, eos=False))


@pytest.mark.timeout(60)
def test_concurrent_clients_each_match_transformers(three: ThreeServers) -> None:
    prompts = [random_ids(1 + i % 2, 6 + i, seed=20 + i) for i in range(4)]
    expected = [hf_greedy(three.hf, p, 12, eos=False) for p in prompts]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    with client(three.path, three.swarm) as second:
        models = [three.model, second, three.model, second]  # two clients, two threads each

        def run(i: int) -> None:
            try:
                results[i] = models[i].generate(prompts[i], max_new_tokens=12, eos_token_id=[])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=50)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for i in range(4):
        assert torch.equal(results[i], expected[i]), f"generation {i}"


@pytest.mark.timeout(60)
def test_multi_turn_sends_only_new_tokens(three: ThreeServers) -> None:
    model = three.model
    first, second = random_ids(2, 7, seed=30), random_ids(2, 4, seed=31)
    n = 6
    with model.inference_session(max_length=40) as session:
        out1 = model.generate(first, max_new_tokens=n, eos_token_id=[], session=session)
        # The last sampled token is not fed yet: it goes with the next turn.
        assert session.position == first.shape[1] + n - 1
        peers = [h.stream.peer_id for h in session.hops]
        before = tokens_processed(model, peers)
        out2 = model.generate(second, max_new_tokens=n, eos_token_id=[], session=session)
        sent = 1 + second.shape[1] + n - 1  # pending token, the new turn, then one token per step
        assert session.position == first.shape[1] + n - 1 + sent
        assert tokens_processed(model, peers) - before == len(peers) * 2 * sent  # batch of 2 on each server
    assert torch.equal(out1, hf_greedy(three.hf, first, n, eos=False))
    conversation = torch.cat([out1, second], dim=1)
    assert torch.equal(out2, hf_greedy(three.hf, conversation, n, eos=False)[:, out1.shape[1] :])


def server_counts(model: DistributedModelForCausalLM, peers: list[str], name: str) -> list[int]:
    """One counter of each of the given servers (their info RPC's)."""
    return [int(model.loop.run(remote_info(model.p2p, peer, 10.0))[name]) for peer in peers]


@pytest.mark.timeout(60)
def test_sessions_sharing_a_system_prompt_reuse_every_servers_prefix_cache(three: ThreeServers) -> None:
    model = three.model
    block = 128  # the servers' prefix_block_tokens (default)
    system = random_ids(1, block + 20, seed=40)  # one whole block and a bit
    prompts = [torch.cat([system, random_ids(1, 5 + i, seed=41 + i)], dim=1) for i in range(2)]
    n = 4
    outputs = []
    with model.inference_session(max_length=200) as session:
        outputs.append(model.generate(prompts[0], max_new_tokens=n, eos_token_id=[], session=session))
        peers = [h.stream.peer_id for h in session.hops]
    reused = server_counts(model, peers, "prefix_tokens_reused")
    computed = server_counts(model, peers, "tokens_computed")
    with model.inference_session(max_length=200) as session:
        outputs.append(model.generate(prompts[1], max_new_tokens=n, eos_token_id=[], session=session))
        assert [h.stream.peer_id for h in session.hops] == peers
    # Every server copied the system prompt's block (the first server's outputs, bit for bit, made the next
    # server's inputs identical too) and computed only the rest of the prompt and the decode steps.
    assert [a - b for a, b in zip(server_counts(model, peers, "prefix_tokens_reused"), reused, strict=True)] == [
        block
    ] * len(peers)
    new = prompts[1].shape[1] - block + n - 1
    assert [a - b for a, b in zip(server_counts(model, peers, "tokens_computed"), computed, strict=True)] == [
        new
    ] * len(peers)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert torch.equal(out, hf_greedy(three.hf, prompt, n, eos=False))


def _greedy_text(three: ThreeServers, prompt: str, max_new_tokens: int) -> str:
    tok = three.model.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf_greedy(three.hf, ids, max_new_tokens)
    text: str = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text


@pytest.mark.timeout(60)
def test_stream_text_applies_stop_strings(three: ThreeServers) -> None:
    prompt = "The quick brown fox"
    full = _greedy_text(three, prompt, 24)
    stop = full[3:5]  # a stop string the greedy continuation really contains
    assert len(stop) == 2, f"greedy continuation too short to test stops: {full!r}"
    expected = full[: full.index(stop)]
    stream = three.model.stream_text(prompt, max_new_tokens=24, stop=[stop, "never-generated"])
    pieces = list(stream)
    assert "".join(pieces) == expected == stream.text
    assert stream.finish_reason == "stop"
    # Without stops the text is the whole greedy continuation.
    assert three.model.generate_text(prompt, max_new_tokens=24).text == full


@pytest.mark.timeout(60)
def test_chat_matches_transformers_up_to_the_stop(three: ThreeServers) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = three.model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = _greedy_text(three, prompt, 16)
    stop = full[3:5]
    assert len(stop) == 2, f"greedy continuation too short to test stops: {full!r}"
    result = three.model.chat(messages, max_new_tokens=16, stop=[stop])
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == len(three.model.tokenizer(prompt).input_ids)


def generate_at_once(model: DistributedModelForCausalLM, prompts: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Greedy generations of ``prompts``, one thread each, all at once."""
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = model.generate(prompts[i], max_new_tokens=16, eos_token_id=[])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=80)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.timeout(90)
def test_concurrent_sessions_are_batched_and_match_transformers(three: ThreeServers) -> None:
    """Decode steps of sessions running at once share forwards on the servers; every output stays exact.

    Here each session sends its own messages (client batching off): the servers gather them."""
    prompts = [random_ids(1 + i % 2, 3 + i, seed=40 + i) for i in range(6)]
    expected = [hf_greedy(three.hf, p, 16, eos=False) for p in prompts]
    peers = [peer_id(server) for server in three.swarm.servers]
    before = rows_batched(three.model, peers)
    with client(three.path, three.swarm, batch_window=0.0) as apart:
        results = generate_at_once(apart, prompts)
        assert apart.decode_batcher.rounds == 0
    for i, want in enumerate(expected):
        assert torch.equal(results[i], want), f"generation {i}"
    assert rows_batched(three.model, peers) > before  # the servers really ran steps of sessions together


@pytest.mark.timeout(90)
def test_a_clients_sessions_step_in_one_message_and_match_transformers(
    three: ThreeServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions of one client on one route send their one-token steps together (one message per hop, one LM
    head): the client runs rounds of several sessions, the servers one forward for them, outputs stay exact.
    Each session's rows of a batched step come with the server's signature over that session's inputs."""
    signed: list[bool] = []  # per hop of each batched step taken: its signature verifies
    accept = InferenceSession.accept_batched_step

    async def checked(
        session: InferenceSession, inputs: list[torch.Tensor], outputs: list[torch.Tensor], *rest: Any
    ) -> bool:
        taken = await accept(session, inputs, outputs, *rest)
        for hop, out in zip(session.hops, outputs, strict=True) if taken else ():
            history = hop.history(session.position)
            commitment = hop.commitments[-1] if hop.commitments else None
            assert history is not None
            signed.append(
                commitment is not None
                and verify_commitment(
                    hop.stream.peer_id,
                    commitment,
                    model=session.manager.model,
                    start=hop.start,
                    end=hop.end,
                    inputs=history,
                    output=out,
                )
            )
        return taken

    monkeypatch.setattr(InferenceSession, "accept_batched_step", checked)
    prompts = [random_ids(1 + i % 2, 3 + i, seed=50 + i) for i in range(6)]
    expected = [hf_greedy(three.hf, p, 16, eos=False) for p in prompts]
    peers = [peer_id(server) for server in three.swarm.servers]
    before = rows_batched(three.model, peers)
    batcher = three.model.decode_batcher
    rounds, rows = batcher.rounds, batcher.rows
    results = generate_at_once(three.model, prompts)
    for i, want in enumerate(expected):
        assert torch.equal(results[i], want), f"generation {i}"
    assert batcher.rounds > rounds and batcher.rows - rows >= 2 * (batcher.rounds - rounds)
    assert rows_batched(three.model, peers) > before
    assert signed and all(signed), f"{signed.count(False)} of {len(signed)} batched rows unsigned or not verified"


@pytest.mark.timeout(60)
def test_bfloat16_wire_stays_close_to_transformers(three: ThreeServers) -> None:
    """The opt-in compressed wire: float32 servers take and answer bfloat16 activations; a small, nonzero error."""
    ids = random_ids(2, 10, seed=60)
    with client(three.path, three.swarm, wire_dtype="bfloat16") as light, torch.inference_mode():
        got = light(ids).logits
        want = three.hf(ids).logits
    err = max_diff(got, want)
    assert 0 < err < 0.05 * want.abs().max().item(), err

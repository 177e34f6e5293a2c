"""Failover: servers killed (SIGKILL, no goodbye) or stalled mid-answer; the answer stays identical."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.engine import DistributedModelForCausalLM, InferenceSession, MissingBlocksError
from corolla.engine.apps.local_swarm import ServerProcess, Swarm
from corolla.engine.apps.tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(240)]

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("failover") / "tiny-llama", "llama", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and the local transformers greedy continuation."""
    torch.manual_seed(1)
    prompt = torch.randint(7, 100, (1, 12))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    expected = hf.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, min_new_tokens=NEW_TOKENS
    )
    return prompt, expected


SPANS = ["0:2", "2:4", "2:4", "4:6", "4:6"]  # the middle and last spans have two servers each


@pytest.fixture(scope="module")
def shared_swarm(checkpoint: Path) -> Iterator[Swarm]:
    with Swarm(checkpoint, spans=SPANS) as s:
        yield s


@pytest.fixture
def swarm(shared_swarm: Swarm) -> Iterator[Swarm]:
    """The module's swarm, topped up: every server a test broke is replaced before the next test."""
    shared_swarm.wait_ready()
    yield shared_swarm
    for server in list(shared_swarm.servers):
        if server.alive() and server.ready() and server.status().get("state") == "online" and not _paused(server):
            continue
        blocks = server.blocks
        server.stop(grace=1)
        shared_swarm.servers.remove(server)
        shared_swarm.add_server(blocks, wait=False)


def _paused(server: ServerProcess) -> bool:
    try:
        with open(f"/proc/{server.pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("T")
    except OSError:
        return False


@pytest.fixture
def model(swarm: Swarm, checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    m = DistributedModelForCausalLM.from_pretrained(
        str(checkpoint), initial_peers=swarm.initial_peers, stall_timeout=1.0
    )
    yield m
    m.close()


def server_of(swarm: Swarm, peer_id: str) -> ServerProcess:
    return next(s for s in swarm.servers if s.peer_id == peer_id)


class Saboteur:
    """A transformers-style streamer that breaks the server of a hop at chosen steps."""

    def __init__(self, swarm: Swarm, session: InferenceSession, plan: dict[int, tuple[int, str]]) -> None:
        self.swarm, self.session, self.plan = swarm, session, plan  # step → (hop index, "kill"|"stall")
        self.step = -1
        self.broken_at: float | None = None
        self.recovery_seconds: list[float] = []

    def put(self, ids: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.broken_at is not None:
            self.recovery_seconds.append(now - self.broken_at)
            self.broken_at = None
        self.step += 1
        if self.step in self.plan:
            hop, how = self.plan[self.step]
            server = server_of(self.swarm, self.session.hops[hop].stream.peer_id)
            server.kill() if how == "kill" else server.pause()
            self.broken_at = time.perf_counter()

    def end(self) -> None:
        pass


def generate_with(
    model: DistributedModelForCausalLM, swarm: Swarm, prompt: torch.Tensor, plan: dict[int, tuple[int, str]]
) -> tuple[torch.Tensor, Saboteur, InferenceSession]:
    with model.inference_session(max_length=64) as session:
        saboteur = Saboteur(swarm, session, plan)
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session, streamer=saboteur, eos_token_id=[])
    return out, saboteur, session


@pytest.mark.parametrize("kill_step", [1, 6, 13])
def test_kill_middle_server_keeps_output_identical(model, swarm, reference, kill_step: int) -> None:
    prompt, expected = reference
    out, saboteur, session = generate_with(model, swarm, prompt, {kill_step: (1, "kill")})
    assert session.failovers == 1
    assert torch.equal(out, expected)
    assert saboteur.recovery_seconds and saboteur.recovery_seconds[0] < 10  # seconds, not minutes


def test_two_failures_in_one_answer(model, swarm, reference) -> None:
    prompt, expected = reference
    out, _saboteur, session = generate_with(model, swarm, prompt, {3: (1, "kill"), 9: (2, "kill")})
    assert session.failovers == 2
    assert torch.equal(out, expected)


def test_stalled_server_is_replaced(model, swarm, reference) -> None:
    prompt, expected = reference
    out, saboteur, session = generate_with(model, swarm, prompt, {5: (1, "stall")})
    assert session.failovers == 1
    assert torch.equal(out, expected)
    assert saboteur.recovery_seconds[0] < 10


def test_last_replica_gone_raises_missing_blocks(model, swarm, reference) -> None:
    prompt, _ = reference
    began = time.perf_counter()
    with pytest.raises(MissingBlocksError) as info:
        generate_with(model, swarm, prompt, {2: (1, "kill"), 6: (1, "kill")})
    assert "2:4" in str(info.value)
    assert "corolla server" in str(info.value)
    assert time.perf_counter() - began < 60  # a clear error, not a hang or an endless retry

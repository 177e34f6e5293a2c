"""A client sees the swarm as it is now: servers that joined after its first read take over a failed
span (issue 8, finding 2), and a server that withdrew drops out of new routes at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from swarm_helpers import client, hf_greedy, hf_model, peer_id, random_ids, running_swarm, track

from corolla.engine import InferenceSession
from corolla.engine.apps.local_swarm import ServerProcess, Swarm

pytestmark = pytest.mark.swarm

NEW_TOKENS = 12
EIGHT_BLOCKS = {"num_hidden_layers": 8}


class KillAt:
    """A transformers-style streamer that SIGKILLs the server of the session's last hop at one step."""

    def __init__(self, swarm: Swarm, session: InferenceSession, step: int) -> None:
        self.swarm, self.session, self.step = swarm, session, step
        self.seen = 0
        self.killed: ServerProcess | None = None

    def put(self, ids: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.step + 1:
            in_use = self.session.hops[-1].stream.peer_id
            self.killed = next(s for s in self.swarm.servers if s.alive() and s.peer_id == in_use)
            self.killed.kill()

    def end(self) -> None:
        pass


def wait_exited(server: ServerProcess, timeout: float = 60.0) -> None:
    """Poll until a server's main process has exited (bounded)."""
    deadline = time.monotonic() + timeout
    while server.alive():
        assert time.monotonic() < deadline, f"server {server.pid} still running after {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_server_that_joined_after_the_first_read_takes_over_a_killed_span(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tiny_checkpoint("llama", **EIGHT_BLOCKS)
    hf = hf_model(path)
    first, second = random_ids(1, 8, seed=81), random_ids(1, 8, seed=82)
    # update_period of an hour: only the failover itself can discover the server that joins.
    with (
        running_swarm(path, ["0:4", "4:8"], tmp_path_factory) as swarm,
        client(path, swarm, update_period=3600.0) as model,
    ):
        assert torch.equal(
            model.generate(first, max_new_tokens=NEW_TOKENS, eos_token_id=[]),
            hf_greedy(hf, first, NEW_TOKENS, eos=False),
        )
        old = next(s for s in swarm.servers if s.blocks == "4:8")
        joined = swarm.add_server("4:8")
        track(joined)
        assert peer_id(joined) in swarm.online_peers()[4]
        with model.inference_session(max_length=64) as session:
            killer = KillAt(swarm, session, step=4)
            out = model.generate(second, max_new_tokens=NEW_TOKENS, session=session, streamer=killer, eos_token_id=[])
            assert killer.killed is old  # the route used the server the client knew before
            assert session.failovers == 1
            assert session.hops[-1].stream.peer_id == peer_id(joined)
        assert torch.equal(out, hf_greedy(hf, second, NEW_TOKENS, eos=False))


@pytest.mark.timeout(300)
def test_withdrawn_server_drops_out_of_new_routes_at_once(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tiny_checkpoint("llama", **EIGHT_BLOCKS)
    hf = hf_model(path)
    ids = random_ids(1, 8, seed=83)
    expected = hf_greedy(hf, ids, NEW_TOKENS, eos=False)
    # update_period 0: every new route re-reads the swarm, so what it sees is what the DHT answers now.
    with (
        running_swarm(path, ["0:4", "4:8", "4:8"], tmp_path_factory) as swarm,
        client(path, swarm, update_period=0.0) as model,
    ):
        with model.inference_session(max_length=64) as session:
            assert torch.equal(
                model.generate(ids, max_new_tokens=NEW_TOKENS, session=session, eos_token_id=[]), expected
            )
            used = session.hops[-1].stream.peer_id
        leaving = next(s for s in swarm.servers if s.peer_id == used)
        leaving.stop()  # SIGTERM: the server withdraws (OFFLINE records) before it exits
        wait_exited(leaving)
        for seed in range(3):
            with model.inference_session(max_length=64) as session:
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session, eos_token_id=[])
                assert used not in {h.stream.peer_id for h in session.hops}
                assert session.failovers == 0
            assert torch.equal(out, expected), seed
        assert used not in model.manager.banned()  # never tried: the fresh read already said it left

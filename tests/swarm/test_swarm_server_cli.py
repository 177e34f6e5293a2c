"""A swarm missing blocks, and ``corolla server`` as a process: choosing its span, leaving on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from swarm_helpers import (
    client,
    descendants,
    hf_greedy,
    hf_model,
    peer_id,
    random_ids,
    running_swarm,
    track,
    wait_gone,
)

from corolla.engine import DistributedModelForCausalLM, MissingBlocksError
from corolla.engine.apps.local_swarm import ServerProcess, Swarm
from corolla.engine.dht.announce import read_records
from corolla.engine.dht.records import ServerState

pytestmark = pytest.mark.swarm


@dataclass
class HalfSwarm:
    path: Path
    swarm: Swarm
    model: DistributedModelForCausalLM


@pytest.fixture(scope="module")
def half(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HalfSwarm]:
    """Only blocks 0:3 of the six are served; a client joins anyway."""
    path = tiny_checkpoint("llama")
    with running_swarm(path, ["0:3"], tmp_path_factory) as swarm, client(path, swarm) as model:
        yield HalfSwarm(path, swarm, model)


@pytest.mark.timeout(90)
def test_missing_blocks_error_names_them_and_how_to_serve_them(half: HalfSwarm) -> None:
    ids = random_ids(1, 5, seed=50)
    with pytest.raises(MissingBlocksError) as info:
        half.model.generate(ids, max_new_tokens=3)
    assert info.value.blocks == [3, 4, 5]
    message = str(info.value)
    assert "3:6" in message
    assert f"of {half.swarm.dht_prefix}" in message  # the name the swarm knows it by
    assert f"corolla server {half.path} --blocks 3:6" in message  # the path this client was given
    with pytest.raises(MissingBlocksError, match="3:6"):
        half.model.forward(ids)


def _states(swarm: Swarm, peer: str) -> dict[int, ServerState]:
    """The state each block's record of ``peer`` shows in the bootstrap peer's DHT."""
    records = read_records(swarm.dht, swarm.dht_prefix, range(6))
    return {block: by_peer[peer].state for block, by_peer in records.items() if peer in by_peer}


@dataclass
class AutoServer:
    server: ServerProcess
    peer: str


@pytest.fixture(scope="module")
def auto(half: HalfSwarm) -> Iterator[AutoServer]:
    """A second server told only ``--num-blocks 3`` (no ``--blocks``): it must pick the free span itself."""
    server = half.swarm.add_server(None, extra_args=["--num-blocks", "3"])
    track(server)
    try:
        yield AutoServer(server, peer_id(server))
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_num_blocks_picks_the_free_span(half: HalfSwarm, auto: AutoServer) -> None:
    assert auto.server.status()["blocks"] == "3:6"
    assert _states(half.swarm, auto.peer) == dict.fromkeys(range(3, 6), ServerState.ONLINE)
    ids = random_ids(1, 5, seed=51)
    out = half.model.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, hf_greedy(hf_model(half.path), ids, 6, eos=False))


@pytest.mark.timeout(30)
def test_sigterm_exits_cleanly_leaving_no_process(auto: AutoServer) -> None:
    server = auto.server
    assert server.alive(), "the server is not running"
    started = [psutil.Process(server.pid), *descendants(server.pid)]
    assert {"python", "p2pd"} <= {p.name() for p in started}, started
    # SIGTERM to the main process only: it must leave the swarm and take its DHT process and daemon along.
    began = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0, server.log_tail()
    assert time.monotonic() - began < 15
    left = wait_gone(started, timeout=5)
    assert not left, f"left behind by the server: {[(p.pid, p.cmdline()) for p in left]}"
    assert server.status()["state"] == "stopped"
    assert "withdrawing blocks 3:6" in server.log_tail()


@pytest.mark.timeout(60)
def test_sigterm_turns_the_records_offline(half: HalfSwarm, auto: AutoServer) -> None:
    auto.server.stop()  # SIGTERM (a no-op if the test above stopped it already)
    assert _states(half.swarm, auto.peer) == dict.fromkeys(range(3, 6), ServerState.OFFLINE)
    # A client that joins now sees blocks 3:6 missing again (OFFLINE records are not routed to).
    with client(half.path, half.swarm) as fresh, pytest.raises(MissingBlocksError, match="3:6"):
        fresh.generate(random_ids(1, 5, seed=52), max_new_tokens=2)

"""Automatic block placement, moving to fill gaps, and `corolla health` on live swarms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corolla.engine.apps.health import swarm_health
from corolla.engine.apps.local_swarm import Swarm, server_env
from corolla.engine.apps.tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("placement") / "tiny-place", "llama", seed=5)


@pytest.fixture
def swarm(checkpoint: Path) -> Iterator[Swarm]:
    with Swarm(checkpoint, spans=[]) as s:
        yield s


def coverage(swarm: Swarm) -> list[int]:
    return [len(peers) for _, peers in sorted(swarm.online_peers().items())]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    delay = 0.2
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_servers_started_one_by_one_converge_to_full_coverage(swarm: Swarm) -> None:
    auto = ["--num-blocks", "2", "--throughput", "10"]
    history = []
    for _ in range(3):
        swarm.add_server(None, extra_args=auto)  # no --blocks: the server chooses
        history.append(coverage(swarm))
    assert history[0].count(0) == 4  # the first server covers 2 of 6 blocks
    assert history[1].count(0) == 2  # the second fills a gap instead of doubling up
    assert history[2] == [1] * 6  # the third completes the model
    spans = sorted(s.status()["blocks"] for s in swarm.servers)
    assert spans == ["0:2", "2:4", "4:6"]


def test_server_moves_to_blocks_nobody_serves(swarm: Swarm) -> None:
    fixed = [swarm.add_server("0:3", wait=False, extra_args=["--throughput", "10"]) for _ in range(2)]
    swarm.wait_ready()  # both start at once (fixed blocks: neither depends on the other)
    movers = [
        swarm.add_server(None, extra_args=["--num-blocks", "3", "--throughput", "10", "--rebalance-period", "1"])
        for _ in range(2)
    ]
    assert sorted(m.status()["blocks"] for m in movers) == ["3:6", "3:6"]  # the gap first, then the weaker half
    for server in fixed:  # both servers of 0:3 leave gracefully: blocks 0:3 are now missing
        server.stop()
    wait_for(lambda: min(coverage(swarm)) >= 1, 60, "a server to move to blocks 0:3")
    wait_for(lambda: sorted(m.status()["blocks"] for m in movers) == ["0:3", "3:6"], 10, "status files")
    assert coverage(swarm) == [1] * 6


def test_health_reports_coverage_and_missing_blocks(swarm: Swarm) -> None:
    swarm.add_server("0:4", extra_args=["--public-name", "alice", "--throughput", "12.5"])
    cmd = [sys.executable, "-m", "corolla.engine.apps.cli", "health", "--initial-peers", *swarm.initial_peers]
    result = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, env=server_env())
    assert result.returncode == 1, result.stderr  # blocks 4:6 have no server
    (report,) = json.loads(result.stdout)
    assert report["model"] == "tiny-place" and report["num_blocks"] == 6
    assert report["missing_blocks"] == [4, 5]
    (server,) = report["servers"]
    assert server["public_name"] == "alice" and (server["start"], server["end"]) == (0, 4)
    assert server["throughput"] == 12.5 and server["state"] == "online" and server["cache_tokens_left"] > 0

    swarm.add_server("4:6")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=server_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy" in result.stdout and "alice" in result.stdout
    (health,) = swarm_health(swarm.dht, "tiny-place")  # the same data as a Python call
    assert health.healthy and health.servers_per_block == [1] * 6

"""No orphans: when a server's or a client's main process is SIGKILLed, its DHT process and p2p daemon exit too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from swarm_helpers import descendants, running_swarm, track, wait_gone

from corolla.engine.apps.local_swarm import Swarm, server_env

pytestmark = pytest.mark.swarm

GONE_WITHIN = 10.0  # seconds; the watch polls twice a second, the rest is slack for a busy machine

CLIENT_SCRIPT = """
import sys, time
from corolla.engine import DistributedModelForCausalLM
model = DistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
print("ready", flush=True)
time.sleep(600)
"""

SWARM_SCRIPT = """
import sys, time
from corolla.engine.apps.local_swarm import Swarm
with Swarm(sys.argv[1], spans=["0:6"]) as swarm:
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def swarm(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with running_swarm(tiny_checkpoint("llama"), ["0:6"], tmp_path_factory) as swarm:
        yield swarm


def _dht_and_daemon(pid: int) -> list[psutil.Process]:
    """The DHT process and p2p daemon that ``pid`` started (checked to be there)."""
    procs = [p for p in descendants(pid) if p.name() in ("python", "p2pd")]
    names = sorted(p.name() for p in procs)
    assert names == ["p2pd", "python"], [(p.pid, p.name(), p.cmdline()[:3]) for p in descendants(pid)]
    return procs


@pytest.mark.timeout(120)
def test_sigkilled_server_leaves_no_dht_process_or_daemon(swarm: Swarm) -> None:
    server = swarm.add_server("0:6")
    track(server)
    watched = _dht_and_daemon(server.pid)
    os.kill(server.pid, signal.SIGKILL)  # the main process only, as the OOM killer or a crash would
    server.proc.wait(timeout=10)
    left = wait_gone(watched, GONE_WITHIN)
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
    assert swarm.servers[0].alive(), "the other server must keep running"


@contextlib.contextmanager
def ready_script(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` in a fresh interpreter until it prints "ready"; killed (by its pid) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_sigkilled_client_leaves_no_dht_process_or_daemon(swarm: Swarm, tiny_checkpoint: Callable[..., Path]) -> None:
    with ready_script(CLIENT_SCRIPT, str(tiny_checkpoint("llama")), *swarm.initial_peers) as proc:
        watched = _dht_and_daemon(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = wait_gone(watched, GONE_WITHIN)
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"


@pytest.mark.timeout(180)
def test_sigkilled_swarm_owner_leaves_no_server(tiny_checkpoint: Callable[..., Path]) -> None:
    """A test run, benchmark or demo killed before it could stop its swarm: the servers follow it."""
    with ready_script(SWARM_SCRIPT, str(tiny_checkpoint("llama"))) as proc:
        watched = descendants(proc.pid)
        assert any("server" in p.cmdline() for p in watched), [p.cmdline()[:4] for p in watched]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = wait_gone(watched, 60.0)  # the server leaves the swarm (SIGTERM grace), then its helpers exit
        assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"

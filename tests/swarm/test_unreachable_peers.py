"""An initial peer nobody answers at: the error names it and says to check that the swarm is up."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corolla.engine import CorollaError, DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import server_env
from corolla.engine.errors import InitialPeerError

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(180)]

PEER_ID = "12D3KooWHLv39SijqzvDRYcyWSj8Bs31gYevLimkDLtRi9wi7Bmb"


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_names_the_unreachable_peer(tiny_checkpoint: Callable[..., Path]) -> None:
    peer = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"
    cmd = [
        sys.executable,
        "-m",
        "corolla.engine.apps.cli",
        "server",
        str(tiny_checkpoint("llama")),
        "--initial-peers",
        peer,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=server_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{peer} (connection refused)" in result.stderr
    assert "Check that the swarm is up" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_names_the_unreachable_peer(tiny_checkpoint: Callable[..., Path]) -> None:
    peer = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"
    with pytest.raises(InitialPeerError) as info:
        DistributedModelForCausalLM.from_pretrained(str(tiny_checkpoint("llama")), initial_peers=[peer])
    assert info.value.peers == (peer,)
    assert "connection refused" in str(info.value) and "Check that the swarm is up" in str(info.value)
    assert isinstance(info.value, CorollaError)

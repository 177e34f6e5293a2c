"""A loopback swarm serving SmolLM2-135M-Instruct, shared by every swarm test of this folder.

The swarm starts on first request (session scope), so the unit tests here run without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from corolla_swarm import SwarmModel


@pytest.fixture(scope="session")
def corolla_swarm() -> Iterator[SwarmModel]:
    """Two servers on 127.0.0.1 hosting the real SmolLM2 checkpoint (it answers sensibly)."""
    from corolla.engine.apps.local_swarm import smollm2_checkpoint, start_swarm
    from corolla.integrations._shared import close_clients

    path = smollm2_checkpoint()
    with start_swarm(path, num_servers=2) as swarm:
        try:
            yield SwarmModel(model=str(path), initial_peers=list(swarm.initial_peers))
        finally:
            close_clients()

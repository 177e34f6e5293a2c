"""What a swarm test needs to reach the shared loopback swarm (see conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SwarmModel:
    """The served model's name (a local folder) and the swarm's initial peers."""

    model: str
    initial_peers: list[str]

"""What every part of a client shares: its settings, its view of the swarm, its P2P peer and event loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.loop import LoopThread
from corolla.engine.config import ClientConfig
from corolla.engine.routing.sequence_manager import SequenceManager


@dataclass(frozen=True)
class ClientContext:
    """One client's shared collaborators, passed whole to sessions, remote blocks and spot checks.

    Attributes:
        config: The client's settings (a session may run with its own copy, e.g. another adapter).
        manager: The routes of the model: swarm records, measurements, bans.
        p2p: The client's hivemind P2P replica.
        loop: The event loop thread every network call of the client runs on.
    """

    config: ClientConfig
    manager: SequenceManager
    p2p: Any
    loop: LoopThread

    def with_config(self, config: ClientConfig) -> ClientContext:
        """The same client with other settings."""
        return dataclasses.replace(self, config=config)

    @property
    def peer_id(self) -> str:
        """This client's own peer id (base58)."""
        return str(self.p2p.peer_id.to_base58())

    def proof(self, server_id: str) -> str | None:
        """A fresh proof of swarm membership for one stream to ``server_id`` (None in a public swarm)."""
        return credentials_for(self.config).proof(self.peer_id, server_id)

    def claim(self, server_id: str) -> str | None:
        """A contributor claim for one session on ``server_id`` (None unless this client's owner serves)."""
        return credentials_for(self.config).claim(self.peer_id, server_id)


class OnClient:
    """Read-only views of a ``context`` attribute's collaborators, for the objects that hold one (the model,
    its sessions): their owners keep old attribute names (``model.manager``, ``session.p2p``) working."""

    context: ClientContext

    @property
    def manager(self) -> SequenceManager:
        """The routes of the model: swarm records, measurements, bans."""
        return self.context.manager

    @property
    def p2p(self) -> Any:
        """The client's hivemind P2P replica."""
        return self.context.p2p

    @property
    def loop(self) -> LoopThread:
        """The event loop thread every network call of the client runs on."""
        return self.context.loop

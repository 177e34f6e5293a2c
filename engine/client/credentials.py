"""What a client shows a server at the start of a stream: membership of a private swarm, contribution.

Both come from files named in :class:`~corolla.engine.config.ClientConfig` (``swarm_key_file``,
``contributor_key_file``), read once per config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from corolla.engine.config import ClientConfig
from corolla.engine.dht.contribution import load_identity, make_claim
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.dht.swarm_key import SwarmKeys, load_keys
from corolla.engine.wire.membership import make_proof


@dataclass(frozen=True)
class Credentials:
    """A client's swarm keys (None: public swarm) and the server key it claims contribution with (if any)."""

    keys: SwarmKeys | None = None
    contributor: PeerIdentity | None = None

    def proof(self, client_id: str, server_id: str) -> str | None:
        """A fresh proof of membership for one stream to ``server_id`` (None in a public swarm)."""
        return None if self.keys is None else make_proof(self.keys, client_id, server_id)

    def claim(self, client_id: str, server_id: str) -> str | None:
        """A contributor claim for one session on ``server_id`` (None unless this client's owner serves)."""
        return None if self.contributor is None else make_claim(self.contributor, client_id, server_id)


@functools.lru_cache(maxsize=16)
def credentials_for(config: ClientConfig) -> Credentials:
    """The credentials the files of ``config`` hold (CorollaError if a named file is missing or malformed)."""
    contributor = load_identity(config.contributor_key_file) if config.contributor_key_file else None
    return Credentials(load_keys(config.swarm_key_file), contributor)

"""Which clients are contributors: their claim is signed by a server key, and that server is online.

The server calls :meth:`ContributorBook.is_contributor` when a session opens. The claim's signature is
checked at once (``dht/contribution.py``); whether the claimed server is online is looked up in the swarm's
model index (signed entries that servers refresh while they serve), remembered for ``ttl`` seconds, and
read at most once per ``ttl`` however many sessions open. Only a client with a validly signed claim
waits for that lookup (at most ``timeout``); one that fails counts as "not a contributor": priority is a
favour, never a reason to refuse anyone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from corolla.engine.dht.contribution import check_claim

logger = logging.getLogger(__name__)

OnlineServers = Callable[[], set[str]]  # blocking: peer ids with a signed, unexpired entry in the model index


class ContributorBook:
    """Answers "is this client a contributor?" from claims and a cached set of online servers."""

    def __init__(self, online_servers: OnlineServers, ttl: float = 30.0, timeout: float = 15.0) -> None:
        self._online_servers = online_servers
        self.ttl = ttl
        self.timeout = timeout
        self._online: set[str] = set()
        self._read_at = float("-inf")
        self._reading: asyncio.Task[set[str]] | None = None

    async def online(self) -> set[str]:
        """Servers online in the swarm (cached for ``ttl`` seconds; one read at a time)."""
        if time.monotonic() - self._read_at < self.ttl:
            return self._online
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._online_servers))
        try:
            self._online = await asyncio.wait_for(asyncio.shield(self._reading), self.timeout)
            self._read_at = time.monotonic()
        except Exception as e:  # a slow or broken DHT: nobody gets priority for now
            logger.info("could not read the online servers: %s", e or type(e).__name__)
        return self._online

    async def is_contributor(self, claim: str | None, client_id: str, server_id: str) -> bool:
        """Whether ``claim`` proves that ``client_id``'s owner runs a server that is online now."""
        contributor = check_claim(claim, client_id, server_id)
        if contributor is None:
            return False
        found = contributor in await self.online()
        if found:
            logger.info("client %s serves as %s: its steps go first", client_id[-6:], contributor[-6:])
        else:
            logger.info("client %s claims to serve as %s, which is not online", client_id[-6:], contributor[-6:])
        return found

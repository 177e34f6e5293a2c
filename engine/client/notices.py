"""What a client tells its user about unchecked output: once per span and process, and only about strangers.

The decision is :func:`~corolla.engine.routing.trust.warn_unverified` (pure); this module gathers its inputs
(where the client's connections to a server come from, whether the swarm is private) and remembers what it
already said in this process.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from corolla.engine.client.context import ClientContext
from corolla.engine.routing.trust import on_this_machine, warn_unverified

logger = logging.getLogger(__name__)

PEERS_TIMEOUT_S = 2.0
"""Seconds to ask the p2p daemon where a server's connections come from (else it counts as a stranger)."""
MAX_LOCAL_PEERS = 1024
"""Servers remembered as running on this machine (the oldest are forgotten first)."""


class UnverifiedNotices:
    """The spans this process already warned about; one instance per process (:data:`NOTICES`)."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, int, int]] = set()  # (model, start, end)
        self._local: dict[str, None] = {}  # peers whose connections came from this machine (oldest first)
        self._lock = threading.Lock()

    async def report(self, context: ClientContext, peer: str, start: int, end: int, why: str) -> None:
        """Log that ``peer``'s hop over blocks ``start:end`` could not be checked, when the user can act on it.

        Every session of a span with a single server reports it; the p2p daemon is asked where the server's
        connections come from only while the answer can still change the outcome (not for a span already
        warned about, nor for a server already seen on this machine).
        """
        span = (context.manager.model, start, end)
        with self._lock:
            decided = span in self._warned or peer in self._local
        if decided or context.config.swarm_key_file is not None:
            logger.debug("output is unverified: %s (warned before, or the swarm's servers are your own)", why)
            return
        local = on_this_machine(await observed_addrs(context, peer))
        with self._lock:
            if local:
                self._local[peer] = None
                while len(self._local) > MAX_LOCAL_PEERS:
                    self._local.pop(next(iter(self._local)))
            if not warn_unverified(span, own_servers=local, warned=self._warned):
                logger.debug("output is unverified: %s (the swarm's servers are your own)", why)
                return
            self._warned.add(span)
        logger.warning("output is unverified: %s (no other server holds these blocks to check it)", why)


async def observed_addrs(context: ClientContext, peer: str) -> list[str]:
    """Addresses this client's open connections to ``peer`` come from (empty if unknown)."""
    try:
        peers = await asyncio.wait_for(context.p2p.list_peers(), PEERS_TIMEOUT_S)
    except Exception as e:  # unknown origin: the server counts as a stranger's
        logger.debug("listing connected peers: %s", e)
        return []
    return [str(a) for info in peers if str(info.peer_id) == peer for a in info.addrs]


NOTICES = UnverifiedNotices()
"""This process's notices: every session reports through it, so a span is warned about once."""

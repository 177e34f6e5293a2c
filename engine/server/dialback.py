"""The reachability check: a server asks peers to dial it back, and answers such requests from others.

A peer asked to dial back tries a fresh TCP connection to the ports named, at the addresses the asker's
own connection comes from (never elsewhere: no third machine can be targeted), with a timeout, and
answers which worked. A server behind a NAT without a forwarded port hears "none": it then serves
through a relay (see ``Server``). The choices are the pure functions of ``reachability.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from corolla.engine.server.reachability import (
    DIAL_BACK_TIMEOUT,
    Reachability,
    connected_ips,
    dial_targets,
)

logger = logging.getLogger(__name__)

RPC_DIAL_BACK = "CorollaServer.rpc_dial_back"
MAX_REQUEST_BYTES = 256  # a dial-back request is a few ports
MAX_DIALS_IN_FLIGHT = 8  # connections tried at once for all peers together
MAX_ASKED = 3  # peers asked by one check


class DialBack:
    """Answers dial-back requests on a p2p daemon (:meth:`register`)."""

    def __init__(self, p2p: P2P, timeout: float = DIAL_BACK_TIMEOUT) -> None:
        self.p2p = p2p
        self.timeout = timeout
        self._dials = asyncio.Semaphore(MAX_DIALS_IN_FLIGHT)

    @classmethod
    async def register(cls, p2p: P2P, timeout: float = DIAL_BACK_TIMEOUT) -> DialBack:
        """A dial-back answerer registered on ``p2p``."""
        answerer = cls(p2p, timeout)
        await p2p.add_protobuf_handler(RPC_DIAL_BACK, answerer.rpc_dial_back, runtime_pb2.ExpertRequest)
        return answerer

    async def rpc_dial_back(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Try the asker's ports at the addresses it connects from; answer ``{"reachable": [maddr, ...]}``."""
        try:
            if len(request.metadata) > MAX_REQUEST_BYTES:
                raise ValueError("dial-back request too large")
            body = msgpack.unpackb(request.metadata, raw=False)
            if not isinstance(body, dict):
                raise ValueError("dial-back request is not a map")
            ips = connected_ips(await self._remote_addrs(context.remote_id))
            targets = dial_targets(body.get("ports"), ips)
        except (ValueError, msgpack.UnpackException) as e:
            return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"error": str(e)}))
        results = await asyncio.gather(*(self._dial(ip, port) for ip, port in targets))
        reachable = [f"/ip4/{ip}/tcp/{port}" for (ip, port), ok in zip(targets, results, strict=True) if ok]
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"reachable": reachable}))

    async def _remote_addrs(self, peer: PeerID) -> list[str]:
        return [str(addr) for info in await self.p2p.list_peers() if info.peer_id == peer for addr in info.addrs]

    async def _dial(self, ip: str, port: int) -> bool:
        async with self._dials:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), self.timeout)
            except (OSError, TimeoutError):
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True


async def check_reachability(
    p2p: P2P, peers: Sequence[str], ports: Sequence[int], timeout: float = 2 * DIAL_BACK_TIMEOUT + 2.0
) -> Reachability:
    """Ask up to :data:`MAX_ASKED` of ``peers`` (peer ids) to dial ``ports`` back; what they found."""
    asked = [peer for peer in peers if peer != p2p.peer_id.to_base58()][:MAX_ASKED]
    request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"ports": list(ports)}))
    answers = await asyncio.gather(*(_ask(p2p, peer, request, timeout) for peer in asked))
    reachable: list[str] = []
    for answer in answers:
        for maddr in answer or ():
            if maddr not in reachable:
                reachable.append(maddr)
    return Reachability(len(asked), sum(answer is not None for answer in answers), tuple(reachable))


async def _ask(p2p: P2P, peer: str, request: runtime_pb2.ExpertRequest, timeout: float) -> list[str] | None:
    """One peer's answer: the addresses it reached (possibly none), or None if it did not answer."""
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(PeerID.from_base58(peer), RPC_DIAL_BACK, request, runtime_pb2.ExpertResponse),
            timeout,
        )
        body: Any = msgpack.unpackb(response.metadata, raw=False)
    except Exception as e:  # an old server without the RPC, a dead one, junk: it just did not answer
        logger.debug("dial-back check by %s failed: %s", peer, e)
        return None
    found = body.get("reachable") if isinstance(body, dict) else None
    if not isinstance(found, list):
        return None
    return [maddr for maddr in found[:16] if isinstance(maddr, str) and len(maddr) < 64 and maddr.startswith("/ip4/")]

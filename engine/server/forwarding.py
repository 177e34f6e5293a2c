"""The server's side of forwarding: pushed inputs waiting for their step, and push streams to next hops.

A push travels over one persistent stream per next peer (opened at the first push, reused by every
session), so a push costs one message, not a new stream's negotiation. Memory stays bounded: each live
session holds at most one pushed input, pushes for unknown sessions are refused before their tensor is
decoded, and a server keeps at most :data:`MAX_LINKS` push streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.engine.errors import PeerUnavailableError, short_peer
from corolla.engine.wire.forwarding import Pushed, PushMissingError, check_offer, match_pushed
from corolla.engine.wire.membership import MembershipGate, make_proof
from corolla.engine.wire.messages import RPC_PUSH, Push, StepResult
from corolla.engine.wire.tensors import serialize

logger = logging.getLogger(__name__)

MAX_LINKS = 64  # push streams a server keeps open at once (least recently used closed first)


@dataclass
class _Box:
    expected: str | None = None  # the previous hop the client named in its latest forwarded step
    held: Pushed | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class Inbox:
    """At most one pushed input per session, until the client's step that names its pusher takes it."""

    def __init__(self) -> None:
        self._boxes: dict[str, _Box] = {}

    def offer(self, session_id: str, pushed: Pushed) -> None:
        """Hold ``pushed`` for its step (replacing an older one); ProtocolError if its pusher may not push."""
        box = self._boxes.setdefault(session_id, _Box())
        check_offer(box.expected, box.held, pushed)
        box.held = pushed
        box.arrived.set()

    async def take(self, session_id: str, from_peer: str, position: int, step_id: int, wait: float) -> Any:
        """The input ``from_peer`` pushed for step ``step_id`` (waiting at most ``wait`` seconds for it)."""
        box = self._boxes.setdefault(session_id, _Box())
        box.expected = from_peer
        deadline = time.monotonic() + wait
        while True:
            waiting, pushed = match_pushed(box.held, from_peer, position, step_id)
            if not waiting:
                box.held = None
                assert pushed is not None
                return pushed.hidden
            box.held = None  # stale or a stranger's: dropped
            box.arrived.clear()
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(box.arrived.wait(), left)
            except TimeoutError:
                raise PushMissingError(
                    f"no input from the previous hop {short_peer(from_peer)} within {wait:.1f} s; "
                    "send this step's input directly"
                ) from None

    def forget(self, session_id: str) -> None:
        """Drop what a closed session held."""
        self._boxes.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._boxes)


class _Link:
    """One push stream to a next hop; its answers (refusals only) are read in the background and logged."""

    def __init__(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()
        self.first = True
        self.alive = True
        self.acks = asyncio.ensure_future(self._read_acks())

    async def _read_acks(self) -> None:
        try:
            while True:
                response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self.reader)
                if error is not None:
                    break
                result = StepResult.decode(response.metadata)
                if not result.ok:
                    logger.info("next hop %s refused a push: %s", short_peer(self.peer), result.error)
        except Exception as e:  # the stream ended or broke: the next push opens a new one
            logger.debug("push stream to %s ended: %s", short_peer(self.peer), e or type(e).__name__)
        finally:
            self.alive = False

    def close(self) -> None:
        self.alive = False
        self.acks.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()


class Forwarder:
    """Pushes hop outputs to next hops over persistent streams (one per next peer)."""

    def __init__(self, p2p: P2P, gate: MembershipGate, timeout: float) -> None:
        self.p2p = p2p
        self.gate = gate
        self.timeout = timeout  # seconds to open a stream and write one push
        self.me = p2p.peer_id.to_base58()
        self._links: OrderedDict[str, _Link] = OrderedDict()

    async def push(self, next_peer: str, msg: Push, hidden: Any, within: float | None = None) -> str | None:
        """Send ``hidden`` as the input of ``next_peer``'s step (within ``within`` s at most, and the server's
        push timeout); None, or why it could not be sent."""
        try:
            async with asyncio.timeout(min(self.timeout, within if within is not None else self.timeout)):
                link = await self._link(next_peer)
                async with link.lock:
                    if link.first and self.gate.keys is not None:
                        msg = msg.model_copy(update={"proof": make_proof(self.gate.keys, self.me, next_peer)})
                    link.first = False
                    request = runtime_pb2.ExpertRequest(tensors=[serialize(hidden)], metadata=msg.encode())
                    await P2P.send_protobuf(request, link.writer)
            return None
        except Exception as e:
            self._drop(next_peer)
            why = "no answer" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
            logger.info("could not push to next hop %s: %s", short_peer(next_peer), why)
            return f"could not push to the next hop {next_peer}: {why}"

    async def _link(self, peer: str) -> _Link:
        link = self._links.get(peer)
        if link is not None and link.alive:
            self._links.move_to_end(peer)
            return link
        self._drop(peer)
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), RPC_PUSH)
        except Exception as e:
            raise PeerUnavailableError(peer, f"could not open a push stream: {e or type(e).__name__}") from e
        link = _Link(peer, reader, writer)
        self._links[peer] = link
        while len(self._links) > MAX_LINKS:
            _, oldest = self._links.popitem(last=False)
            oldest.close()
        return link

    def _drop(self, peer: str) -> None:
        link = self._links.pop(peer, None)
        if link is not None:
            link.close()

    def close(self) -> None:
        """Close every push stream."""
        for peer in list(self._links):
            self._drop(peer)

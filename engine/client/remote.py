"""Talking to one server: an inference stream for one hop of a session, stateless forward, info."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.engine.errors import (
    CacheFullError,
    CorollaError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.errors import short_peer as _short
from corolla.engine.wire.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    Close,
    ForwardRequest,
    OpenSession,
    Step,
    StepResult,
)
from corolla.engine.wire.tensors import deserialize, serialize

_SERVER_ERRORS: dict[str, type[PeerError]] = {
    "CacheFullError": CacheFullError,
    "ProtocolError": ProtocolError,
    "SessionClosedError": SessionClosedError,
}


@contextlib.contextmanager
def _blaming(peer_id: str) -> Iterator[None]:
    """Name ``peer_id`` in every peer error raised inside (decoding its bytes, checking its answer)."""
    try:
        yield
    except PeerError as e:
        if e.peer_id is None:
            e.peer_id = peer_id
        raise


def _check(peer_id: str, meta: StepResult) -> None:
    """Raise the error a server answered with, as a typed error naming that server."""
    if not meta.ok:
        if meta.error_type == "PeerUnavailableError":
            raise PeerUnavailableError(peer_id, str(meta.error))
        cls = _SERVER_ERRORS.get(meta.error_type or "", PeerError)
        raise cls(f"server {_short(peer_id)}: {meta.error}", peer_id=peer_id)


class HopStream:
    """An open inference stream to the server of one hop (blocks ``start..end-1``) of a session."""

    def __init__(self, peer_id: str, start: int, end: int) -> None:
        self.peer_id = peer_id
        self.start, self.end = start, end
        self._queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self.closed = False

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def _exchange(self, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
        if self.closed or self._responses is None:
            raise SessionClosedError(f"stream to {_short(self.peer_id)} is closed", peer_id=self.peer_id)
        self._queue.put_nowait(request)
        try:
            return await asyncio.wait_for(anext(self._responses), timeout)
        except StopAsyncIteration as e:
            self.closed = True
            raise PeerUnavailableError(self.peer_id, "closed the stream") from e
        except TimeoutError as e:
            raise PeerUnavailableError(self.peer_id, f"no answer within {timeout:.1f} s") from e
        except CorollaError:
            raise
        except Exception as e:
            self.closed = True
            raise PeerUnavailableError(self.peer_id, f"{type(e).__name__}: {e}") from e

    async def open(
        self, p2p: P2P, session_id: str, max_length: int, batch_size: int, connect_timeout: float, step_timeout: float
    ) -> None:
        """Open the stream and reserve the session's cache on the server."""
        try:
            self._responses = await asyncio.wait_for(
                p2p.iterate_protobuf_handler(
                    PeerID.from_base58(self.peer_id), RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse
                ),
                connect_timeout,
            )
        except Exception as e:
            raise PeerUnavailableError(self.peer_id, f"could not open a stream: {e or type(e).__name__}") from e
        msg = OpenSession(
            session_id=session_id, start=self.start, end=self.end, max_length=max_length, batch_size=batch_size
        )
        response = await self._exchange(runtime_pb2.ExpertRequest(metadata=msg.encode()), step_timeout)
        with _blaming(self.peer_id):
            _check(self.peer_id, StepResult.decode(response.metadata))

    async def step(
        self, session_id: str, hidden: torch.Tensor, position: int, step_id: int, timeout: float
    ) -> torch.Tensor:
        """Send hidden states [batch, new, hidden] at ``position``; get the hop's outputs back."""
        meta = Step(session_id=session_id, position=position, step_id=step_id)
        request = runtime_pb2.ExpertRequest(tensors=[serialize(hidden)], metadata=meta.encode())
        response = await self._exchange(request, timeout)
        with _blaming(self.peer_id):
            return self._output(response, hidden, position, step_id)

    def _output(
        self, response: runtime_pb2.ExpertResponse, hidden: torch.Tensor, position: int, step_id: int
    ) -> torch.Tensor:
        result = StepResult.decode(response.metadata)
        _check(self.peer_id, result)
        if result.step_id != step_id or result.position != position + hidden.shape[1]:
            raise ProtocolError(
                f"server {_short(self.peer_id)} answered step {result.step_id} at {result.position}, "
                f"expected step {step_id} at {position + hidden.shape[1]}",
                peer_id=self.peer_id,
            )
        if len(response.tensors) != 1:
            raise ProtocolError(
                f"server {_short(self.peer_id)} sent {len(response.tensors)} tensors, expected 1", peer_id=self.peer_id
            )
        out = deserialize(response.tensors[0])
        if out.shape != hidden.shape:
            raise ProtocolError(
                f"server {_short(self.peer_id)} sent shape {list(out.shape)}, expected {list(hidden.shape)}",
                peer_id=self.peer_id,
            )
        return out

    async def close(self, session_id: str) -> None:
        """Ask the server to free the session, then end the stream (never raises)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=Close(session_id=session_id).encode()))
            self._queue.put_nowait(None)


async def remote_forward(
    p2p: P2P, peer_id: str, start: int, end: int, hidden: torch.Tensor, max_chunk_bytes: int, timeout: float
) -> torch.Tensor:
    """Stateless forward of [batch, length, hidden] through blocks ``start..end-1`` of one server."""
    per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
    step = max(1, max_chunk_bytes // per_token)
    meta = ForwardRequest(start=start, end=end).encode()

    async def parts() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for i in range(0, hidden.shape[1], step):
            yield runtime_pb2.ExpertRequest(tensors=[serialize(hidden[:, i : i + step])], metadata=meta)

    async def call() -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), RPC_FORWARD, parts(), runtime_pb2.ExpertResponse
        )
        async for response in responses:
            _check(peer_id, StepResult.decode(response.metadata))
            outputs.extend(deserialize(t) for t in response.tensors)
        return torch.cat(outputs, dim=1)

    try:
        with _blaming(peer_id):
            out = await asyncio.wait_for(call(), timeout)
    except CorollaError:
        raise
    except Exception as e:
        raise PeerUnavailableError(peer_id, f"{type(e).__name__}: {e}") from e
    if out.shape != hidden.shape:
        raise ProtocolError(
            f"server {_short(peer_id)} sent shape {list(out.shape)}, expected {list(hidden.shape)}", peer_id=peer_id
        )
    return out


async def remote_info(p2p: P2P, peer_id: str, timeout: float) -> dict[str, Any]:
    """A server's self-description (model, span, free cache, counters)."""
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id), RPC_INFO, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo
            ),
            timeout,
        )
    except Exception as e:
        raise PeerUnavailableError(peer_id, f"{type(e).__name__}: {e}") from e
    try:
        info = msgpack.unpackb(response.serialized_info, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"server {_short(peer_id)} sent undecodable info: {e}", peer_id=peer_id) from e
    if not isinstance(info, dict):
        raise ProtocolError(f"server {_short(peer_id)} sent a malformed info record", peer_id=peer_id)
    return info

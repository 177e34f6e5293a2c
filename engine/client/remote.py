"""Talking to one server: an inference stream for one hop of a session, stateless forward, info."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.engine.errors import (
    CacheFullError,
    CorollaError,
    PeerError,
    PeerUnavailableError,
    PrivateSwarmError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.errors import short_peer as _short
from corolla.engine.wire.forwarding import PushMissingError
from corolla.engine.wire.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    Close,
    ForwardRequest,
    OpenSession,
    SessionAt,
    Step,
    StepResult,
    Steps,
)
from corolla.engine.wire.tensors import deserialize, serialize

logger = logging.getLogger(__name__)

_SERVER_ERRORS: dict[str, type[PeerError]] = {
    "CacheFullError": CacheFullError,
    "PushMissingError": PushMissingError,
    "PrivateSwarmError": PrivateSwarmError,
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


def commitment_of(result: StepResult) -> bytes | None:
    """The signature a step's answer carried (wire/commitment.py); None if none, or not 64 hex-encoded bytes."""
    return _signature(result.commitment)


def _signature(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        signature = bytes.fromhex(text)
    except ValueError:
        return None
    return signature if len(signature) == 64 else None


def _check(peer_id: str, meta: StepResult) -> None:
    """Raise the error a server answered with, as a typed error naming that server."""
    if not meta.ok:
        if meta.error_type == "PeerUnavailableError":
            raise PeerUnavailableError(peer_id, str(meta.error))
        cls = _SERVER_ERRORS.get(meta.error_type or "", PeerError)
        raise cls(f"server {_short(peer_id)}: {meta.error}", peer_id=peer_id)


class Pipe:
    """One raw hivemind stream to a server: length-prefixed protobuf messages each way.

    Used instead of ``P2P.iterate_protobuf_handler``, whose response iterator, once the server's side
    closes, waits for the request iterator to finish: a client would notice a killed server only at its
    step timeout. Here a closed connection fails the pending read at once.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, request: runtime_pb2.ExpertRequest | RPCError) -> None:
        await P2P.send_protobuf(request, self.writer)

    async def receive(self) -> runtime_pb2.ExpertResponse:
        response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self.reader)
        if error is not None:
            raise ConnectionError(f"the server's stream handler failed: {error.message}")
        return response  # type: ignore[no-any-return]

    def close(self) -> None:
        self.writer.close()


_GOODBYES: set[asyncio.Task[None]] = set()  # close messages still being written (kept from garbage collection)


class HopStream:
    """An open inference stream to the server of one hop (blocks ``start..end-1``) of a session."""

    def __init__(self, peer_id: str, start: int, end: int) -> None:
        self.peer_id = peer_id
        self.start, self.end = start, end
        self._pipe: Pipe | None = None
        self.closed = False

    async def _exchange(self, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
        if self.closed or self._pipe is None:
            raise SessionClosedError(f"stream to {_short(self.peer_id)} is closed", peer_id=self.peer_id)
        pipe = self._pipe
        try:
            async with asyncio.timeout(timeout):
                await pipe.send(request)
                return await pipe.receive()
        except asyncio.CancelledError:
            self._abort()  # the answer may still come: it would be read as the answer to the next request
            raise
        except TimeoutError as e:
            self._abort()  # a late answer would be read as the answer to the next request
            raise PeerUnavailableError(self.peer_id, f"no answer within {timeout:.1f} s") from e
        except (asyncio.IncompleteReadError, ConnectionError, EOFError) as e:
            self._abort()
            detail = f" ({e})" if isinstance(e, ConnectionError) and str(e) else ""
            raise PeerUnavailableError(self.peer_id, f"closed the stream{detail}") from e
        except Exception as e:
            self._abort()
            raise PeerUnavailableError(self.peer_id, f"{type(e).__name__}: {e}") from e

    def _abort(self) -> None:
        self.closed = True
        if self._pipe is not None:
            with contextlib.suppress(Exception):
                self._pipe.close()

    async def open(
        self,
        p2p: P2P,
        session_id: str,
        max_length: int,
        batch_size: int,
        connect_timeout: float,
        step_timeout: float,
        *,
        proof: str | None = None,
        contributor: str | None = None,
        adapter: str | None = None,
    ) -> None:
        """Open the stream and reserve the session's cache on the server.

        ``proof`` (a private swarm's proof of membership) and ``contributor`` (a claim of a client that also
        serves) come from ``client/credentials.py``, made for this stream's pair of peers.
        """
        try:
            _, reader, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(PeerID.from_base58(self.peer_id), RPC_INFERENCE), connect_timeout
            )
            self._pipe = Pipe(reader, writer)
        except Exception as e:
            raise PeerUnavailableError(self.peer_id, f"could not open a stream: {e or type(e).__name__}") from e
        msg = OpenSession(
            session_id=session_id,
            start=self.start,
            end=self.end,
            max_length=max_length,
            batch_size=batch_size,
            proof=proof,
            contributor=contributor,
            adapter=adapter,
        )
        response = await self._exchange(runtime_pb2.ExpertRequest(metadata=msg.encode()), step_timeout)
        with _blaming(self.peer_id):
            _check(self.peer_id, StepResult.decode(response.metadata))

    async def step(
        self, session_id: str, hidden: torch.Tensor, position: int, step_id: int, timeout: float
    ) -> torch.Tensor:
        """Send hidden states [batch, new, hidden] at ``position``; get the hop's outputs back."""
        return (await self.committed_step(session_id, hidden, position, step_id, timeout))[0]

    async def committed_step(
        self, session_id: str, hidden: torch.Tensor, position: int, step_id: int, timeout: float
    ) -> tuple[torch.Tensor, bytes | None]:
        """:meth:`step`, and the server's signature of its outputs (None if it sent none or a malformed one)."""
        meta = Step(session_id=session_id, position=position, step_id=step_id)
        request = runtime_pb2.ExpertRequest(tensors=[serialize(hidden)], metadata=meta.encode())
        response = await self._exchange(request, timeout)
        with _blaming(self.peer_id):
            out, result = self._output(response, hidden.shape, position, step_id)
        return out, commitment_of(result)

    async def steps(
        self, sessions: list[tuple[str, int]], hidden: torch.Tensor, step_id: int, timeout: float
    ) -> tuple[torch.Tensor, list[bytes | None]]:
        """One decode token for several sessions of this client on this hop's server, in one message.

        ``sessions`` lists (session id, position) pairs, this stream's session first; ``hidden`` is
        [rows, 1, hidden] with each session's rows in that order. Returns the outputs alike, and the server's
        signature of each session's rows (None where it sent none).
        """
        meta = Steps(step_id=step_id, sessions=[SessionAt(session_id=s, position=p) for s, p in sessions])
        request = runtime_pb2.ExpertRequest(tensors=[serialize(hidden)], metadata=meta.encode())
        response = await self._exchange(request, timeout)
        with _blaming(self.peer_id):
            result = StepResult.decode(response.metadata)
            _check(self.peer_id, result)
            expected = [p + 1 for _, p in sessions]
            if result.step_id != step_id or result.positions != expected:
                raise ProtocolError(
                    f"server {_short(self.peer_id)} answered batched step {result.step_id} at {result.positions}, "
                    f"expected step {step_id} at {expected}",
                    peer_id=self.peer_id,
                )
            out = self._tensor(response, hidden.shape)
        signed = result.commitments or []
        if len(signed) != len(sessions):  # an older server, or a malformed answer: nothing is signed
            signed = [None] * len(sessions)
        return out, [_signature(c) for c in signed]

    async def forwarded_step(
        self,
        session_id: str,
        hidden: torch.Tensor | None,
        shape: torch.Size,
        position: int,
        step_id: int,
        timeout: float,
        *,
        from_peer: str | None,
        wait: float,
        next_peer: str | None,
        push_within: float = 5.0,
    ) -> tuple[torch.Tensor, StepResult]:
        """A step of a forwarded route (see client/forwarding.py): the hop's outputs and its answer's metadata.

        ``hidden`` is None when the previous hop ``from_peer`` pushes the input (the server waits ``wait`` s
        for it); ``next_peer`` gets the output pushed as the input of its step ``step_id + 1`` (the server spends
        at most ``push_within`` s on the push before it answers, reporting a failed push).
        """
        meta = Step(
            session_id=session_id,
            position=position,
            step_id=step_id,
            from_peer=from_peer,
            wait=wait,
            next_peer=next_peer,
            push_within=push_within,
        )
        tensors = [serialize(hidden)] if hidden is not None else []
        response = await self._exchange(runtime_pb2.ExpertRequest(tensors=tensors, metadata=meta.encode()), timeout)
        with _blaming(self.peer_id):
            return self._output(response, shape, position, step_id)

    def _output(
        self, response: runtime_pb2.ExpertResponse, shape: torch.Size, position: int, step_id: int
    ) -> tuple[torch.Tensor, StepResult]:
        result = StepResult.decode(response.metadata)
        _check(self.peer_id, result)
        if result.step_id != step_id or result.position != position + shape[1]:
            raise ProtocolError(
                f"server {_short(self.peer_id)} answered step {result.step_id} at {result.position}, "
                f"expected step {step_id} at {position + shape[1]}",
                peer_id=self.peer_id,
            )
        return self._tensor(response, shape), result

    def _tensor(self, response: runtime_pb2.ExpertResponse, shape: torch.Size) -> torch.Tensor:
        """The answer's one tensor, of ``shape``."""
        if len(response.tensors) != 1:
            raise ProtocolError(
                f"server {_short(self.peer_id)} sent {len(response.tensors)} tensors, expected 1", peer_id=self.peer_id
            )
        out = deserialize(response.tensors[0])
        if out.shape != shape:
            raise ProtocolError(
                f"server {_short(self.peer_id)} sent shape {list(out.shape)}, expected {list(shape)}",
                peer_id=self.peer_id,
            )
        return out

    async def close(self, session_id: str) -> None:
        """Ask the server to free the session, then end the stream (never raises, never waits)."""
        if self.closed:
            return
        self.closed = True
        if self._pipe is None:
            return
        task = asyncio.ensure_future(_goodbye(self._pipe, session_id))
        _GOODBYES.add(task)
        task.add_done_callback(_GOODBYES.discard)


async def _goodbye(pipe: Pipe, session_id: str, timeout: float = 5.0) -> None:
    """Send Close and the end-of-stream marker (bounded in time), then close the stream."""
    try:
        async with asyncio.timeout(timeout):
            await pipe.send(runtime_pb2.ExpertRequest(metadata=Close(session_id=session_id).encode()))
            await pipe.send(P2P.END_OF_STREAM)
    except Exception as e:  # best effort: servers also free idle sessions themselves
        logger.debug("closing a stream: %s", e or type(e).__name__)
    finally:
        with contextlib.suppress(Exception):
            pipe.close()


async def remote_forward(
    p2p: P2P,
    peer_id: str,
    start: int,
    end: int,
    hidden: torch.Tensor,
    max_chunk_bytes: int,
    timeout: float,
    proof: str | None = None,
    adapter: str | None = None,
) -> torch.Tensor:
    """Stateless forward of [batch, length, hidden] through blocks ``start..end-1`` of one server."""
    per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
    step = max(1, max_chunk_bytes // per_token)
    meta = ForwardRequest(start=start, end=end, proof=proof, adapter=adapter).encode()

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
        if sum(o.shape[1] for o in outputs if o.ndim == 3) < hidden.shape[1]:
            # hivemind ends the iteration quietly when the connection closes: a server that died mid-way.
            raise PeerUnavailableError(peer_id, "closed the stream before answering every chunk")
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


async def remote_info(p2p: P2P, peer_id: str, timeout: float, proof: str | None = None) -> dict[str, Any]:
    """A server's self-description (model, span, free cache, counters); ``proof``: see :meth:`HopStream.open`."""
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id), RPC_INFO, runtime_pb2.ExpertUID(uid=proof or ""), runtime_pb2.ExpertInfo
            ),
            timeout,
        )
    except TimeoutError as e:
        raise PeerUnavailableError(peer_id, f"no answer to info within {timeout:.1f} s") from e
    except Exception as e:
        raise PeerUnavailableError(peer_id, f"{type(e).__name__}: {e}") from e
    try:
        info = msgpack.unpackb(response.serialized_info, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"server {_short(peer_id)} sent undecodable info: {e}", peer_id=peer_id) from e
    if not isinstance(info, dict):
        raise ProtocolError(f"server {_short(peer_id)} sent a malformed info record", peer_id=peer_id)
    return info

"""RPC handlers: inference stream, stateless forward, info. Peer input never crashes the server.

Every request is bounded before the work is done: message size from the frame header (frames.py), streams and
sessions per peer and per address group, parts and time per forward, tokens in flight per peer, per address
group and in total (backend.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from corolla.engine.config import ServerConfig
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.errors import (
    CorollaError,
    PeerUnavailableError,
    PrivateSwarmError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.server.backend import ServerSession, SpanBackend
from corolla.engine.server.contributors import ContributorBook
from corolla.engine.server.forwarding import Forwarder, Inbox
from corolla.engine.server.frames import BoundedStreams, FrameLimits, StreamContext
from corolla.engine.server.training import TrainingRPCs
from corolla.engine.wire.commitment import commitment_digest, sign_commitment
from corolla.engine.wire.forwarding import Pushed, tensor_digest
from corolla.engine.wire.membership import MembershipGate
from corolla.engine.wire.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    Close,
    ForwardRequest,
    OpenSession,
    Push,
    Step,
    StepResult,
    Steps,
    check_version,
    decode_inference_message,
)
from corolla.engine.wire.tensors import ANSWER_PART_BYTES, deserialize, length_parts, serialize
from corolla.engine.wire.training import RPC_BACKWARD, RPC_TRAIN_FORWARD

logger = logging.getLogger(__name__)


def error_answer(e: Exception, step_id: int = -1) -> runtime_pb2.ExpertResponse:
    """The answer that reports ``e`` to the peer (CorollaErrors by type and message, others as ServerError).

    An unavailable server sends only the reason: the peer names the server itself.
    """
    kind = type(e).__name__ if isinstance(e, CorollaError) else "ServerError"
    if isinstance(e, PeerUnavailableError):
        text = e.reason
    else:
        text = str(e) if isinstance(e, CorollaError) else f"internal error: {type(e).__name__}: {e}"
    meta = StepResult(ok=False, step_id=step_id, error=text, error_type=kind)
    return runtime_pb2.ExpertResponse(metadata=meta.encode())


def _one_tensor(request: runtime_pb2.ExpertRequest) -> Any:
    if len(request.tensors) != 1:
        raise ProtocolError(f"expected exactly one tensor (hidden states), got {len(request.tensors)}")
    return deserialize(request.tensors[0])


class Handler:
    """Registers and serves the RPCs of a server over a hivemind P2P instance (built by :meth:`create`)."""

    def __init__(
        self,
        cfg: ServerConfig,
        *,
        peer_id: str,
        gate: MembershipGate,
        forwarder: Forwarder,
        contributors: ContributorBook | None = None,
        identity: PeerIdentity | None = None,
    ) -> None:
        """A handler with every collaborator; :meth:`create` builds one and registers its RPCs.

        Args:
            cfg: the server's config (limits, timeouts).
            peer_id: this server's full peer id (named in the errors it answers about itself).
            gate: who may use this server (a private swarm's holds its key; ``MembershipGate(None)``: anyone).
            forwarder: pushes sessions' outputs to their next hops.
            contributors: who serves too (their steps go first), if known.
            identity: this server's key: it signs every step's output (wire/commitment.py); None: unsigned.
        """
        self.cfg = cfg
        self.identity = identity
        self.peer_id = peer_id
        self.gate = gate
        self.forwarder = forwarder
        self.contributors = contributors
        self._backend: SpanBackend | None = None  # None while loading or moving to another span
        self._info: dict[str, Any] = {}
        self.idle_timeout = cfg.session_idle_timeout
        limits = FrameLimits(
            cfg.max_message_bytes, cfg.max_streams_per_peer, cfg.max_streams, cfg.max_streams_per_group
        )
        self.streams = BoundedStreams(limits, error_answer)
        self.inbox = Inbox()  # inputs pushed by sessions' previous hops (forwarding)

    @classmethod
    async def create(
        cls,
        p2p: P2P,
        cfg: ServerConfig,
        *,
        gate: MembershipGate,
        contributors: ContributorBook | None = None,
        identity: PeerIdentity | None = None,
    ) -> Handler:
        """A handler whose RPCs are registered on ``p2p`` (it serves nothing until :meth:`serve`)."""
        handler = cls(
            cfg,
            peer_id=p2p.peer_id.to_base58(),
            gate=gate,
            forwarder=Forwarder(p2p, gate, cfg.push_timeout),
            contributors=contributors,
            identity=identity,
        )
        await handler._register(p2p)
        return handler

    def serve(self, backend: SpanBackend, info: dict[str, Any]) -> None:
        """Serve ``backend`` from now on, described to peers by ``info``."""
        self._backend = backend
        self._info = info

    def stop_serving(self) -> None:
        """Serve no span (while loading or moving); streams already open keep their backend."""
        self._backend = None

    def _serving(self) -> SpanBackend:
        backend = self._backend
        if backend is None:
            raise PeerUnavailableError(self.peer_id, "it is loading or moving to other blocks; use another server")
        return backend

    def _serving_same(self, backend: SpanBackend | None) -> SpanBackend:
        if backend is None or backend is not self._backend:
            raise PeerUnavailableError(self.peer_id, "it moved to other blocks; continue on another server")
        return backend

    async def _register(self, p2p: P2P) -> None:
        """Add the handlers to the P2P daemon (the streams with Corolla's size-checked frame reader)."""
        await self.streams.register(p2p, RPC_INFERENCE, self.rpc_inference)
        await self.streams.register(p2p, RPC_FORWARD, self.rpc_forward)
        await self.streams.register(p2p, RPC_PUSH, self.rpc_push)
        training = TrainingRPCs(
            self._serving,
            self.cfg,
            error_answer,
            lambda proof, client, server: self.gate.admit(proof, client, server),
            peer_id=self.peer_id,
        )  # forward with deep prompts, backward
        await self.streams.register(p2p, RPC_TRAIN_FORWARD, training.rpc_train_forward)
        await self.streams.register(p2p, RPC_BACKWARD, training.rpc_backward)
        # Unary calls travel over the daemon's persistent connection, which caps them at 4 MiB itself.
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, runtime_pb2.ExpertUID)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """Describe this server: model, span, dtype, free cache, counters (a private swarm's: to members only)."""
        self.gate.admit(request.uid or None, str(context.remote_id), str(context.local_id))
        info = dict(self._info)
        backend = self._backend
        if backend is not None:
            info.update(
                cache_tokens_left=backend.cache_tokens_left(),
                tokens_processed=backend.tokens_processed,
                rows_batched=backend.rows_batched,
                sessions=len(backend.sessions),
                **backend.prefix_counters(),
            )
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(info, use_bin_type=True))

    async def _next_request(
        self, iterator: AsyncIterator[runtime_pb2.ExpertRequest], kind: str, peer: str
    ) -> runtime_pb2.ExpertRequest | None:
        """The stream's next message; None when it ends, idles past the timeout, or sends undecodable bytes
        (then only this stream is dropped)."""
        try:
            return await asyncio.wait_for(anext(iterator), self.idle_timeout)
        except (StopAsyncIteration, TimeoutError):
            return None
        except Exception as e:
            logger.info("dropped %s stream from %s: %s", kind, peer[-6:], e)
            return None

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One stream per session: ``open``, then ``step``s, then ``close`` (or the stream ends)."""
        session: ServerSession | None = None
        backend = self._backend  # a stream stays on the backend it started with, even if the server moves
        iterator = aiter(requests)
        peer = str(context.remote_id)
        try:
            while True:
                request = await self._next_request(iterator, "an inference", peer)
                if request is None:
                    return
                step_id = -1
                try:
                    msg = decode_inference_message(request.metadata)
                    if isinstance(msg, Close):
                        return
                    if isinstance(msg, OpenSession):
                        if session is not None:
                            raise ProtocolError("this stream already has an open session")
                        check_version(msg.version)
                        try:
                            self.gate.admit(msg.proof, peer, str(context.local_id))
                        except PrivateSwarmError as e:
                            logger.info("refused a stream from %s: %s", peer[-6:], e)
                            yield error_answer(e)
                            return  # a non-member gets nothing more on this stream
                        if backend is None:
                            backend = self._serving()
                        session = backend.open_session(
                            msg.session_id,
                            msg.start,
                            msg.end,
                            msg.max_length,
                            msg.batch_size,
                            peer,
                            msg.adapter,
                            group=context.group,
                        )
                        if self.contributors is not None:
                            session.favored = await self.contributors.is_contributor(
                                msg.contributor, peer, str(context.local_id)
                            )
                        yield runtime_pb2.ExpertResponse(metadata=StepResult(position=0).encode())
                        continue
                    step_id = msg.step_id
                    own = msg.sessions[0].session_id if isinstance(msg, Steps) else msg.session_id
                    if session is None or own != session.session_id:
                        raise SessionClosedError(f"unknown session id {own!r}: open a session on this stream first")
                    if isinstance(msg, Steps):
                        yield await self._steps(self._serving_same(backend), session, msg, request, peer)
                    else:
                        yield await self._step(self._serving_same(backend), session, msg, request)
                except CorollaError as e:
                    logger.info("rejected a request from %s: %s", str(context.remote_id)[-6:], e)
                    # Keep the stream open (until the client closes it or goes idle) so a client that is
                    # still writing never loses this answer; later steps get "unknown session" errors.
                    yield error_answer(e, step_id)
                except Exception as e:
                    logger.exception("inference step failed")
                    yield error_answer(e, step_id)
        finally:
            if session is not None:
                self.inbox.forget(session.session_id)
            if session is not None and backend is not None:
                backend.close_session(session)

    async def _step(
        self, backend: SpanBackend, session: ServerSession, msg: Step, request: runtime_pb2.ExpertRequest
    ) -> runtime_pb2.ExpertResponse:
        """Run one step: its input from the message or pushed by the previous hop; push its output on if asked."""
        if msg.from_peer is None:
            hidden = _one_tensor(request)
        else:
            if request.tensors:
                raise ProtocolError("a step whose input is pushed by the previous hop carries no tensor")
            wait = min(msg.wait, self.idle_timeout)
            hidden = await self.inbox.take(session.session_id, msg.from_peer, msg.position, msg.step_id, wait)
        out = await backend.inference_step(session, msg.position, hidden)
        commitment = self._commit(backend, session, msg.position, hidden, out)
        forwarding = msg.from_peer is not None or msg.next_peer is not None
        forward_error = None
        if msg.next_peer is not None:
            push = Push(session_id=session.session_id, position=msg.position, step_id=msg.step_id + 1)
            forward_error = await self.forwarder.push(msg.next_peer, push, out, msg.push_within)
        meta = StepResult(
            step_id=msg.step_id,
            position=session.cache.length,
            input_digest=tensor_digest(hidden) if forwarding else None,
            forward_error=forward_error,
            commitment=commitment,
        )
        return runtime_pb2.ExpertResponse(tensors=[serialize(out)], metadata=meta.encode())

    def _commit(
        self, backend: SpanBackend, session: ServerSession, position: int, hidden: torch.Tensor, out: torch.Tensor
    ) -> str | None:
        """Extend the session's running input hash by the step's inputs and sign the step's output (hex)."""
        chain = session.inputs_chain
        chain.truncate(position)  # a rewind: the step starts at ``position`` (the backend checked it)
        if chain.length != position:  # positions this chain never saw (cannot happen: steps start at 0)
            return None
        input_hash = chain.extend(hidden)
        if self.identity is None:
            return None
        model = str(self._info.get("model", ""))
        digest = commitment_digest(model, session.start, session.end, position, chain.length, input_hash, out)
        return sign_commitment(self.identity, digest).hex()

    async def _steps(
        self,
        backend: SpanBackend,
        session: ServerSession,
        msg: Steps,
        request: runtime_pb2.ExpertRequest,
        peer: str,
    ) -> runtime_pb2.ExpertResponse:
        """Run a batched decode step: this stream's session first, then other sessions the same peer opened."""
        steps = [(session, msg.sessions[0].position)]
        steps += [(backend.session_of(at.session_id, peer), at.position) for at in msg.sessions[1:]]
        hidden = _one_tensor(request)
        out = await backend.decode_steps(steps, hidden)
        rows = [s.batch_size for s, _ in steps]
        commitments = [
            self._commit(backend, s, position, x, o)
            for (s, position), x, o in zip(steps, hidden.split(rows), out.split(rows), strict=True)
        ]
        meta = StepResult(
            step_id=msg.step_id,
            position=session.cache.length,
            positions=[s.cache.length for s, _ in steps],
            commitments=commitments,
        )
        return runtime_pb2.ExpertResponse(tensors=[serialize(out)], metadata=meta.encode())

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Inputs another server pushes for the sessions it precedes (one stream per pushing server).

        Only refused pushes get an answer (the pusher logs it; the client learns of it from the step that waits).
        """
        peer = str(context.remote_id)
        admitted = False
        iterator = aiter(requests)
        while True:
            request = await self._next_request(iterator, "a push", peer)
            if request is None:
                return
            step_id = -1
            try:
                msg = Push.decode(request.metadata)
                step_id = msg.step_id
                check_version(msg.version)
                if not admitted:
                    try:
                        self.gate.admit(msg.proof, peer, str(context.local_id))
                    except PrivateSwarmError as e:
                        logger.info("refused a push stream from %s: %s", peer[-6:], e)
                        yield error_answer(e)
                        return
                    admitted = True
                backend = self._backend
                if backend is None or msg.session_id not in backend.sessions:
                    raise SessionClosedError(f"no open session {msg.session_id!r} here to push to")
                pushed = Pushed(peer, msg.position, msg.step_id, _one_tensor(request))
                self.inbox.offer(msg.session_id, pushed)  # taken pushes are not acknowledged: one message less
            except CorollaError as e:
                logger.info("refused a push from %s: %s", peer[-6:], e)
                yield error_answer(e, step_id)
            except Exception as e:
                logger.exception("push failed")
                yield error_answer(e, step_id)

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stateless forward: metadata in the first part, hidden states split into parts along length."""
        peer = str(context.remote_id)
        held = [0]  # tokens this call holds in the backend's in-flight budget
        backend: SpanBackend | None = None
        try:
            backend = self._serving()
            try:
                out = await asyncio.wait_for(
                    self._forward(backend, requests, peer, context, held), self.cfg.forward_timeout
                )
            except TimeoutError as e:
                raise PeerUnavailableError(
                    self.peer_id,
                    f"the forward did not finish within {self.cfg.forward_timeout:.0f} s; retry elsewhere",
                ) from e
            for part in length_parts(out, ANSWER_PART_BYTES):
                yield runtime_pb2.ExpertResponse(tensors=[serialize(part)], metadata=StepResult().encode())
        except CorollaError as e:
            logger.info("rejected a forward from %s: %s", peer[-6:], e)
            yield error_answer(e)
        except Exception as e:
            logger.exception("forward failed")
            yield error_answer(e)
        finally:
            if backend is not None and held[0]:
                backend.tokens_in_flight.release(peer, held[0], context.group)

    async def _forward(
        self,
        backend: SpanBackend,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        peer: str,
        context: StreamContext,
        held: list[int],
    ) -> Any:
        """Read a forward's parts (each counted against the caps as it arrives) and run it."""
        import torch

        parts: list[Any] = []
        meta: ForwardRequest | None = None
        total = 0
        messages = 0
        async for request in requests:
            messages += 1
            if messages > self.cfg.max_forward_parts:
                raise ProtocolError(
                    f"a forward may be split into at most {self.cfg.max_forward_parts} messages; send fewer, larger ones"
                )
            if meta is None:
                meta = ForwardRequest.decode(request.metadata)
                check_version(meta.version)
                self.gate.admit(meta.proof, peer, str(context.local_id))
            for proto in request.tensors:
                t = deserialize(proto)
                total += t.numel()
                if total > backend.cfg.max_chunk_tokens * backend.hidden_size:
                    raise ProtocolError("forward request too large; split the batch")
                tokens = max(1, t.numel() // backend.hidden_size)
                backend.tokens_in_flight.acquire(peer, tokens, context.group)
                held[0] += tokens
                parts.append(t)
        if meta is None or not parts:
            raise ProtocolError("empty forward request")
        if any(p.ndim != 3 or p.shape[0] != parts[0].shape[0] for p in parts):
            raise ProtocolError("forward parts must be [batch, length, hidden] with one batch size")
        hidden = torch.cat(parts, dim=1)
        del parts
        return await backend.forward(meta.start, meta.end, hidden, peer, meta.adapter)

"""Talking to one server for training: a forward with deep prompts and a backward through its blocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.engine.client.remote import _blaming, _check
from corolla.engine.errors import CorollaError, PeerUnavailableError
from corolla.engine.wire.messages import StepResult
from corolla.engine.wire.training import (
    RPC_BACKWARD,
    RPC_TRAIN_FORWARD,
    Assembler,
    TrainRequest,
    answer_shapes,
    pieces,
)


async def remote_train_call(
    p2p: P2P,
    peer_id: str,
    req: TrainRequest,
    tensors: Sequence[torch.Tensor],
    max_chunk_bytes: int,
    timeout: float,
) -> list[torch.Tensor]:
    """Send a training forward or backward to one server; return its answer's tensors (checked shapes).

    Args:
        p2p: the client's P2P instance.
        peer_id: the server.
        req: the header (kind, blocks, sizes).
        tensors: what :func:`corolla.engine.wire.training.request_shapes` lists, in that order.
        max_chunk_bytes: bytes per message.
        timeout: seconds for the whole call.
    """
    hidden_size = int(tensors[0].shape[-1])
    header = req.encode()

    async def parts() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for i, piece in enumerate(pieces(tensors, max_chunk_bytes)):
            yield runtime_pb2.ExpertRequest(tensors=[piece], metadata=header if i == 0 else b"")

    async def call() -> list[torch.Tensor]:
        answer = Assembler(answer_shapes(req, hidden_size))
        rpc = RPC_TRAIN_FORWARD if req.kind == "forward" else RPC_BACKWARD
        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), rpc, parts(), runtime_pb2.ExpertResponse
        )
        async for response in responses:
            _check(peer_id, StepResult.decode(response.metadata))
            for proto in response.tensors:
                answer.add(proto)
        if answer.received < answer.expected:
            # hivemind ends the iteration quietly when the connection closes: a server that died mid-way.
            raise PeerUnavailableError(peer_id, f"closed the stream before answering the whole {req.kind}")
        return answer.tensors()

    try:
        with _blaming(peer_id):
            return await asyncio.wait_for(call(), timeout)
    except CorollaError:
        raise
    except Exception as e:
        raise PeerUnavailableError(peer_id, f"{type(e).__name__}: {e}") from e

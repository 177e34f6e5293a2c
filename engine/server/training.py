"""Training RPCs: a forward with deep prompts, and a backward through frozen blocks.

The server keeps no state between the two: a backward carries the span's inputs again, the server
recomputes the forward with autograd on and returns the gradients of the inputs (and of the deep
prompts, when given). Every size follows from the header and is checked against the same limits as a
stateless forward (batch, tokens per call, tokens in flight per peer and in total, parts, time) before
any tensor is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import torch
from hivemind.proto import runtime_pb2

from corolla.engine.config import ServerConfig
from corolla.engine.errors import CorollaError, PeerUnavailableError, ProtocolError
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.frames import StreamContext
from corolla.engine.wire.messages import StepResult, check_version
from corolla.engine.wire.tensors import ANSWER_PART_BYTES
from corolla.engine.wire.training import Assembler, TrainRequest, answer_shapes, pieces, request_shapes

logger = logging.getLogger(__name__)

ErrorAnswer = Callable[[Exception], runtime_pb2.ExpertResponse]


def check_request(backend: SpanBackend, req: TrainRequest) -> None:
    """Refuse a training call this server may not run, from its header alone."""
    check_version(req.version)
    backend.check_span(req.start, req.end)
    cfg = backend.cfg
    if req.batch > cfg.max_batch_size:
        raise ProtocolError(
            f"batch of {req.batch} exceeds this server's {cfg.max_batch_size}; "
            "set the client's micro_batch_size to at most that"
        )
    if req.batch * req.length > cfg.max_chunk_tokens:
        raise ProtocolError(
            f"{req.batch * req.length} tokens in one training call exceed {cfg.max_chunk_tokens}; "
            "use smaller micro-batches (the client's micro_batch_size) or shorter sequences"
        )
    if req.pre > req.length:
        raise ProtocolError(f"{req.pre} deep prompt positions exceed the sequence length {req.length}")
    if (req.end - req.start) * req.batch * req.pre > cfg.max_chunk_tokens:
        raise ProtocolError(
            f"deep prompts of {req.end - req.start} blocks x {req.batch} x {req.pre} exceed "
            f"{cfg.max_chunk_tokens} positions; use fewer prompt tokens or a smaller micro_batch_size"
        )
    backend.check_adapter(req.adapter)


def _checked(backend: SpanBackend, t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ProtocolError(f"{what} contain NaN or infinity")
    return t.to(backend.device, backend.dtype)


def train_forward(
    backend: SpanBackend, req: TrainRequest, hidden: torch.Tensor, prompts: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """The compute job of a forward with deep prompts (outputs in the wire dtype, on the CPU)."""
    wire = hidden.dtype
    x = backend.check_hidden(hidden, req.batch)
    p = _checked(backend, prompts, "deep prompts") if prompts is not None else None

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = backend.span(x, None, 0, start=req.start, end=req.end, prompts=p, adapter=req.adapter)
        return out.to("cpu", wire)

    return run


def train_backward(
    backend: SpanBackend, req: TrainRequest, hidden: torch.Tensor, grad: torch.Tensor, prompts: torch.Tensor | None
) -> Callable[[], list[torch.Tensor]]:
    """The compute job of a backward: recompute the forward, return d(inputs) and d(deep prompts)."""
    wire = hidden.dtype
    x = backend.check_hidden(hidden, req.batch)
    g = _checked(backend, grad, "output gradients")
    p = _checked(backend, prompts, "deep prompts") if prompts is not None else None

    def run() -> list[torch.Tensor]:
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            ps = p.detach().requires_grad_(True) if p is not None else None
            out = backend.span(xs, None, 0, start=req.start, end=req.end, prompts=ps, adapter=req.adapter)
            wrt = [xs] if ps is None else [xs, ps]
            grads = torch.autograd.grad(out, wrt, grad_outputs=g)
        return [t.to("cpu", wire) for t in grads]

    return run


class TrainingRPCs:
    """Serves ``rpc_train_forward`` and ``rpc_backward`` for whatever span the server runs now."""

    def __init__(
        self,
        serving: Callable[[], SpanBackend],
        cfg: ServerConfig,
        error_answer: ErrorAnswer,
        admit: Callable[[str | None, str, str], None] = lambda proof, client, server: None,
        *,
        peer_id: str,
    ) -> None:
        self.serving = serving
        self.peer_id = peer_id  # this server's (named in the errors it answers about itself)
        self.cfg = cfg
        self.error_answer = error_answer
        self.admit = admit  # a private swarm's membership check: (proof, client id, server id); raises if refused

    async def rpc_train_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Forward through frozen blocks with optional deep prompts."""
        async for response in self._serve("forward", requests, context):
            yield response

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Gradients of a span's inputs (and deep prompts) given its inputs and its outputs' gradients."""
        async for response in self._serve("backward", requests, context):
            yield response

    async def _serve(
        self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: StreamContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = str(context.remote_id)
        held = [0]
        backend: SpanBackend | None = None
        try:
            backend = self.serving()
            try:
                outs = await asyncio.wait_for(
                    self._run(kind, backend, requests, peer, context, held), self.cfg.forward_timeout
                )
            except TimeoutError as e:
                raise PeerUnavailableError(
                    self.peer_id, f"the {kind} did not finish within {self.cfg.forward_timeout:.0f} s; retry elsewhere"
                ) from e
            for piece in pieces(outs, ANSWER_PART_BYTES):
                yield runtime_pb2.ExpertResponse(tensors=[piece], metadata=StepResult().encode())
        except CorollaError as e:
            logger.info("rejected a %s from %s: %s", kind, peer[-6:], e)
            yield self.error_answer(e)
        except Exception as e:
            logger.exception("training %s failed", kind)
            yield self.error_answer(e)
        finally:
            if backend is not None and held[0]:
                backend.tokens_in_flight.release(peer, held[0], context.group)

    async def _run(
        self,
        kind: str,
        backend: SpanBackend,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        peer: str,
        context: StreamContext,
        held: list[int],
    ) -> list[torch.Tensor]:
        """Read the header, check it, reserve the tokens, read the pieces, run the job."""
        req: TrainRequest | None = None
        collected = Assembler([])  # replaced once the header is read
        messages = 0
        async for request in requests:
            messages += 1
            if messages > self.cfg.max_forward_parts:
                raise ProtocolError(
                    f"a training call may be split into at most {self.cfg.max_forward_parts} messages; "
                    "send fewer, larger ones"
                )
            if req is None:
                req = TrainRequest.decode(request.metadata)
                self.admit(req.proof, peer, str(context.local_id))  # before anything else is looked at
                if req.kind != kind:
                    raise ProtocolError(f"a {req.kind} header sent to the {kind} RPC")
                check_request(backend, req)
                tokens = req.batch * req.length
                backend.tokens_in_flight.acquire(peer, tokens, context.group)
                held[0] = tokens
                collected = Assembler(request_shapes(req, backend.hidden_size))
            for proto in request.tensors:
                collected.add(proto)
        if req is None:
            raise ProtocolError(f"empty {kind} request")
        tensors = collected.tensors()
        prompts = tensors[-1] if req.pre else None
        if kind == "forward":
            out = await backend.compute(train_forward(backend, req, tensors[0], prompts), peer)
            backend.count_processed(req.batch * req.length)
            return [out]
        grads = await backend.compute(train_backward(backend, req, tensors[0], tensors[1], prompts), peer)
        return grads


__all__ = ["TrainingRPCs", "answer_shapes", "check_request", "train_backward", "train_forward"]

"""Differentiable remote blocks: a ``torch.autograd.Function`` whose forward and backward run on the swarm.

The forward keeps what the backward needs on the client: the route it took and each hop's inputs. The
backward sends each hop its inputs again with the gradients of its outputs; the server recomputes its
blocks' forward and answers with the gradients of the inputs (and of the deep prompts). When a hop fails,
its server is avoided for a while and the rest is re-planned: in the forward, from the failed hop's first
block on; in the backward, the failed hop's blocks are run forward again on a new route (same inputs, same
frozen weights, so the same result) and its backward goes through that route.

A batch larger than ``ClientConfig.micro_batch_size`` travels as micro-batches of at most that many
sequences: each has its own route, trace and retry budget, so a failure re-sends one micro-batch, not
the whole batch, and no call exceeds the servers' batch limits. Rows of a batch do not interact, so the
result is that of the whole batch at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.remote_training import remote_train_call
from corolla.engine.config import ClientConfig
from corolla.engine.errors import PeerUnavailableError
from corolla.engine.routing.planner import RouteHop
from corolla.engine.routing.sequence_manager import describe_route
from corolla.engine.wire.tensors import WIRE_DTYPES
from corolla.engine.wire.training import TrainRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopTrace:
    """One hop of a forward: which server ran which blocks, and the hidden states it was given."""

    hop: RouteHop
    inputs: torch.Tensor  # [batch, length, hidden], CPU, wire dtype


def micro_batches(batch: int, size: int) -> list[slice]:
    """Consecutive row ranges of at most ``size`` rows covering ``batch`` rows."""
    if size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {size}")
    if batch < 1:
        raise ValueError("nothing to run through the blocks: the batch has no sequences")
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


class RemoteBlocks:
    """Runs training forwards and backwards of blocks ``start..end-1`` through the swarm, with re-planning."""

    def __init__(self, context: ClientContext, adapter: str | None = None) -> None:
        self.context = context
        self.manager = context.manager
        self.adapter = adapter
        self.last_trace: list[HopTrace] = []  # hops of the latest (micro-batch) forward: which server ran which blocks

    @property
    def cfg(self) -> ClientConfig:
        """The client settings these blocks run with (retries, chunk sizes, micro-batches)."""
        return self.context.config

    def _call(self, hop: RouteHop, kind: str, tensors: list[torch.Tensor], pre: int) -> list[torch.Tensor]:
        x = tensors[0]
        req = TrainRequest(
            kind=kind,  # type: ignore[arg-type]
            start=hop.start,
            end=hop.end,
            batch=x.shape[0],
            length=x.shape[1],
            pre=pre,
            adapter=self.adapter,
            proof=self.context.proof(hop.peer_id),
        )
        out = self.context.loop.run(
            remote_train_call(
                self.context.p2p, hop.peer_id, req, tensors, self.cfg.max_chunk_bytes, self.cfg.request_timeout
            )
        )
        self.manager.mark_ok(hop.peer_id)
        return out

    def _budget(self) -> list[int]:
        return [self.cfg.max_retries]

    def _failed(self, hop: RouteHop, error: PeerUnavailableError, budget: list[int]) -> None:
        if budget[0] <= 0:
            raise error
        budget[0] -= 1
        self.manager.ban(hop.peer_id, str(error))

    def forward(
        self, hidden: torch.Tensor, prompts: torch.Tensor | None, start: int = 0, end: int | None = None
    ) -> tuple[torch.Tensor, list[HopTrace]]:
        """Outputs of blocks ``start..end-1`` for ``hidden`` [batch, length, hidden] and the trace of hops.

        ``prompts`` are the deep prompts of *every* block of the model [blocks, batch, pre, hidden] or None.
        """
        end = self.manager.num_blocks if end is None else end
        out, trace = self._forward(hidden, prompts, start, end, self._budget())
        self.last_trace = trace
        return out, trace

    def _forward(
        self, x: torch.Tensor, prompts: torch.Tensor | None, start: int, end: int, budget: list[int]
    ) -> tuple[torch.Tensor, list[HopTrace]]:
        trace: list[HopTrace] = []
        block = start
        while block < end:
            route = self.manager.plan_forward(block, end)
            logger.debug("training forward %s", describe_route(route))
            for hop in route:
                tensors = [x] if prompts is None else [x, prompts[hop.start : hop.end]]
                pre = 0 if prompts is None else int(prompts.shape[2])
                try:
                    (out,) = self._call(hop, "forward", tensors, pre)
                except PeerUnavailableError as e:
                    self._failed(hop, e, budget)
                    break  # re-plan from this hop's first block with the same inputs
                trace.append(HopTrace(hop, x))
                x, block = out, hop.end
        return x, trace

    def backward(
        self, trace: list[HopTrace], grad: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the first hop's inputs and of the deep prompts, given those of the last hop's outputs."""
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        grad = self._backward(trace, grad, prompts, grad_prompts, self._budget())
        return grad, grad_prompts

    def _backward(
        self,
        trace: list[HopTrace],
        grad: torch.Tensor,
        prompts: torch.Tensor | None,
        grad_prompts: torch.Tensor | None,
        budget: list[int],
    ) -> torch.Tensor:
        for step in reversed(trace):
            hop = step.hop
            tensors = [step.inputs, grad]
            pre = 0
            if prompts is not None:
                tensors.append(prompts[hop.start : hop.end])
                pre = int(prompts.shape[2])
            try:
                answer = self._call(hop, "backward", tensors, pre)
            except PeerUnavailableError as e:
                self._failed(hop, e, budget)
                # Same inputs, same frozen weights on other servers: redo this hop's forward, then its backward.
                _, retrace = self._forward(step.inputs, prompts, hop.start, hop.end, budget)
                grad = self._backward(retrace, grad, prompts, grad_prompts, budget)
                continue
            grad = answer[0]
            if grad_prompts is not None:
                grad_prompts[hop.start : hop.end] += answer[1]
        return grad


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, blocks: RemoteBlocks
    ) -> torch.Tensor:
        wire = hidden.dtype if hidden.dtype in WIRE_DTYPES.values() else torch.float32
        x = hidden.detach().to("cpu", wire)  # [batch, length, hidden]
        p = prompts.detach().to("cpu", wire) if prompts is not None else None  # [blocks, batch, pre, hidden]
        parts = micro_batches(x.shape[0], blocks.cfg.micro_batch_size)
        outs, traces = [], []
        for rows in parts:
            out, trace = blocks.forward(x[rows], p[:, rows] if p is not None else None)
            outs.append(out)
            traces.append(trace)
        ctx.blocks, ctx.parts, ctx.traces, ctx.prompts = blocks, parts, traces, p
        ctx.hidden_meta = (hidden.device, hidden.dtype)
        ctx.prompt_meta = (prompts.device, prompts.dtype) if prompts is not None else None
        return torch.cat(outs).to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        first = ctx.traces[0]
        wire = first[0].inputs.dtype if first else torch.float32
        g = grad_out.detach().to("cpu", wire)  # [batch, length, hidden]
        p = ctx.prompts
        grads_in, grads_prompts = [], []
        for rows, trace in zip(ctx.parts, ctx.traces, strict=True):
            grad_in, grad_prompts = ctx.blocks.backward(trace, g[rows], p[:, rows] if p is not None else None)
            grads_in.append(grad_in)
            grads_prompts.append(grad_prompts)
        device, dtype = ctx.hidden_meta
        gp = None
        if p is not None and ctx.prompt_meta is not None:
            gp = torch.cat(grads_prompts, dim=1).to(*ctx.prompt_meta)  # [blocks, batch, pre, hidden]
        return torch.cat(grads_in).to(device, dtype), gp, None


def remote_blocks(hidden: torch.Tensor, prompts: torch.Tensor | None, blocks: RemoteBlocks) -> torch.Tensor:
    """Differentiable outputs of every remote block for ``hidden`` [batch, length, hidden].

    Args:
        hidden: inputs of block 0.
        prompts: deep prompts [blocks, batch, pre, hidden] (added to the first ``pre`` positions before
            each block), or None.
        blocks: the swarm access.
    """
    out: torch.Tensor = _RemoteBlocksFunction.apply(hidden, prompts, blocks)
    return out

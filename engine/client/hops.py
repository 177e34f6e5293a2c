"""One hop of a session's live route (its stream and every input it was sent), and what hops share:
which failures count as retryable, step timeouts, chunking, closing, whom a failure blames, and which hop of
a forwarded step went silent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.forwarding import ForwardedDeadlines
from corolla.engine.client.remote import HopStream
from corolla.engine.errors import (
    CacheFullError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.routing.planner import RouteHop
from corolla.engine.routing.sequence_manager import describe_route
from corolla.engine.routing.trust import silent_bound
from corolla.engine.wire.messages import StepResult

RETRYABLE = (PeerUnavailableError, CacheFullError, SessionClosedError, ProtocolError)
"""Failures of one server that another server of the same blocks may not have: ban, re-plan, retry."""


@dataclass
class Hop:
    """One hop of the live route, every input it has been sent (for replay and audits), and the outputs
    its server claimed since ``audited`` (the position up to which its outputs are audited, or were never
    the server's: a replayed history's outputs fed nobody), each with the server's signature of it (kept
    only while unaudited: the evidence of a report, see :mod:`~corolla.engine.client.reporting`)."""

    stream: HopStream
    inputs: list[torch.Tensor] = field(default_factory=list)  # each [batch, new, hidden]
    audited: int = 0
    claims: list[torch.Tensor] = field(
        default_factory=list
    )  # outputs of positions audited.., each [batch, new, hidden]
    commitments: list[bytes | None] = field(default_factory=list)  # the server's signature of each claim
    steps: int = 0  # steps of the server since its last audit

    def record(self, x: torch.Tensor, out: torch.Tensor, commitment: bytes | None = None) -> None:
        """The server answered ``out`` for inputs ``x`` (both [batch, new, hidden]), signed with ``commitment``
        (None: unsigned); the next hop takes ``out``."""
        self.inputs.append(x)
        self.claims.append(out)
        self.commitments.append(commitment)
        self.steps += 1

    def claimed(self) -> torch.Tensor | None:
        """Unaudited outputs, [batch, position - audited, hidden] (None if there are none)."""
        return torch.cat(self.claims, dim=1) if self.claims else None

    def claimed_steps(self) -> list[tuple[int, torch.Tensor, bytes | None]]:
        """Each unaudited step as (its first position, its outputs [batch, n, hidden], its signature)."""
        steps, first = [], self.audited
        for claim, commitment in zip(self.claims, self.commitments, strict=True):
            steps.append((first, claim, commitment))
            first += claim.shape[1]
        return steps

    def mark_audited(self, position: int) -> None:
        """Every output before ``position`` is audited (or fed nobody)."""
        self.audited, self.claims, self.commitments, self.steps = position, [], [], 0

    def passed_audit(self, end: int, steps: int) -> None:
        """Outputs before ``end`` passed an audit that began when the hop had ``steps`` unaudited steps; the
        steps it recorded since stay claimed, each with its signature (the audit ran while the hop went on
        stepping; a step cut in two by ``end`` keeps its tail, unsigned)."""
        if end <= self.audited:
            return
        claims, commitments, first = [], [], self.audited
        for claim, commitment in zip(self.claims, self.commitments, strict=True):
            last = first + claim.shape[1]
            if last > end:
                cut = max(0, end - first)
                claims.append(claim if cut == 0 else claim[:, cut:].clone())
                commitments.append(commitment if cut == 0 else None)
            first = last
        self.claims, self.commitments = claims, commitments
        self.audited = end
        self.steps = max(0, self.steps - steps)

    def postpone(self) -> None:
        """No replica could audit the claims: keep them, restart the schedule's count."""
        self.steps = 0

    def rewind(self, position: int) -> None:
        """Forget inputs and claims from ``position`` on (a step cut in two loses its signature)."""
        self.truncate(position)
        if position <= self.audited:
            self.mark_audited(position)
            return
        claims, commitments, first = [], [], self.audited
        for claim, commitment in zip(self.claims, self.commitments, strict=True):
            if first >= position:
                break
            keep = min(claim.shape[1], position - first)
            claims.append(claim if keep == claim.shape[1] else claim[:, :keep])
            commitments.append(commitment if keep == claim.shape[1] else None)
            first += claim.shape[1]
        self.claims, self.commitments = claims, commitments

    @property
    def start(self) -> int:
        return self.stream.start

    @property
    def end(self) -> int:
        return self.stream.end

    def history(self, length: int) -> torch.Tensor | None:
        """Inputs of the first ``length`` positions, [batch, length, hidden]."""
        if length == 0 or not self.inputs:
            return None
        return torch.cat(self.inputs, dim=1)[:, :length]

    def truncate(self, length: int) -> None:
        """Forget the inputs of positions from ``length`` on (only the tail is touched, not the whole history)."""
        held = sum(x.shape[1] for x in self.inputs)
        while self.inputs and held - self.inputs[-1].shape[1] >= length:
            held -= self.inputs.pop().shape[1]
        if self.inputs and held > length:
            last = self.inputs[-1]
            self.inputs[-1] = last[:, : last.shape[1] - (held - length)].clone()  # not a view: frees the rest


def describe_hops(hops: list[Hop]) -> str:
    """One short line for a route of live hops (see :func:`describe_route`)."""
    return describe_route([RouteHop(h.stream.peer_id, h.start, h.end) for h in hops])


def step_timeout(context: ClientContext, peer_id: str, tokens: int, blocks: int) -> float:
    """Seconds to wait for a step before the server counts as silent: tied to its measured round trip."""
    manager, config = context.manager, context.config
    return silent_bound(
        manager.expected_round_trip(peer_id),
        tokens,
        blocks,
        manager.believed_block_s(peer_id),
        floor_s=config.stall_timeout,
        ceiling_s=config.step_timeout,
    )


def chunks(hidden: torch.Tensor, max_chunk_bytes: int) -> list[torch.Tensor]:
    """``hidden`` [batch, length, hidden] cut along the length into steps of at most ``max_chunk_bytes``."""
    per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
    size = max(1, max_chunk_bytes // per_token)
    return [hidden[:, i : i + size] for i in range(0, hidden.shape[1], size)]


async def close_hops(hops: list[Hop], session_id: str) -> None:
    """Close the session on every hop's server."""
    for hop in hops:
        await hop.stream.close(session_id)


def culprit(error: Exception, hops: list[Hop]) -> str:
    """The full peer id a failure names (errors carry it as data); the first hop's if none does."""
    if isinstance(error, PeerError) and error.peer_id is not None:
        return error.peer_id
    return hops[0].stream.peer_id


async def first_silent(
    tasks: list[asyncio.Future[tuple[torch.Tensor, StepResult]]], plan: ForwardedDeadlines
) -> int | None:
    """Watch a forwarded step's hops in route order; cancel the first one silent past its stage, and return it.

    Hop ``k`` gets ``plan.stages[k]`` seconds from the moment its input was due: the answer of hop ``k - 1``
    when that hop pushed its output on (the start, for the first hop), so a frozen hop costs one stall bound,
    not the sum of every hop's bounds. A hop whose predecessor failed or could not push gets no input: it is
    not at fault, and answers "no push" once its own wait (``plan.waits[k]`` from the start) runs out, so its
    stage runs from then. Cancelling it early would abort a healthy stream and cost a second failover.
    """
    loop = asyncio.get_running_loop()
    start = since = loop.time()
    for k, task in enumerate(tasks):
        done, _ = await asyncio.wait({task}, timeout=max(0.0, since + plan.stages[k] - loop.time()))
        if not done:
            task.cancel()  # its stream is aborted (a late answer would be read as the next one's)
            return k
        since = max(since, loop.time())
        handed_on = task.exception() is None and task.result()[1].forward_error is None
        if not handed_on and k + 1 < len(tasks):
            since = max(since, start + plan.waits[k + 1])  # no push comes: hop k + 1 answers when its wait ends
    return None

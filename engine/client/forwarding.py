"""Settling a forwarded step: which hops' answers the client keeps, and whom a failure blames.

In a forwarded step the client sends its input to the first hop only; each hop pushes its output to the
next one and also returns it to the client, with the digest of the input it computed on. The client keeps
the answers of the first hops whose inputs were exactly the outputs it got from their predecessors; it
redoes the rest the classic way (sending each hop its input itself), from the first hop it cannot keep.
Pure: no sockets, no clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from corolla.engine.errors import PeerUnavailableError
from corolla.engine.wire.forwarding import PushMissingError, tensor_digest


@dataclass(frozen=True)
class HopAnswer:
    """A hop's answer to a forwarded step."""

    out: torch.Tensor  # its outputs, [batch, new, hidden]
    input_digest: str | None  # digest of the input it says it computed on
    forward_error: str | None  # why it could not push its output to the next hop, if it could not
    commitment: bytes | None = None  # its signature of the output (wire/commitment.py), if it sent one


@dataclass(frozen=True)
class ForwardedStep:
    """What the client does with a forwarded step's answers."""

    done: int  # answers of hops 0..done-1 are kept; the step goes on the classic way from hop ``done``
    blame: BaseException | None = None  # hop ``done``'s failure, to ban and repair it as in a classic step
    mismatch: bool = False  # hop ``done`` computed on another input than the client knows: stop forwarding


def settle_forwarded_step(
    first_input: torch.Tensor, answers: Sequence[HopAnswer | BaseException], peers: Sequence[str]
) -> ForwardedStep:
    """Settle the answers of every hop of a forwarded step (``peers``: their peer ids, in route order).

    A hop whose input digest differs from the digest of its predecessor's output (or of the client's input,
    for the first hop) is redone the classic way and forwarding stops for the session: either its
    predecessor pushed something else than it answered, or the hop lies about what it got; nobody can tell
    which, and the classic way gives each server its input straight from the client. A hop that got no push
    blames nobody, unless its predecessor said the push failed: then the hop is unreachable from there.
    """
    expected = tensor_digest(first_input)
    for k, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            if isinstance(answer, PushMissingError):
                previous = answers[k - 1] if k > 0 else None
                if isinstance(previous, HopAnswer) and previous.forward_error:
                    return ForwardedStep(k, PeerUnavailableError(peers[k], previous.forward_error))
                return ForwardedStep(k)
            return ForwardedStep(k, answer)
        if answer.input_digest != expected:
            return ForwardedStep(k, mismatch=True)
        expected = tensor_digest(answer.out)
    return ForwardedStep(len(answers))


@dataclass(frozen=True)
class ForwardedDeadlines:
    """How long each hop of a forwarded step may take, in seconds (lists in route order)."""

    waits: list[float]  # the server of hop k waits this long (from the request) for its predecessor's push
    pushes: list[float]  # hop k spends at most this long pushing its output on before it answers (0: last hop)
    stages: list[float]  # the client gives hop k this long from its predecessor's answer (the start, for hop 0)
    ceilings: list[float]  # the client's own limit on hop k's answer, from the start (it should never be reached)


def forwarded_deadlines(timeouts: Sequence[float], floor: float) -> ForwardedDeadlines:
    """Deadlines of a forwarded step whose hop k counts as silent after ``timeouts[k]`` s of work.

    Every hop gets its request at once, so a hop's wait covers its predecessors' work: one ``floor`` (the
    stall bound) plus what each predecessor's bound adds above it, which is at least the largest of their
    bounds; a sum of bounds would make a frozen hop cost a floor per hop before anyone notices. The client
    judges each hop from the moment its predecessor answered (its push went out just before): a hop silent
    for its own bound plus its push's allowance is frozen, whatever its place in the route.
    """
    n = len(timeouts)
    pushes = [t / 2 if k + 1 < n else 0.0 for k, t in enumerate(timeouts)]
    waits = [0.0] + [floor + sum(max(0.0, t - floor) for t in timeouts[:k]) for k in range(1, n)]
    stages = [t + p for t, p in zip(timeouts, pushes, strict=True)]
    ceilings = [waits[k] + sum(pushes[:k]) + stages[k] for k in range(n)]
    return ForwardedDeadlines(waits=waits, pushes=pushes, stages=stages, ceilings=ceilings)

"""Pure parts of server-to-server forwarding: digests of hop inputs and the rules for a pushed input.

With forwarding, hop k sends its output straight to hop k+1 (a *push*) and also returns it to the client.
Each hop's answer carries the digest of the input it computed on, so the client can check that what hop k
pushed is what hop k told it (a pusher that answers the client honestly but pushes garbage is caught).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from corolla.engine.errors import ProtocolError, short_peer

DIGEST_BYTES = 16


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b (16 bytes, hex) of a tensor's dtype, shape and bytes: equal digests mean equal tensors."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PushMissingError(ProtocolError):
    """The previous hop's push did not arrive in time (nobody is blamed: the client resends the input)."""


@dataclass(frozen=True)
class Pushed:
    """An input pushed by a session's previous hop, waiting for the client's step that names it."""

    pusher: str  # peer id of the server that pushed it
    position: int  # tokens the session held before the step
    step_id: int  # the client's id of the step it is the input of
    hidden: Any  # the tensor, [batch, new, hidden] (checked like a client's input when the step runs)


def check_offer(expected: str | None, held: Pushed | None, offer: Pushed) -> None:
    """Raise ProtocolError if ``offer`` may not wait in a session's one slot (else it replaces ``held``).

    ``expected`` is the predecessor the client named in its latest step (None before its first forwarded
    step: then any server of the swarm may fill the slot; the step takes a push only from the peer it names).
    """
    if expected is not None and offer.pusher != expected:
        raise ProtocolError(
            f"peer {short_peer(offer.pusher)} is not the previous hop the client named for this session; "
            "only that server may push its inputs"
        )
    if held is not None and held.pusher == offer.pusher and held.step_id >= offer.step_id:
        raise ProtocolError(f"step {offer.step_id} comes after step {held.step_id} already pushed; push steps in order")


def match_pushed(held: Pushed | None, from_peer: str, position: int, step_id: int) -> tuple[bool, Pushed | None]:
    """(keep waiting?, the input) for a step that takes its input from ``from_peer``'s push.

    A held push of an older step or of another peer is dropped (``(True, None)``: keep waiting); a push
    for this step at another position is refused.
    """
    if held is None or held.pusher != from_peer or held.step_id < step_id:
        return True, None
    if held.step_id > step_id:
        raise ProtocolError(f"the previous hop pushed step {held.step_id} while step {step_id} waits for its input")
    if held.position != position:
        raise ProtocolError(f"the previous hop pushed position {held.position}, the client asked for {position}")
    return False, held

"""Signed commitments: a server signs what each inference step answered, so a third party can re-check a lie.

A server keeps, per session, a running hash of every input row the session has sent it from position 0
(:class:`InputChain`: 32 bytes per position, rewound with the session). With each step's answer it sends an
Ed25519 signature, by its peer id's key, over :func:`commitment_digest`: a domain tag, the model, the blocks,
the positions the step covered, the running input hash after the step, and the hash of the output bytes.

Whoever holds the inputs from position 0 through the step and the output can recompute the digest and check
the signature against the peer id alone (:func:`verify_commitment`): the server cannot deny having answered
that output to those inputs, and nobody else can make it look as if it had.
"""

from __future__ import annotations

import hashlib
import struct

import torch
from cryptography.exceptions import InvalidSignature

from corolla.engine.dht.signing import SIGNATURE_BYTES, PeerIdentity, peer_public_key

__all__ = [
    "COMMIT_DOMAIN",
    "InputChain",
    "commitment_digest",
    "sign_commitment",
    "tensor_bytes",
    "verify_commitment",
]

COMMIT_DOMAIN = b"corolla/step-commitment/v1\x00"
"""Prefix of every committed digest: a commitment signature is never valid for a record or anything else."""
_CHAIN_START = hashlib.sha256(b"corolla/input-chain/v1\x00").digest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor as it travels (little-endian, its own dtype; bfloat16 as 16-bit patterns)."""
    t = tensor.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class InputChain:
    """Running hash of a session's inputs, one link per position: ``h[p+1] = sha256(h[p] | rows of p)``.

    ``hashes[p]`` is the hash of positions ``0..p-1`` (``hashes[0]`` the start); memory is 32 bytes a position.
    """

    def __init__(self) -> None:
        self.hashes: list[bytes] = [_CHAIN_START]

    @property
    def length(self) -> int:
        """Positions hashed so far."""
        return len(self.hashes) - 1

    def truncate(self, position: int) -> None:
        """Forget positions from ``position`` on (the session rewound there)."""
        del self.hashes[position + 1 :]

    def extend(self, inputs: torch.Tensor) -> bytes:
        """Hash ``inputs`` [batch, new, hidden] as the next positions; returns the running hash after them."""
        h = self.hashes[-1]
        dtype = str(inputs.dtype).encode()
        rows = memoryview(tensor_bytes(inputs.transpose(0, 1)))  # position-major: row t is x[:, t] as sent
        size = len(rows) // max(inputs.shape[1], 1)
        for t in range(inputs.shape[1]):
            h = hashlib.sha256(h + dtype + rows[t * size : (t + 1) * size]).digest()
            self.hashes.append(h)
        return h

    @classmethod
    def of(cls, inputs: torch.Tensor) -> bytes:
        """The running hash of a whole history ``inputs`` [batch, position, hidden] from position 0."""
        return cls().extend(inputs)


def commitment_digest(
    model: str, start: int, end: int, first: int, last: int, input_hash: bytes, output: torch.Tensor
) -> bytes:
    """The 32 bytes a server signs for a step over blocks ``[start, end)`` that covered positions ``[first, last)``.

    Args:
        model: The model name (DHT prefix) the server serves.
        start: First block of the server's span the step ran through.
        end: One past its last block.
        first: Position of the step's first input row.
        last: One past its last (the session then holds ``last`` tokens).
        input_hash: The running hash of every input from position 0 through ``last`` (:class:`InputChain`).
        output: The step's answer, [batch, last - first, hidden], exactly as sent.
    """
    name = model.encode()
    out_hash = hashlib.sha256(str(output.dtype).encode() + str(list(output.shape)).encode() + tensor_bytes(output))
    return hashlib.sha256(
        b"".join(
            [
                COMMIT_DOMAIN,
                struct.pack(">H", len(name)),
                name,
                struct.pack(">IIQQ", start, end, first, last),
                input_hash,
                out_hash.digest(),
            ]
        )
    ).digest()


def sign_commitment(identity: PeerIdentity, digest: bytes) -> bytes:
    """The server's signature of a step's :func:`commitment_digest` (64 bytes)."""
    return identity.sign(digest)


def verify_commitment(
    peer_id: str,
    signature: bytes,
    *,
    model: str,
    start: int,
    end: int,
    inputs: torch.Tensor,
    output: torch.Tensor,
) -> bool:
    """Whether the owner of ``peer_id`` signed ``output`` as its answer to the last inputs of ``inputs``.

    Args:
        peer_id: The server that supposedly answered (an Ed25519 peer id: its public key).
        signature: What it sent with the answer.
        model: The model name.
        start: First block of the hop.
        end: One past its last block.
        inputs: Every input of the session on that server, [batch, last, hidden], from position 0 through the
            step (the step's own inputs are the last ``output.shape[1]`` positions).
        output: The answer, [batch, n, hidden].

    Never raises on untrusted input: anything malformed is simply not verified.
    """
    key = peer_public_key(peer_id)
    if key is None or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    if inputs.ndim != 3 or output.ndim != 3 or not 0 < output.shape[1] <= inputs.shape[1]:
        return False
    last = inputs.shape[1]
    digest = commitment_digest(model, start, end, last - output.shape[1], last, InputChain.of(inputs), output)
    try:
        key.verify(signature, digest)
    except InvalidSignature:
        return False
    return True

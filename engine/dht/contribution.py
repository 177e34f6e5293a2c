"""Contributor claims: a client proves that its owner also runs a server, to get served first under load.

A server that keeps its key in a file (``--identity-file``) lets its owner's client sign claims with that
key (``ClientConfig.contributor_key_file``). A claim names the server's peer id, the time, and an Ed25519
signature over (client peer id, target server peer id, time). The server the claim is sent to checks the
signature against the claimed peer id (an Ed25519 peer id is its public key) and then that the claimed
server is online: it has a signed, unexpired entry in the swarm's model index (see ``server/contributors``).
A claim is bound to both peer ids, so a server cannot pass a claim it received on to another server.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corolla.engine.dht.signing import PeerIdentity, peer_pair_bytes, peer_public_key
from corolla.engine.errors import CorollaError

CLAIM_WINDOW = 300.0  # seconds a claim stays valid either side of the server's clock
_DOMAIN = b"corolla/contributor-claim/v1\x00"
_PRIVATE_PREFIX = b"\x08\x01\x12\x40"  # libp2p protobuf of an Ed25519 private key (see signing.py)


def _payload(client_id: str, server_id: str, stamp: float) -> bytes:
    return peer_pair_bytes(_DOMAIN, client_id, server_id) + struct.pack(">d", stamp)


def make_claim(identity: PeerIdentity, client_id: str, server_id: str, now: float | None = None) -> str:
    """A claim, signed by ``identity`` (a server's key), that ``client_id`` belongs to that server's owner."""
    stamp = round(time.time() if now is None else now, 3)  # signed as written
    signature = identity.sign(_payload(client_id, server_id, stamp))
    return f"{identity.peer_id}:{stamp:.3f}:{signature.hex()}"


def check_claim(claim: str | None, client_id: str, server_id: str, now: float | None = None) -> str | None:
    """The claimed server's peer id if ``claim`` is validly signed for this pair of peers and fresh; else None."""
    if not claim or len(claim) > 512:
        return None
    parts = claim.split(":")
    if len(parts) != 3:
        return None
    peer_id, stamp_text, sig_hex = parts
    public_key = peer_public_key(peer_id)
    try:
        stamp = float(stamp_text)
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        return None
    now = time.time() if now is None else now
    if public_key is None or not abs(now - stamp) <= CLAIM_WINDOW:
        return None
    try:
        public_key.verify(signature, _payload(client_id, server_id, stamp))
    except InvalidSignature:
        return None
    return peer_id


def load_identity(path: str | os.PathLike[str], create: bool = False) -> PeerIdentity:
    """The server key kept in ``path`` (libp2p protobuf, as the p2p daemon reads it); made there if ``create``."""
    file = Path(path)
    if create and not file.exists():
        identity = PeerIdentity.generate()
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.libp2p_private_key())
        return identity
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise CorollaError(f"cannot read the identity file {path}: {e.strerror or e}") from e
    if len(raw) != len(_PRIVATE_PREFIX) + 64 or not raw.startswith(_PRIVATE_PREFIX):
        raise CorollaError(
            f"{path} is not a Corolla server identity file (written by `corolla server --identity-file`)"
        )
    return PeerIdentity(Ed25519PrivateKey.from_private_bytes(raw[len(_PRIVATE_PREFIX) : len(_PRIVATE_PREFIX) + 32]))

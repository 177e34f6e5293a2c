"""Proofs of membership in a private swarm, sent at the start of every RPC stream.

A proof is ``key id | time | nonce | HMAC(proof key, client peer id, server peer id, time, nonce)``, as hex.
libp2p authenticates both ends of a connection, so a server knows the client's peer id and its own: a proof
made for one pair of peers is worthless on any other connection. A server also refuses a proof older
than :data:`PROOF_WINDOW` seconds (or as far in the future) and a nonce it has already seen, so a proof is
good for one stream only. Everything here is pure except :class:`ReplayGuard`'s memory of nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict

from corolla.engine.dht.signing import peer_pair_bytes
from corolla.engine.dht.swarm_key import KID_BYTES, SwarmKeys, private_swarm_error
from corolla.engine.errors import PrivateSwarmError

PROOF_WINDOW = 300.0  # seconds a proof stays valid either side of the server's clock (peers' clocks drift)
NONCE_BYTES = 16
MAC_BYTES = 32
PROOF_BYTES = KID_BYTES + 8 + NONCE_BYTES + MAC_BYTES
MAX_PROOF_CHARS = 2 * PROOF_BYTES
_DOMAIN = b"corolla/stream-proof/v1\x00"


def _mac(proof_key: bytes, client_id: str, server_id: str, stamp: bytes, nonce: bytes) -> bytes:
    return hmac.new(proof_key, peer_pair_bytes(_DOMAIN, client_id, server_id) + stamp + nonce, hashlib.sha256).digest()


def make_proof(keys: SwarmKeys, client_id: str, server_id: str, now: float | None = None) -> str:
    """A fresh proof that ``client_id`` holds the swarm key, for one stream to ``server_id``."""
    key = keys.current
    stamp = struct.pack(">d", time.time() if now is None else now)
    nonce = os.urandom(NONCE_BYTES)
    return (key.kid + stamp + nonce + _mac(key.proof_key, client_id, server_id, stamp, nonce)).hex()


def check_proof(keys: SwarmKeys, proof: str | None, client_id: str, server_id: str, now: float | None = None) -> bytes:
    """The proof's nonce if ``proof`` is a valid, fresh proof for this pair of peers; else PrivateSwarmError."""
    if not proof:
        raise private_swarm_error(False)
    try:
        raw = bytes.fromhex(proof) if len(proof) <= MAX_PROOF_CHARS else b""
    except ValueError:
        raw = b""
    if len(raw) != PROOF_BYTES:
        raise PrivateSwarmError("malformed proof of membership; this swarm is private")
    kid, stamp = raw[:KID_BYTES], raw[KID_BYTES : KID_BYTES + 8]
    nonce, mac = raw[KID_BYTES + 8 : -MAC_BYTES], raw[-MAC_BYTES:]
    key = keys.by_kid(kid)
    if key is None or not hmac.compare_digest(mac, _mac(key.proof_key, client_id, server_id, stamp, nonce)):
        raise private_swarm_error(True)
    (made,) = struct.unpack(">d", stamp)
    now = time.time() if now is None else now
    if not abs(now - made) <= PROOF_WINDOW:  # also refuses NaN
        raise PrivateSwarmError(
            f"proof of membership made {now - made:+.0f} s from this server's clock (window {PROOF_WINDOW:.0f} s); "
            "set the clocks of the swarm's machines right"
        )
    return nonce


class ReplayGuard:
    """Nonces of accepted proofs, remembered while their proofs are valid (bounded: oldest forgotten first).

    A proof is bound to the client's peer id, so only that client could replay it; this refuses even that.
    """

    def __init__(self, max_entries: int = 65536, window: float = PROOF_WINDOW) -> None:
        self.max_entries = max_entries
        self.window = window
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> time it may be forgotten

    def admit(self, nonce: bytes, now: float | None = None) -> None:
        """Remember ``nonce``; PrivateSwarmError if it was seen within the window."""
        now = time.monotonic() if now is None else now
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise PrivateSwarmError("this proof of membership was already used; every stream needs a fresh one")
        if len(self._seen) >= self.max_entries:
            self._seen.popitem(last=False)
        self._seen[nonce] = now + 2 * self.window


class MembershipGate:
    """The server side: checks the proof at the start of each stream (a public server admits everyone)."""

    def __init__(self, keys: SwarmKeys | None) -> None:
        self.keys = keys
        self.replays = ReplayGuard()

    def admit(self, proof: str | None, client_id: str, server_id: str) -> None:
        """Raise PrivateSwarmError unless this server is public or ``proof`` is a fresh, unused proof."""
        if self.keys is None:
            return
        self.replays.admit(check_proof(self.keys, proof, client_id, server_id))

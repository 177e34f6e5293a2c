"""Records bound to identity: a server signs what it announces with its libp2p key, and every peer checks.

A server record lives under the DHT key of a block with the server's peer id as subkey. The peer id of
an Ed25519 libp2p key *is* its public key (an identity multihash), so the signature of a record can
be checked against the subkey alone: nobody but the holder of that key can put a value under it.

The value stored in the DHT is an envelope ``{"v": 1, "body": <msgpack bytes>, "sig": <64 bytes>}``
whose signature covers the DHT key, the subkey, the expiration time and the body. A signed record
therefore cannot be replayed under another block (or model), under another peer id, or with a later
expiration. Unknown envelope fields are ignored; an unknown envelope version cannot be checked and
counts as unsigned.

Two checks use :func:`open_envelope`: :class:`SignedRecordValidator`, installed in every Corolla DHT
peer, refuses forged values when they are stored and when they are found, and readers check again
before they believe a record (a peer running other code may hand anything back).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID

ENVELOPE_VERSION = 1
MAX_BODY_BYTES = 4096  # a server record encodes to about 200 bytes
MAX_VALUE_BYTES = 2 * MAX_BODY_BYTES  # the whole envelope, checked before it is decoded
SIGNATURE_BYTES = 64  # Ed25519
_DOMAIN = b"corolla/record/v1\x00"  # so a record signature is never valid for anything else
MAX_VERIFIED = 16384  # signatures remembered as checked, per process (32-byte digests: about 2 MiB at most)

# libp2p key encodings (https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md): a protobuf
# {1: key type (Ed25519 = 1), 2: key bytes}; a peer id of a key this short is the identity multihash
# (code 0x00, then the length) of the public-key protobuf.
_ED25519_PUBLIC_PREFIX = b"\x08\x01\x12\x20"
_ED25519_PRIVATE_PREFIX = b"\x08\x01\x12\x40"
_IDENTITY_MULTIHASH = bytes([0x00, len(_ED25519_PUBLIC_PREFIX) + 32])


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id_of(public_key: Ed25519PublicKey) -> str:
    """The libp2p peer id (base58, ``12D3KooW…``) of an Ed25519 public key."""
    return PeerID(_IDENTITY_MULTIHASH + _ED25519_PUBLIC_PREFIX + _raw_public(public_key)).to_base58()


def peer_public_key(peer_id: Any) -> Ed25519PublicKey | None:
    """The public key a peer id stands for; ``None`` unless it is the id of an Ed25519 key (never raises).

    Corolla servers use Ed25519 identities only. RSA and other peer ids are hashes of their key, so a
    record under them cannot be checked from the subkey and is not accepted.
    """
    if not isinstance(peer_id, str) or len(peer_id) > 64:
        return None
    return _parse_peer_id(peer_id)


@functools.lru_cache(maxsize=4096)  # readers check every record of every server on each refresh
def _parse_peer_id(peer_id: str) -> Ed25519PublicKey | None:
    try:
        raw = PeerID.from_base58(peer_id).to_bytes()
    except ValueError:
        return None
    prefix = _IDENTITY_MULTIHASH + _ED25519_PUBLIC_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(raw[len(prefix) :])
    except ValueError:
        return None


def key_id(key: str) -> bytes:
    """The DHT's id of ``key``: what a :class:`DHTRecord` carries in place of the key itself."""
    return DHTID.generate(source=key).to_bytes()


def peer_pair_bytes(domain: bytes, client_id: str, server_id: str) -> bytes:
    """``domain`` then both peer ids, each length-prefixed: the start of what a proof between two peers covers
    (a contributor claim's signature, a private swarm's stream proof), so no two pairs share bytes."""
    parts = [domain]
    for text in (client_id, server_id):
        raw = text.encode()
        parts += [struct.pack(">H", len(raw)), raw]
    return b"".join(parts)


def signed_payload(key_id_bytes: bytes, subkey: str, expiration: float, body: bytes) -> bytes:
    """The exact bytes a record signature covers (length-prefixed, so no two inputs share them)."""
    sub = subkey.encode()
    return b"".join(
        [
            _DOMAIN,
            struct.pack(">H", len(key_id_bytes)),
            key_id_bytes,
            struct.pack(">H", len(sub)),
            sub,
            struct.pack(">d", expiration),
            body,
        ]
    )


class PeerIdentity:
    """An Ed25519 key pair: the libp2p identity of a DHT peer and the key that signs its records."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.peer_id = peer_id_of(private_key.public_key())

    @classmethod
    def generate(cls) -> PeerIdentity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    def __repr__(self) -> str:
        return f"PeerIdentity({self.peer_id})"

    def libp2p_private_key(self) -> bytes:
        """The private key as the libp2p protobuf that the p2p daemon reads from its identity file."""
        seed = self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return _ED25519_PRIVATE_PREFIX + seed + _raw_public(self._private_key.public_key())

    @contextlib.contextmanager
    def identity_file(self) -> Iterator[str]:
        """A private file (mode 0400 in a 0700 folder) holding the key for the p2p daemon; removed on exit."""
        with tempfile.TemporaryDirectory(prefix="corolla-identity-") as folder:
            path = os.path.join(folder, "identity.key")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(self.libp2p_private_key())
            yield path

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data`` (callers prefix their own domain, as :meth:`seal` does)."""
        return self._private_key.sign(data)

    def seal(self, key: str, value: dict[str, Any], expiration: float) -> dict[str, Any]:
        """The signed envelope of ``value``, to be stored under ``key`` and this peer's id until ``expiration``."""
        body = msgpack.packb(value, use_bin_type=True)
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(f"record of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit")
        signature = self._private_key.sign(signed_payload(key_id(key), self.peer_id, expiration, body))
        return {"v": ENVELOPE_VERSION, "body": body, "sig": signature}


class VerifiedSignatures:
    """Digests of (payload, signature) pairs this process already found valid, the oldest forgotten first.

    A read of a busy swarm gets the same signed values from several DHT peers and again at every refresh;
    Ed25519 checks (about 0.1 ms each, more on a loaded machine) of 50 servers x their blocks x each peer asked
    made a fresh client's first read take ~0.5 s. A pair found valid once stays valid (the payload names the
    signer, key, subkey and expiration), so only pairs never seen are checked. Failures are not remembered.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()  # the DHT's event loop and the client's threads both open envelopes

    def verify(self, public_key: Ed25519PublicKey, signature: bytes, payload: bytes) -> None:
        """Raise InvalidSignature unless ``signature`` of ``payload`` is ``public_key``'s."""
        digest = hashlib.sha256(signature + payload).digest()
        with self._lock:
            if digest in self._seen:
                self._seen.move_to_end(digest)
                return
        public_key.verify(signature, payload)
        with self._lock:
            self._seen[digest] = None
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)


_VERIFIED = VerifiedSignatures(MAX_VERIFIED)


def open_envelope(key_id_bytes: bytes, subkey: Any, envelope: Any, expiration: float) -> dict[str, Any] | None:
    """The value inside ``envelope`` if the owner of peer id ``subkey`` signed it for this key and expiration.

    Returns ``None`` for anything else: no envelope, an unknown version, a bad signature, a subkey that
    is not an Ed25519 peer id, a body that is not a msgpack map. Never raises on untrusted input.
    """
    public_key = peer_public_key(subkey)
    if public_key is None or not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
        return None
    body, signature = envelope.get("body"), envelope.get("sig")
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        return None
    if len(body) > MAX_BODY_BYTES or len(signature) != SIGNATURE_BYTES:
        return None
    try:
        _VERIFIED.verify(public_key, signature, signed_payload(key_id_bytes, subkey, expiration, body))
        value = msgpack.unpackb(body, raw=False)  # only once signed: a peer that signs junk only hurts itself
    except (InvalidSignature, ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _unpack(data: bytes) -> Any:
    """Decode bytes of a DHT record with plain msgpack (no extension types); ``None`` if that fails."""
    if len(data) > MAX_VALUE_BYTES:
        return None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError):  # malformed, truncated, unhashable map keys
        return None


class SignedRecordValidator(RecordValidatorBase):
    """hivemind record validator: a value under a subkey that is a peer id must be signed by that peer.

    hivemind calls :meth:`validate` when a peer asks this node to store a record and on every record
    another peer returns to a search, so a forged value is neither stored nor believed. Values under
    other subkeys (the swarm's model index) are left to the readers.
    """

    def validate(self, record: DHTRecord) -> bool:
        """Whether ``record`` may be stored or believed."""
        subkey = _unpack(record.subkey) if record.subkey else None
        if peer_public_key(subkey) is None:
            return True  # not a claim about a peer's identity
        envelope = _unpack(record.value)
        return open_envelope(record.key, subkey, envelope, float(record.expiration_time)) is not None

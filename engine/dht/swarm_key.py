"""Private swarms: a shared secret key that members' records are sealed with and their streams prove.

hivemind's p2p daemon has no pre-shared-key option, so anybody can open a libp2p connection to a member.
Privacy is therefore built one layer up, with a swarm key (32 random bytes, from ``corolla swarm-key new``):

* **Records.** :class:`SwarmKeyValidator` is a hivemind record validator that encrypts and authenticates
  every value a member stores (AES-GCM under a key derived from the swarm key, bound to the DHT key,
  subkey and expiration), and drops every value it cannot open: outsiders' plain records, records sealed
  with another key, tampered bytes. An outsider's DHT sees only ciphertext; its validator counts those
  values (:func:`private_records_seen`) so its reader can say "this swarm is private" instead of "no
  servers".
* **Streams.** See ``corolla.engine.wire.membership``: every RPC stream starts with a proof of
  membership bound to both peer ids.

A key file holds one key a line (``#`` starts a comment). The first key is the one this peer writes and
proves with; every key in the file is accepted. Rotating keys: add the new key as a second line on every
peer, then move it to the first line on every peer, then remove the old one. Peers in two neighbouring
phases understand each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from corolla.engine.errors import CorollaError, PrivateSwarmError

KEY_PREFIX = "corolla-swarm-key-v1:"
KEY_BYTES = 32
KID_BYTES = 8  # names the key a value or proof was made with, so the receiver tries one key, not all
NONCE_BYTES = 12  # AES-GCM
MAGIC = b"\xc1CSK"  # 0xc1 is never the first byte of msgpack: no plain record is mistaken for a sealed one
MAX_KEYS = 4  # keys one file may hold (two during a rotation; a few spare)
MAX_SEALED_BYTES = 16 * 1024  # larger values are not even tried (records are ~300 bytes)
_RECORD_DOMAIN = b"corolla/swarm-record/v1\x00"


def _derive(secret: bytes, label: str) -> bytes:
    return hmac.new(secret, b"corolla/" + label.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class SwarmKey:
    """One swarm key and the sub-keys derived from it (records, proofs, its short id)."""

    secret: bytes

    @property
    def kid(self) -> bytes:
        """A short public id of the key (an HMAC of a label, so it tells nothing about the key)."""
        return _derive(self.secret, "key-id")[:KID_BYTES]

    @property
    def record_key(self) -> bytes:
        """The AES-256-GCM key that seals DHT values."""
        return _derive(self.secret, "records")

    @property
    def proof_key(self) -> bytes:
        """The HMAC key of stream proofs."""
        return _derive(self.secret, "proofs")

    def text(self) -> str:
        """The key as one line of a key file."""
        return KEY_PREFIX + base64.urlsafe_b64encode(self.secret).decode().rstrip("=")


@dataclass(frozen=True)
class SwarmKeys:
    """The keys of a private swarm this peer belongs to: ``current`` writes and proves, all are accepted."""

    keys: tuple[SwarmKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a swarm key set needs at least one key")

    @property
    def current(self) -> SwarmKey:
        """The key this peer seals its records and proofs with (the first of its file)."""
        return self.keys[0]

    def by_kid(self, kid: bytes) -> SwarmKey | None:
        """The accepted key with id ``kid``, if any."""
        return next((k for k in self.keys if hmac.compare_digest(k.kid, kid)), None)

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return f"SwarmKeys({len(self.keys)} key(s))"


def new_key() -> SwarmKey:
    """A fresh random swarm key."""
    return SwarmKey(os.urandom(KEY_BYTES))


def parse_keys(text: str, source: str = "the swarm key") -> SwarmKeys:
    """Keys from the text of a key file. Raises CorollaError naming ``source`` on anything malformed."""
    keys: list[SwarmKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.startswith(KEY_PREFIX):
            raise CorollaError(
                f"{source}, line {number}: not a Corolla swarm key (create one with `corolla swarm-key new > team.key`)"
            )
        body = line[len(KEY_PREFIX) :]
        try:
            secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError as e:
            raise CorollaError(f"{source}, line {number}: the key is not valid base64 ({e})") from e
        if len(secret) != KEY_BYTES:
            raise CorollaError(f"{source}, line {number}: a key holds {KEY_BYTES} bytes, this one {len(secret)}")
        keys.append(SwarmKey(secret))
    if not keys:
        raise CorollaError(f"{source} holds no key; create one with `corolla swarm-key new > team.key`")
    if len(keys) > MAX_KEYS:
        raise CorollaError(f"{source} holds {len(keys)} keys; at most {MAX_KEYS} are accepted (2 during a rotation)")
    return SwarmKeys(tuple(keys))


def load_keys(path: str | os.PathLike[str] | None) -> SwarmKeys | None:
    """The keys in the file at ``path`` (``--swarm-key`` / ``COROLLA_SWARM_KEY_FILE``); None for a public swarm."""
    if path is None or str(path) == "":
        return None
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CorollaError(
            f"cannot read the swarm key file {path}: {e.strerror or e}; check --swarm-key / COROLLA_SWARM_KEY_FILE"
        ) from e
    return parse_keys(text, source=f"swarm key file {path}")


def keys_from_option(path: str | None) -> SwarmKeys | None:
    """The keys of ``--swarm-key PATH``, else of ``COROLLA_SWARM_KEY_FILE``; None for a public swarm."""
    return load_keys(path or os.environ.get("COROLLA_SWARM_KEY_FILE") or None)


def _aad(record: DHTRecord) -> bytes:
    return b"".join(
        [
            _RECORD_DOMAIN,
            struct.pack(">H", len(record.key)),
            record.key,
            struct.pack(">H", len(record.subkey)),
            record.subkey,
            struct.pack(">d", float(record.expiration_time)),
        ]
    )


def seal_value(key: SwarmKey, record: DHTRecord) -> bytes:
    """The sealed form of ``record.value``: magic, key id, nonce, AES-GCM ciphertext bound to the record."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + key.kid + nonce + AESGCM(key.record_key).encrypt(nonce, record.value, _aad(record))


def is_sealed(value: bytes) -> bool:
    """Whether ``value`` looks like a private swarm's sealed value (whatever its key)."""
    return value.startswith(MAGIC)


def open_value(keys: SwarmKeys, record: DHTRecord) -> bytes | None:
    """The plain value of a sealed record if one of ``keys`` sealed it for this record; else None (never raises)."""
    value = record.value
    if not is_sealed(value) or len(value) > MAX_SEALED_BYTES:
        return None
    head = len(MAGIC)
    key = keys.by_kid(value[head : head + KID_BYTES])
    if key is None:
        return None
    nonce = value[head + KID_BYTES : head + KID_BYTES + NONCE_BYTES]
    try:
        return AESGCM(key.record_key).decrypt(nonce, value[head + KID_BYTES + NONCE_BYTES :], _aad(record))
    except (InvalidTag, ValueError):
        return None


class SwarmKeyValidator(RecordValidatorBase):
    """Seals members' values and drops everyone else's; without keys, refuses (and counts) sealed values.

    Its priority is above :class:`~corolla.engine.dht.signing.SignedRecordValidator`'s, so a member signs
    a record first and seals the signed envelope; a reader opens the seal first and checks the signature
    inside.
    """

    def __init__(self, keys: SwarmKeys | None) -> None:
        self.keys = keys
        self.foreign_seen = 0  # sealed values this validator could not open (another swarm's, or tampered)

    @property
    def priority(self) -> int:
        """Applied last when storing, first when reading."""
        return 10

    def validate(self, record: DHTRecord) -> bool:
        """Members accept only values sealed with an accepted key; others refuse every sealed value."""
        if self.keys is None:
            if is_sealed(record.value):
                self.foreign_seen += 1
                return False
            return True
        if open_value(self.keys, record) is not None:
            return True
        if is_sealed(record.value):
            self.foreign_seen += 1
        return False

    def sign_value(self, record: DHTRecord) -> bytes:
        """Seal the value with the current key (members only)."""
        return record.value if self.keys is None else seal_value(self.keys.current, record)

    def strip_value(self, record: DHTRecord) -> bytes:
        """The plain value of a validated record."""
        if self.keys is None:
            return record.value
        plain = open_value(self.keys, record)
        return record.value if plain is None else plain


def foreign_records_seen(validator: RecordValidatorBase) -> tuple[int, bool] | None:
    """(sealed values refused, whether it holds keys) of the SwarmKeyValidator in a node's ``validator``."""
    found = [validator, *getattr(validator, "_validators", ())]  # hivemind's CompositeValidator keeps a list
    for v in found:
        if isinstance(v, SwarmKeyValidator):
            return v.foreign_seen, v.keys is not None
    return None


def private_swarm_error(has_keys: bool) -> PrivateSwarmError:
    """The error a peer gets when the swarm's records are sealed with a key it does not hold."""
    if not has_keys:
        return PrivateSwarmError(
            "this swarm is private: its records are sealed with a swarm key. Ask its owner for the key file and "
            "pass --swarm-key FILE (or set COROLLA_SWARM_KEY_FILE; swarm_key= in Python)"
        )
    return PrivateSwarmError(
        "this swarm is private and none of your swarm keys opens its records: check that --swarm-key "
        "(COROLLA_SWARM_KEY_FILE) names this swarm's current key file"
    )

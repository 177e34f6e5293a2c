"""Records bound to identity: sealing, opening and the DHT validator, offline (no sockets)."""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from corolla.engine.dht.records import ServerRecord, ServerState, block_key, count_models
from corolla.engine.dht.signing import (
    MAX_BODY_BYTES,
    PeerIdentity,
    SignedRecordValidator,
    VerifiedSignatures,
    key_id,
    open_envelope,
    peer_public_key,
    signed_payload,
)

KEY = block_key("tiny-llama", 3)
EXPIRATION = 1_800_000_000.25


@pytest.fixture(scope="module")
def owner() -> PeerIdentity:
    return PeerIdentity.generate()


@pytest.fixture(scope="module")
def stranger() -> PeerIdentity:
    return PeerIdentity.generate()


def record(state: ServerState = ServerState.ONLINE, **fields: Any) -> dict[str, Any]:
    return ServerRecord(state=state, start=0, end=6, throughput=12.5, **fields).to_dict()


def dht_record(key: str, subkey: Any, value: Any, expiration: float = EXPIRATION) -> DHTRecord:
    """A record as hivemind hands it to a validator: key id, serialized subkey and value."""
    return DHTRecord(key_id(key), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)


def test_peer_id_is_the_libp2p_id_of_the_key(owner: PeerIdentity) -> None:
    assert owner.peer_id.startswith("12D3KooW")  # an Ed25519 identity multihash, as libp2p prints it
    assert PeerID.from_base58(owner.peer_id).to_base58() == owner.peer_id
    assert peer_public_key(owner.peer_id) is not None
    assert owner.libp2p_private_key()[:4] == b"\x08\x01\x12\x40" and len(owner.libp2p_private_key()) == 68


def test_identity_file_is_private_and_removed(owner: PeerIdentity) -> None:
    with owner.identity_file() as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with open(path, "rb") as f:
            assert f.read() == owner.libp2p_private_key()
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "peer_id",
    [
        None,
        5,
        b"12D3KooW",
        "",
        "not base58 0OIl",
        "12D3KooWü",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "x" * 100,
    ],
)
def test_other_peer_ids_stand_for_no_key(peer_id: Any) -> None:
    assert peer_public_key(peer_id) is None  # RSA ids ("Qm…") are hashes: a record cannot be checked from them


def test_sealed_record_opens_to_itself(owner: PeerIdentity) -> None:
    envelope = owner.seal(KEY, record(), EXPIRATION)
    opened = open_envelope(key_id(KEY), owner.peer_id, envelope, EXPIRATION)
    assert opened == record()
    assert ServerRecord.from_dht(opened) == ServerRecord.from_dht(record())


class CountingKey:
    """Stands for an Ed25519 public key: counts checks, accepts only the signature b"good"."""

    def __init__(self) -> None:
        self.checks = 0

    def verify(self, signature: bytes, payload: bytes) -> None:
        self.checks += 1
        if signature != b"good":
            raise InvalidSignature


def test_a_signature_is_checked_once_per_process_and_failures_are_not_remembered() -> None:
    verified, key = VerifiedSignatures(capacity=2), CountingKey()
    for _ in range(3):  # the same value from three DHT peers, then at every refresh
        verified.verify(key, b"good", b"payload-1")  # type: ignore[arg-type]
    assert key.checks == 1
    for _ in range(2):
        with pytest.raises(InvalidSignature):
            verified.verify(key, b"bad", b"payload-1")  # type: ignore[arg-type]
    assert key.checks == 3  # a bad signature is checked (and refused) every time
    verified.verify(key, b"good", b"payload-2")  # type: ignore[arg-type]
    verified.verify(key, b"good", b"payload-3")  # type: ignore[arg-type]  # capacity 2: payload-1 forgotten
    verified.verify(key, b"good", b"payload-1")  # type: ignore[arg-type]
    assert key.checks == 6


def test_unknown_fields_are_kept_for_the_record_to_ignore(owner: PeerIdentity) -> None:
    newer = {**record(), "future_field": [1, 2]}
    envelope = {**owner.seal(KEY, newer, EXPIRATION), "future_envelope_field": "x"}
    opened = open_envelope(key_id(KEY), owner.peer_id, envelope, EXPIRATION)
    assert opened is not None and opened["future_field"] == [1, 2]
    parsed = ServerRecord.from_dht(opened)
    assert parsed is not None and parsed.throughput == 12.5


def test_tampered_body_is_refused(owner: PeerIdentity) -> None:
    envelope = owner.seal(KEY, record(), EXPIRATION)
    faster = msgpack.packb({**record(), "throughput": 1e9}, use_bin_type=True)
    assert open_envelope(key_id(KEY), owner.peer_id, {**envelope, "body": faster}, EXPIRATION) is None
    flipped = bytes([envelope["sig"][0] ^ 1]) + envelope["sig"][1:]
    assert open_envelope(key_id(KEY), owner.peer_id, {**envelope, "sig": flipped}, EXPIRATION) is None


def test_offline_record_signed_by_a_stranger_is_refused(owner: PeerIdentity, stranger: PeerIdentity) -> None:
    forged = stranger.seal(KEY, record(ServerState.OFFLINE), EXPIRATION)
    assert open_envelope(key_id(KEY), owner.peer_id, forged, EXPIRATION) is None  # under the owner's id
    assert open_envelope(key_id(KEY), stranger.peer_id, forged, EXPIRATION) is not None  # its own is fine


def test_record_is_bound_to_its_peer_id(owner: PeerIdentity, stranger: PeerIdentity) -> None:
    envelope = owner.seal(KEY, record(), EXPIRATION)
    assert open_envelope(key_id(KEY), stranger.peer_id, envelope, EXPIRATION) is None


def test_replay_under_another_block_or_model_is_refused(owner: PeerIdentity) -> None:
    envelope = owner.seal(KEY, record(), EXPIRATION)
    assert open_envelope(key_id(block_key("tiny-llama", 4)), owner.peer_id, envelope, EXPIRATION) is None
    assert open_envelope(key_id(block_key("other-model", 3)), owner.peer_id, envelope, EXPIRATION) is None


def test_expiration_cannot_be_extended_or_shortened(owner: PeerIdentity) -> None:
    envelope = owner.seal(KEY, record(), EXPIRATION)
    assert open_envelope(key_id(KEY), owner.peer_id, envelope, EXPIRATION + 3600) is None
    assert open_envelope(key_id(KEY), owner.peer_id, envelope, EXPIRATION - 1e-6) is None


@pytest.mark.parametrize(
    "envelope",
    [
        None,
        "text",
        record(),  # a bare, unsigned record (what Corolla stored before records were signed)
        {"v": 2, "body": b"", "sig": b"\x00" * 64},
        {"v": 1, "body": "str", "sig": b"\x00" * 64},
        {"v": 1, "body": b"\x80", "sig": b"\x00" * 63},
        {"v": 1, "body": b"\x80" * (MAX_BODY_BYTES + 1), "sig": b"\x00" * 64},
    ],
)
def test_malformed_envelopes_are_refused(owner: PeerIdentity, envelope: Any) -> None:
    assert open_envelope(key_id(KEY), owner.peer_id, envelope, EXPIRATION) is None


def test_signed_junk_is_refused_without_raising(owner: PeerIdentity) -> None:
    """A peer may sign a body that is not a map: still no record, and no exception."""
    envelope = owner.seal(KEY, record(), EXPIRATION)
    for body in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2})):
        sig = owner._private_key.sign(signed_payload(key_id(KEY), owner.peer_id, EXPIRATION, body))
        assert open_envelope(key_id(KEY), owner.peer_id, {**envelope, "body": body, "sig": sig}, EXPIRATION) is None


def test_oversized_record_is_refused_when_sealing(owner: PeerIdentity) -> None:
    with pytest.raises(ValueError, match="limit"):
        owner.seal(KEY, {"blob": b"x" * MAX_BODY_BYTES}, EXPIRATION)


def test_validator_checks_claims_about_peer_ids(owner: PeerIdentity, stranger: PeerIdentity) -> None:
    validator = SignedRecordValidator()
    good = dht_record(KEY, owner.peer_id, owner.seal(KEY, record(), EXPIRATION))
    assert validator.validate(good)
    assert (
        validator.sign_value(good) == good.value and validator.strip_value(good) == good.value
    )  # readers see the seal
    assert not validator.validate(dht_record(KEY, owner.peer_id, record(ServerState.OFFLINE)))  # unsigned
    assert not validator.validate(dht_record(KEY, owner.peer_id, stranger.seal(KEY, record(), EXPIRATION)))
    assert not validator.validate(dataclasses.replace(good, expiration_time=EXPIRATION + 60))  # extended
    assert not validator.validate(dataclasses.replace(good, key=key_id(block_key("tiny-llama", 0))))  # replayed
    assert not validator.validate(dataclasses.replace(good, value=b"\xc1"))  # not msgpack
    assert not validator.validate(dataclasses.replace(good, value=b"\x00" * 100_000))  # over the size bound


def test_validator_leaves_other_records_to_the_readers() -> None:
    validator = SignedRecordValidator()
    assert validator.validate(dht_record("_corolla.models", "tiny-llama", {"num_blocks": 6}))  # the model index
    assert validator.validate(DHTRecord(key_id(KEY), b"", b"\x80", EXPIRATION))  # hivemind's dictionary marker
    assert validator.validate(DHTRecord(key_id(KEY), MSGPackSerializer.dumps(None), b"\x01", EXPIRATION))
    assert validator.validate(DHTRecord(key_id(KEY), b"\xc1", b"\x01", EXPIRATION))  # undecodable subkey


def test_model_index_counts_one_vote_per_server() -> None:
    entries = [
        {"model": "a", "num_blocks": 6},
        {"model": "a", "num_blocks": 6},
        {"model": "a", "num_blocks": 1000},  # outvoted
        {"model": "b", "num_blocks": 30},
        {"model": "b", "num_blocks": 32},  # a tie goes to the smaller count
        {"model": "c", "num_blocks": 6.0},
        {"model": "c", "num_blocks": True},
        {"model": "c", "num_blocks": 10**9},
        {"model": "", "num_blocks": 6},
        {"num_blocks": 6},
        None,
        ["a", 6],
    ]
    assert count_models(entries) == {"a": 6, "b": 30}

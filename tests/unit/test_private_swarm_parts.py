"""The pure parts of private swarms, contribution and priority: keys, sealed records, proofs, claims, queue, ledger."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hivemind.dht.validation import CompositeValidator, DHTRecord

from corolla.engine.apps.cli import main
from corolla.engine.dht.contribution import check_claim, load_identity, make_claim
from corolla.engine.dht.signing import PeerIdentity, SignedRecordValidator
from corolla.engine.dht.swarm_key import SwarmKeys, SwarmKeyValidator, load_keys, new_key, parse_keys
from corolla.engine.errors import CorollaError, PrivateSwarmError
from corolla.engine.server.compute_queue import FairQueue
from corolla.engine.server.ledger import Ledger, fold
from corolla.engine.wire.membership import MembershipGate, ReplayGuard, check_proof, make_proof


def _record(value: bytes = b"\x81\xa1a\x01", expiration: float = 1e9) -> DHTRecord:
    return DHTRecord(key=b"k" * 20, subkey=b"\xa4peer", value=value, expiration_time=expiration)


def test_swarm_key_new_prints_a_key_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["swarm-key", "new"]) == 0
    keys = parse_keys(capsys.readouterr().out)
    assert len(keys.keys) == 1 and len(keys.current.secret) == 32
    assert "secret" not in repr(keys) and keys.current.text() not in repr(keys)


@pytest.mark.parametrize(
    ("text", "says"),
    [("", "holds no key"), ("hello", "not a Corolla swarm key"), ("corolla-swarm-key-v1:AAAA", "holds 32 bytes")],
)
def test_bad_key_files_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(CorollaError, match=says):
        parse_keys(text)


def test_missing_key_file_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(CorollaError, match="COROLLA_SWARM_KEY_FILE"):
        load_keys(tmp_path / "nope.key")
    assert load_keys(None) is None


def test_members_open_sealed_records_and_drop_everything_else() -> None:
    mine, theirs = SwarmKeys((new_key(),)), SwarmKeys((new_key(),))
    member, other, public = SwarmKeyValidator(mine), SwarmKeyValidator(theirs), SwarmKeyValidator(None)
    record = _record()
    sealed = DHTRecord(record.key, record.subkey, member.sign_value(record), record.expiration_time)
    assert sealed.value != record.value and member.validate(sealed)
    assert member.strip_value(sealed) == record.value
    assert not other.validate(sealed) and not public.validate(sealed)
    assert public.foreign_seen == 1 and other.foreign_seen == 1
    assert not member.validate(record)  # a plain record in a private swarm
    assert public.validate(record)  # public swarms keep working
    later = DHTRecord(sealed.key, sealed.subkey, sealed.value, sealed.expiration_time + 1)
    assert not member.validate(later)  # sealed for one expiration, like the signature inside
    flipped = sealed.value[:-1] + bytes([sealed.value[-1] ^ 1])
    assert not member.validate(DHTRecord(sealed.key, sealed.subkey, flipped, sealed.expiration_time))


def test_rotation_accepts_both_keys_and_writes_with_the_first() -> None:
    old, new = new_key(), new_key()
    phase1, phase2, done = SwarmKeys((old, new)), SwarmKeys((new, old)), SwarmKeys((new,))
    record = _record()
    by_phase1 = DHTRecord(record.key, record.subkey, SwarmKeyValidator(phase1).sign_value(record), 1e9)
    by_phase2 = DHTRecord(record.key, record.subkey, SwarmKeyValidator(phase2).sign_value(record), 1e9)
    assert SwarmKeyValidator(phase2).validate(by_phase1) and SwarmKeyValidator(phase1).validate(by_phase2)
    assert SwarmKeyValidator(done).validate(by_phase2) and not SwarmKeyValidator(done).validate(by_phase1)
    check_proof(phase2, make_proof(phase1, "c", "s"), "c", "s")
    with pytest.raises(PrivateSwarmError):
        check_proof(done, make_proof(phase1, "c", "s"), "c", "s")


def test_sealing_wraps_the_signed_envelope_in_a_composite_validator() -> None:
    keys = SwarmKeys((new_key(),))
    composite = CompositeValidator([SignedRecordValidator(), SwarmKeyValidator(keys)])
    identity = PeerIdentity.generate()
    import msgpack
    from hivemind.dht.routing import DHTID

    key = "m.0"
    envelope = identity.seal(key, {"state": 2}, 1e9)
    record = DHTRecord(
        DHTID.generate(source=key).to_bytes(), msgpack.packb(identity.peer_id), msgpack.packb(envelope), 1e9
    )
    sealed = DHTRecord(record.key, record.subkey, composite.sign_value(record), 1e9)
    assert composite.validate(sealed)
    assert composite.strip_value(sealed) == record.value


def test_proofs_are_bound_to_both_peers_fresh_and_single_use() -> None:
    keys = SwarmKeys((new_key(),))
    proof = make_proof(keys, "client", "server", now=1000.0)
    check_proof(keys, proof, "client", "server", now=1000.0)
    for client, server in (("other", "server"), ("client", "other")):
        with pytest.raises(PrivateSwarmError, match="none of your swarm keys"):
            check_proof(keys, proof, client, server, now=1000.0)
    with pytest.raises(PrivateSwarmError, match="clocks"):
        check_proof(keys, proof, "client", "server", now=5000.0)
    for junk in (None, "", "zz", "00" * 64):
        with pytest.raises(PrivateSwarmError):
            check_proof(keys, junk, "client", "server", now=1000.0)
    gate = MembershipGate(keys)
    fresh = make_proof(keys, "client", "server")
    gate.admit(fresh, "client", "server")
    with pytest.raises(PrivateSwarmError, match="already used"):
        gate.admit(fresh, "client", "server")
    MembershipGate(None).admit(None, "anyone", "server")  # a public server admits everyone


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(max_entries=3, window=10.0)
    for i in range(10):
        guard.admit(bytes([i]), now=0.0)
    assert len(guard._seen) == 3
    guard.admit(b"\x00", now=0.0)  # forgotten to stay bounded (a proof is bound to its peer anyway)
    guard.admit(b"\x09", now=100.0)  # the window passed


def test_claims_are_bound_to_both_peers_and_fresh(tmp_path: Path) -> None:
    identity = load_identity(tmp_path / "server.identity", create=True)
    assert load_identity(tmp_path / "server.identity").peer_id == identity.peer_id  # kept in the file
    claim = make_claim(identity, "client", "server", now=1000.0)
    assert check_claim(claim, "client", "server", now=1000.0) == identity.peer_id
    assert check_claim(claim, "thief", "server", now=1000.0) is None
    assert check_claim(claim, "client", "elsewhere", now=1000.0) is None
    assert check_claim(claim, "client", "server", now=9000.0) is None
    forged = claim.replace(identity.peer_id, PeerIdentity.generate().peer_id)
    assert check_claim(forged, "client", "server", now=1000.0) is None
    for junk in (None, "", "a:b:c", "x" * 600):
        assert check_claim(junk, "client", "server") is None
    (tmp_path / "bad").write_bytes(b"nope")
    with pytest.raises(CorollaError, match="not a Corolla server identity"):
        load_identity(tmp_path / "bad")


def test_favored_peers_go_first_but_others_still_get_turns() -> None:
    queue: FairQueue[str] = FairQueue(favor_turns=3)
    for i in range(8):
        queue.put(f"plain{i}", 0, "plain")
        queue.put(f"fav{i}", 0, "fav", favored=True)
    order = [queue.pop() for _ in range(16)]
    assert order[:4] == ["fav0", "fav1", "fav2", "plain0"]  # three favored turns, then one for the other
    assert order.index("plain1") == 7
    assert sorted(o for o in order if o) == sorted([f"plain{i}" for i in range(8)] + [f"fav{i}" for i in range(8)])
    unfavored: FairQueue[str] = FairQueue()
    for i in range(2):
        unfavored.put(f"a{i}", 0, "a")
        unfavored.put(f"b{i}", 0, "b")
    assert [unfavored.pop() for _ in range(4)] == ["a0", "b0", "a1", "b1"]  # plain round-robin as before


def test_ledger_folds_counts_of_several_servers(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    one, two = Ledger(path), Ledger(path)
    one.add("alice", 10)
    two.add("bob", 5)
    one.add("alice", 1)
    one.save()
    two.save()
    data = json.loads(path.read_text())
    assert data["total"] == 16 and data["peers"] == {"alice": 11, "bob": 5}
    assert Ledger(path).totals()["total"] == 16
    assert two.totals()["total"] == 16 and two.served == 5
    path.write_text("garbage")
    Ledger(path).save()  # a damaged file is started afresh, never a crash


def test_servers_sharing_a_ledger_count_their_own_tokens_and_share_the_machine_total(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    one, two = Ledger(path), Ledger(path)  # two servers of one machine
    one.add("alice", 7)
    two.add("bob", 3)
    one.save()
    two.save()
    one.save()  # each sees the other's counts once both saved
    assert (one.served, two.served) == (7, 3)  # what each server's record announces
    assert one.totals() == two.totals() == {"total": 10, "today": 10}  # what each status file (the tray) shows
    three = Ledger(path)  # a server started later: the machine's history, none of its own yet
    assert three.served == 0 and three.totals()["total"] == 10


def test_ledger_fold_is_bounded() -> None:
    big = fold({}, Counter({f"peer{i}": i + 1 for i in range(1500)}), "2026-01-01")
    assert len(big["peers"]) == 1000 and big["total"] == sum(range(1, 1501))

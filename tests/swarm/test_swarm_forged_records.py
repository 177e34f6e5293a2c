"""Forged and foreign records: a stranger's DHT peer writes records under honest servers' peer ids.

The stranger runs hivemind without Corolla's validator (it can run any code) and stays in the swarm as
a full DHT peer, so it keeps its forgeries and hands them to whoever asks it. The honest peers must
refuse to store them, readers must not believe them, and a normal client's output stays identical to
transformers while ``corolla health`` shows the real servers.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time
from swarm_helpers import client, hf_greedy, hf_model, peer_id, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine.apps.health import swarm_health
from corolla.engine.apps.local_swarm import Swarm, server_env
from corolla.engine.dht.announce import MODELS_KEY, make_dht, read_records
from corolla.engine.dht.records import ServerRecord, ServerState, block_key
from corolla.engine.dht.signing import PeerIdentity, key_id, open_envelope

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

FORGED_TTL = 3600.0  # longer than any honest record: if stored, a forgery would win every merge


@dataclass
class ForgedSwarm:
    path: Path
    swarm: Swarm
    hf: PreTrainedModel
    first: str  # peer id of the server of blocks 0:3
    second: str  # peer id of the server of blocks 3:6
    stranger: hivemind.DHT  # the attacker's DHT peer (no validator)
    stranger_key: PeerIdentity  # the attacker's own signing key


@pytest.fixture(scope="module")
def forged(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForgedSwarm]:
    path = tiny_checkpoint("llama")
    with running_swarm(path, ["0:3", "3:6"], tmp_path_factory) as swarm:
        first, second = (peer_id(s) for s in swarm.servers)
        stranger = hivemind.DHT(
            initial_peers=swarm.initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], num_workers=4
        )
        try:
            yield ForgedSwarm(path, swarm, hf_model(path), first, second, stranger, PeerIdentity.generate())
        finally:
            stranger.shutdown()


async def _held(dht: hivemind.DHT, node: DHTNode, key: str) -> dict[str, tuple[Any, float]]:
    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None or not hasattr(found.value, "items"):
        return {}
    return {sub: (MSGPackSerializer.loads(raw), exp) for sub, (raw, exp) in found.value.items()}


def held(dht: hivemind.DHT, key: str) -> dict[str, tuple[Any, float]]:
    """What one DHT peer itself stores under ``key`` (no network): ``{subkey: (value, expiration)}``."""
    result: dict[str, tuple[Any, float]] = dht.run_coroutine(functools.partial(_held, key=key))
    return result


def forge(f: ForgedSwarm, block: int, subkey: str, value: Any, expiration: float | None = None) -> None:
    """The stranger stores ``value`` under ``block`` and ``subkey``, and keeps it itself."""
    key = block_key(f.swarm.dht_prefix, block)
    expiration = expiration or get_dht_time() + FORGED_TTL
    f.stranger.store(key, value, expiration, subkey=subkey)
    assert held(f.stranger, key)[subkey] == (value, expiration)  # the forgery is live in the swarm


def honest_record(f: ForgedSwarm, block: int, peer: str) -> ServerRecord:
    """The record the bootstrap peer stores for ``peer`` under ``block``, checked like a reader does."""
    key = block_key(f.swarm.dht_prefix, block)
    value, expiration = held(f.swarm.dht, key)[peer]
    record = ServerRecord.from_dht(open_envelope(key_id(key), peer, value, expiration))
    assert record is not None, f"the bootstrap peer stores a record it cannot verify for {peer} at block {block}"
    return record


def assert_truth(f: ForgedSwarm) -> None:
    """Honest peers store only the servers' own records; readers, health and a client see the truth."""
    for block in range(6):
        owner = f.first if block < 3 else f.second
        assert set(held(f.swarm.dht, block_key(f.swarm.dht_prefix, block))) == {owner}, f"block {block}"
        record = honest_record(f, block, owner)
        assert record.state == ServerState.ONLINE and (record.start, record.end) == ((0, 3) if block < 3 else (3, 6))
    reader = make_dht(f.swarm.initial_peers, "127.0.0.1", client_mode=True)  # a fresh peer: no cached reads
    try:
        records = read_records(reader, f.swarm.dht_prefix, range(6))
        (health,) = swarm_health(reader, f.swarm.dht_prefix, 6)
    finally:
        reader.shutdown()
    for block, by_peer in records.items():
        owner = f.first if block < 3 else f.second
        assert set(by_peer) == {owner}, f"block {block}: {sorted(by_peer)}"
        assert by_peer[owner].state == ServerState.ONLINE
    assert health.healthy and health.servers_per_block == [1] * 6
    assert {(s.peer_id, s.start, s.end, s.state) for s in health.servers} == {
        (f.first, 0, 3, "online"),
        (f.second, 3, 6, "online"),
    }
    ids = random_ids(1, 6, seed=90)
    with client(f.path, f.swarm) as model:
        out = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, hf_greedy(f.hf, ids, 6, eos=False))


def fake(state: ServerState, start: int, end: int) -> dict[str, Any]:
    return ServerRecord(state=state, start=start, end=end, throughput=1e9, inference_rps=1e9).to_dict()


def test_forged_offline_record_does_not_take_a_server_offline(forged: ForgedSwarm) -> None:
    offline = fake(ServerState.OFFLINE, 0, 3)
    expiration = get_dht_time() + FORGED_TTL
    for block in range(3):
        key = block_key(forged.swarm.dht_prefix, block)
        forge(forged, block, forged.first, offline, expiration)  # unsigned, as Corolla stored records before
        signed = forged.stranger_key.seal(key, offline, expiration)  # signed, but by the stranger's key
        forge(forged, block, forged.first, signed, expiration + 1)
    assert_truth(forged)


def test_forged_claim_of_other_blocks_does_not_route_there(forged: ForgedSwarm) -> None:
    """The first server 'hosts 0:6' with a huge speed: a client that believed it would fail at block 3."""
    claim = fake(ServerState.ONLINE, 0, 6)
    for block in range(3, 6):
        key = block_key(forged.swarm.dht_prefix, block)
        expiration = get_dht_time() + FORGED_TTL
        forge(forged, block, forged.first, claim, expiration)
        forge(forged, block, forged.first, forged.stranger_key.seal(key, claim, expiration), expiration + 1)
    assert_truth(forged)


def test_own_signed_record_under_another_peer_id_is_refused(forged: ForgedSwarm) -> None:
    """A record correctly signed by the stranger, stored under the second server's id (it says OFFLINE)."""
    for block in range(3, 6):
        key = block_key(forged.swarm.dht_prefix, block)
        expiration = get_dht_time() + FORGED_TTL
        envelope = forged.stranger_key.seal(key, fake(ServerState.OFFLINE, 3, 6), expiration)
        assert open_envelope(key_id(key), forged.stranger_key.peer_id, envelope, expiration) is not None  # valid...
        forge(forged, block, forged.second, envelope, expiration)  # ...for its signer only
    assert_truth(forged)


def test_replayed_record_is_refused(forged: ForgedSwarm) -> None:
    """The second server's own signed record, replayed under a block it does not serve and with a later expiry."""
    key3 = block_key(forged.swarm.dht_prefix, 3)
    envelope, expiration = held(forged.swarm.dht, key3)[forged.second]
    forge(forged, 0, forged.second, envelope, expiration)  # under another block, as signed
    forge(forged, 3, forged.second, envelope, expiration + 2 * FORGED_TTL)  # the same block, for hours longer
    assert_truth(forged)


def test_health_command_shows_the_real_servers(forged: ForgedSwarm) -> None:
    """After every forgery above (the stranger still holds them), ``corolla health`` tells the truth, and
    forged entries of the model index (unsigned, or signed by the stranger under a server's id) do not
    change the model's size."""
    forge(forged, 1, forged.second, fake(ServerState.ONLINE, 0, 6))  # and one more, in case run alone
    model, expiration = forged.swarm.dht_prefix, get_dht_time() + FORGED_TTL
    index = {"model": model, "num_blocks": 1000}
    forged.stranger.store(MODELS_KEY, {"num_blocks": 1000}, expiration, subkey=model)  # the old unsigned form
    for server in (forged.first, forged.second):
        forged.stranger.store(MODELS_KEY, forged.stranger_key.seal(MODELS_KEY, index, expiration), expiration, server)
    cmd = [
        sys.executable,
        "-m",
        "corolla.engine.apps.cli",
        "health",
        "--json",
        "--initial-peers",
        *forged.swarm.initial_peers,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=server_env())
    assert result.returncode == 0, result.stdout + result.stderr
    (report,) = json.loads(result.stdout)
    assert report["model"] == model and report["num_blocks"] == 6
    assert report["healthy"] and report["servers_per_block"] == [1] * 6
    servers = {(s["peer_id"], s["start"], s["end"], s["state"]) for s in report["servers"]}
    assert servers == {(forged.first, 0, 3, "online"), (forged.second, 3, 6, "online")}
    assert all(s["throughput"] < 1e9 for s in report["servers"])

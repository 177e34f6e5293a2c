"""Lying, fake and silent servers against a normal client, with real server processes.

One swarm for the module: two honest servers of blocks 0:6 (announcing a modest speed) and two liars of
the same blocks announcing 1e6 tokens/s, so an unmeasured client routes to a liar first: one answers
random tensors of the right shape and scale (``LYING_SERVER``), the other is a real ``corolla server``
of another checkpoint. The client must catch and ban both, report them for ``corolla health``, and
still answer exactly what transformers answers. Then 50 fake records, a silent peer and a stalled
forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from attack_servers import LYING_SERVER
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from swarm_helpers import client, forward_answer, hf_greedy, hf_model, peer_id, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.health import format_table, swarm_health
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.apps.tiny_models import make_tiny_checkpoint
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import remote_forward
from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.dht.announce import make_dht
from corolla.engine.dht.records import ServerRecord, ServerState, block_key
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.routing.reports import read_reports
from corolla.engine.wire.messages import RPC_INFERENCE, RPC_INFO, ForwardRequest, StepResult
from corolla.engine.wire.tensors import serialize

pytestmark = pytest.mark.swarm

HIDDEN = 64  # TINY_DEFAULTS hidden_size
FORWARD_TIMEOUT = 3.0  # seconds, the second honest server's --forward-timeout (the default is 300)


@dataclass
class Liars:
    path: Path
    swarm: Swarm
    hf: PreTrainedModel
    honest: tuple[str, str]
    random_liar: str
    weights_liar: str
    reports: Path
    model: DistributedModelForCausalLM


@pytest.fixture(scope="module")
def liars(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Liars]:
    path = tiny_checkpoint("llama")
    other = make_tiny_checkpoint(tmp_path_factory.mktemp("other") / "tiny-llama", seed=1)
    reports = tmp_path_factory.mktemp("reports") / "reports.jsonl"
    with running_swarm(path, [], tmp_path_factory) as swarm:
        # Four operators: each server in its own /24 of loopback (one address group counts as one opinion).
        first = swarm.add_server("0:6", wait=False, extra_args=["--throughput", "50", "--host", "127.0.1.1"])
        second = swarm.add_server(
            "0:6",
            wait=False,
            extra_args=["--throughput", "50", "--forward-timeout", str(FORWARD_TIMEOUT), "--host", "127.0.2.1"],
        )
        fast = ["--throughput", "1e6"]
        random_liar = swarm.add_server(
            "0:6", wait=False, extra_args=[*fast, "--host", "127.0.3.1"], launcher=LYING_SERVER
        )
        weights_liar = swarm.add_server("0:6", wait=False, extra_args=[*fast, "--host", "127.0.4.1"], model=other)
        swarm.wait_ready()
        with stranger(swarm) as (_, loop, p2p):  # a fresh server's first compute is slow: not in its 3 s
            loop.run(remote_forward(p2p, peer_id(second), 0, 6, torch.zeros(1, 1, HIDDEN), 2**20, 60.0), 120)
        model = client(path, swarm, report_file=str(reports), stall_timeout=1.5)
        try:
            yield Liars(
                path,
                swarm,
                hf_model(path),
                (peer_id(first), peer_id(second)),
                peer_id(random_liar),
                peer_id(weights_liar),
                reports,
                model,
            )
        finally:
            model.close()


@pytest.mark.timeout(300)
def test_liars_are_caught_banned_and_reported(liars: Liars, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_ids(1, 6, seed=40)
    with liars.model.inference_session(16) as session:
        out = liars.model.generate(ids, max_new_tokens=6, eos_token_id=[], session=session)
        route = {hop.stream.peer_id for hop in session.hops}
    assert torch.equal(out, hf_greedy(liars.hf, ids, 6, eos=False)), "a liar changed the answer"
    assert session.liars == {liars.random_liar, liars.weights_liar}
    assert route <= set(liars.honest) and session.verified and session.checks >= 1
    assert {r.peer_id for r in read_reports(liars.reports)} == {liars.random_liar, liars.weights_liar}
    # `corolla health` on this machine flags both (it reads the same report file) and nobody else.
    monkeypatch.setenv("COROLLA_REPORT_FILE", str(liars.reports))
    (health,) = swarm_health(liars.swarm.dht, liars.swarm.dht_prefix, 6)
    flagged = {s.peer_id for s in health.servers if s.reported}
    assert flagged == {liars.random_liar, liars.weights_liar}
    assert "REPORTED" in format_table([health]) and "differed from two independent replicas" in format_table([health])
    # A later generation of the same client avoids them from the start.
    again = liars.model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(again, hf_greedy(liars.hf, ids, 4, eos=False))


@contextlib.contextmanager
def stranger(swarm: Swarm, identity: PeerIdentity | None = None) -> Iterator[tuple[Any, LoopThread, P2P]]:
    """A DHT peer of the swarm (with ``identity``, reachable at that peer id) and its P2P on a loop thread."""
    with contextlib.ExitStack() as stack:
        path = stack.enter_context(identity.identity_file()) if identity is not None else None
        dht = make_dht(swarm.initial_peers, "127.0.0.1", identity_path=path)
        stack.callback(dht.shutdown)
        loop = LoopThread("stranger")
        stack.callback(loop.stop)
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        stack.callback(lambda: loop.run(p2p.shutdown(), timeout=10))
        yield dht, loop, p2p


def fake_record() -> ServerRecord:
    """Blocks 0:6 at 1e9 tokens/s with room for a million tokens: the record every client would pick."""
    return ServerRecord(
        state=ServerState.ONLINE, start=0, end=6, throughput=1e9, inference_rps=1e9, cache_tokens_left=10**6
    )


async def _store(dht: Any, node: Any, keys: list[str], subkey: str, values: list[Any], expiration: float) -> int:
    stored = await node.store_many(keys, values, expiration, subkeys=[subkey] * len(keys), await_all_replicas=False)
    return sum(bool(ok) for ok in stored.values())


def announce_all(dht: Any, model: str, identities: list[PeerIdentity], record: ServerRecord) -> None:
    """Each identity signs ``record`` for every block of it and stores it; all identities at once."""
    expiration = get_dht_time() + 300
    keys = [block_key(model, b) for b in range(record.start, record.end)]
    futures = [
        dht.run_coroutine(
            functools.partial(
                _store,
                keys=keys,
                subkey=i.peer_id,
                values=[i.seal(key, record.to_dict(), expiration) for key in keys],
                expiration=expiration,
            ),
            return_future=True,
        )
        for i in identities
    ]
    stored = [f.result(timeout=120) for f in futures]
    assert all(stored), stored


@pytest.mark.timeout(300)
def test_fifty_fake_records_do_not_stop_generation(liars: Liars) -> None:
    """50 identities each sign a record for blocks 0:6 at 1e9 tokens/s; nobody serves behind them."""
    ids = random_ids(1, 6, seed=41)
    with stranger(liars.swarm) as (dht, _, _):
        fakes = [PeerIdentity.generate() for _ in range(50)]
        announce_all(dht, liars.swarm.dht_prefix, fakes, fake_record())
        fresh = client(liars.path, liars.swarm, report_file=str(liars.reports))  # nothing measured yet
        try:
            out = fresh.generate(ids, max_new_tokens=4, eos_token_id=[])
            known = set(fresh.manager.spans)
        finally:
            fresh.close()
    assert {f.peer_id for f in fakes} <= known, "the client did not even see the fakes"
    assert torch.equal(out, hf_greedy(liars.hf, ids, 4, eos=False))


@pytest.mark.timeout(300)
def test_silent_peer_fails_within_a_bound_tied_to_its_rtt(liars: Liars, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that answers info like a server, accepts the inference stream and never answers on it."""
    identity = PeerIdentity.generate()
    prefix = liars.swarm.dht_prefix
    info = {"version": PROTOCOL_VERSION, "model": prefix, "start": 0, "end": 6, "dtype": "float32", "hidden_size": 64}
    silent_streams: list[Any] = []

    async def rpc_info(_: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(info))

    async def never_answer(_: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_streams.append(writer)
        await asyncio.Event().wait()

    with stranger(liars.swarm, identity) as (dht, loop, p2p):
        loop.run(p2p.add_protobuf_handler(RPC_INFO, rpc_info, runtime_pb2.ExpertUID))
        loop.run(p2p.add_binary_stream_handler(RPC_INFERENCE, never_answer))
        announce_all(dht, prefix, [identity], fake_record())
        ids = random_ids(1, 6, seed=42)
        with caplog.at_level(logging.INFO, logger="corolla.engine.routing.sequence_manager"):
            liars.model.manager.refresh()  # the client knows the silent peer now
            assert identity.peer_id in liars.model.manager.spans
            out = liars.model.generate(ids, max_new_tokens=4, eos_token_id=[])

            def bans() -> list[str]:
                return [
                    r.getMessage()
                    for r in caplog.records
                    if "avoiding" in r.getMessage() and identity.peer_id[-6:] in r.getMessage()
                ]

            # Its probe's one-token step (client/challenge.py) goes unanswered; the probe may run on in the
            # background when another server passed first, so its ban may come after the generation.
            deadline = time.monotonic() + 15
            while not any("did not answer its probe" in b for b in bans()) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert silent_streams, "the client never opened a stream to the silent peer"
    assert torch.equal(out, hf_greedy(liars.hf, ids, 4, eos=False))
    probe_bans = [b for b in bans() if "did not answer its probe" in b]
    # The probe's bound: max(stall_timeout, 5 x the probe RTTs measured), or connect_timeout before any was;
    # never the 30 s step timeout, and the generation did not wait for it (another server passed first).
    assert probe_bans and ("within 1.5 s" in probe_bans[0] or "within 10.0 s" in probe_bans[0]), bans()


async def stalled_forward(p2p: P2P, peer: str) -> StepResult:
    """Send one part of a forward and never end the stream; return the server's answer."""
    meta = ForwardRequest(start=0, end=6).encode()
    part = runtime_pb2.ExpertRequest(tensors=[serialize(torch.zeros(1, 2, HIDDEN))], metadata=meta)
    result: StepResult = await forward_answer(p2p, peer, [part])
    return result


@pytest.mark.timeout(120)
def test_stalled_forward_ends_at_forward_timeout(liars: Liars) -> None:
    with stranger(liars.swarm) as (_, loop, p2p):
        result = loop.run(stalled_forward(p2p, liars.honest[1]), timeout=60)
    assert not result.ok and result.error_type == "PeerUnavailableError"
    assert f"did not finish within {FORWARD_TIMEOUT:.0f} s" in str(result.error)

"""Hostile or broken peers: every bad request gets a clear error, and the servers keep serving others.

A raw hivemind P2P client here speaks to real servers below Corolla's client, so it can send what
Corolla's client never would: garbage bytes, wrong shapes, dtypes and sizes, unknown sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from swarm_helpers import client, hf_greedy, hf_model, peer_id, random_ids, running_swarm

from corolla.engine import CacheFullError
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import HopStream, remote_info
from corolla.engine.dht.announce import make_dht, read_records
from corolla.engine.wire.messages import (
    RPC_FORWARD,
    RPC_INFERENCE,
    ForwardRequest,
    OpenSession,
    Step,
    StepResult,
)
from corolla.engine.wire.tensors import serialize

pytestmark = pytest.mark.swarm

HIDDEN = 64  # TINY_DEFAULTS hidden_size
SMALL_PREFIX = "tiny-small-cache"
SMALL_CACHE_BYTES = 100_000  # about 65 tokens of one sequence over 6 tiny blocks


@dataclass
class RawPeer:
    """A bare hivemind P2P client on its own event loop thread."""

    loop: LoopThread
    p2p: P2P

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.loop.run(coro, timeout)


@dataclass
class BadInputSwarm:
    path: Path
    swarm: Swarm
    raw: RawPeer
    first: str  # peer id of the server of blocks 0:3
    small: str  # peer id of the server with a tiny cache budget (announced under SMALL_PREFIX)


@pytest.fixture(scope="module")
def bad(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BadInputSwarm]:
    """Blocks 0:3 and 3:6 of the tiny llama, one more server with almost no cache, and a raw P2P client."""
    path = tiny_checkpoint("llama")
    with running_swarm(path, [], tmp_path_factory) as swarm:
        first = swarm.add_server("0:3", wait=False)
        swarm.add_server("3:6", wait=False)
        small_args = ["--dht-prefix", SMALL_PREFIX, "--cache-bytes", str(SMALL_CACHE_BYTES)]
        small = swarm.add_server("0:6", wait=False, extra_args=small_args)
        swarm.wait_ready()
        dht = make_dht(swarm.initial_peers, "127.0.0.1", client_mode=True)
        loop = LoopThread("raw-peer")
        try:
            p2p = loop.run(dht.replicate_p2p(), timeout=30)
            try:
                yield BadInputSwarm(path, swarm, RawPeer(loop, p2p), peer_id(first), peer_id(small))
            finally:
                loop.run(p2p.shutdown(), timeout=10)
        finally:
            loop.stop()
            dht.shutdown()


# ---- raw requests ---------------------------------------------------------------------------
def open_msg(session_id: str = "s1", start: int = 0, end: int = 3, max_length: int = 16, batch: int = 1) -> Any:
    msg = OpenSession(session_id=session_id, start=start, end=end, max_length=max_length, batch_size=batch)
    return runtime_pb2.ExpertRequest(metadata=msg.encode())


def step_msg(hidden: torch.Tensor | runtime_pb2.Tensor, position: int = 0, session_id: str = "s1") -> Any:
    proto = serialize(hidden) if isinstance(hidden, torch.Tensor) else hidden
    meta = Step(session_id=session_id, position=position, step_id=7)
    return runtime_pb2.ExpertRequest(tensors=[proto], metadata=meta.encode())


def hidden(batch: int = 1, length: int = 2, size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(batch, length, size, generator=torch.Generator().manual_seed(0))


async def _call(
    p2p: P2P, peer: str, rpc: str, requests: Sequence[Any], answers: int, end_stream: bool
) -> list[tuple[StepResult, list[runtime_pb2.Tensor]]]:
    """Send ``requests`` on one stream and read up to ``answers`` answers, then hang up.

    The end of the request stream is sent only with ``end_stream``: a client that keeps writing after
    the server dropped the stream may lose the server's last answer to a stream reset (libp2p), so a
    request the server answers and then hangs up on must not be followed by anything.
    """
    done = asyncio.Event()

    async def stream() -> Any:
        for request in requests:
            yield request
        if not end_stream:
            await done.wait()

    responses = await p2p.iterate_protobuf_handler(PeerID.from_base58(peer), rpc, stream(), runtime_pb2.ExpertResponse)
    out = []
    try:
        async for r in responses:
            out.append((StepResult.decode(r.metadata), list(r.tensors)))
            if len(out) == answers:
                break
    finally:
        done.set()
        await responses.aclose()  # type: ignore[attr-defined]
    return out


def inference(bad: BadInputSwarm, *requests: Any, peer: str | None = None) -> list[StepResult]:
    """Send ``requests`` on one inference stream (one answer each); the server's answers."""
    answers = bad.raw.run(_call(bad.raw.p2p, peer or bad.first, RPC_INFERENCE, requests, len(requests), False))
    return [meta for meta, _ in answers]


def forward(bad: BadInputSwarm, *requests: Any, early: bool = False) -> list[tuple[StepResult, list[Any]]]:
    """One stateless forward call. ``early``: the server rejects it while reading the request parts,
    before the end of the stream (which is then not sent)."""
    return bad.raw.run(_call(bad.raw.p2p, bad.first, RPC_FORWARD, requests, 1, not early))  # type: ignore[no-any-return]


def rejected(result: StepResult, *phrases: str) -> str:
    """Assert an answer is an error whose message contains every phrase; return the message."""
    assert not result.ok, f"expected an error, got {result}"
    assert result.error, result
    for phrase in phrases:
        assert phrase in result.error, f"{phrase!r} not in {result.error!r}"
    return result.error


# ---- inference stream -----------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_garbage_metadata_is_rejected(bad: BadInputSwarm) -> None:
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1 not msgpack"))
    rejected(r, "metadata is not valid msgpack")
    assert r.error_type == "ProtocolError"
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=msgpack.packb([1, 2, 3])))
    rejected(r, "metadata must be a map")
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=msgpack.packb({"kind": "explode"})))
    rejected(r, "invalid", "kind")
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=msgpack.packb({"kind": "open", "start": 0})))
    rejected(r, "invalid OpenSession", "required")
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=b"\x00" * 100_000))
    rejected(r, "exceeds")


def frame_answer(raw: bytes) -> StepResult:
    """The one answer frame a server sent before hanging up (marker, 8-byte length, ExpertResponse)."""
    assert raw[:1] == P2P.MESSAGE_MARKER, raw[:16]
    length = int.from_bytes(raw[1:9], "big")
    assert len(raw) == 9 + length, f"expected one frame, got {len(raw)} bytes"
    return StepResult.decode(runtime_pb2.ExpertResponse.FromString(raw[9:]).metadata)


@pytest.mark.timeout(30)
def test_garbage_protobuf_bytes_get_an_error_and_only_that_stream_is_closed(bad: BadInputSwarm) -> None:
    async def send_raw(payload: bytes) -> bytes:
        _, reader, writer = await bad.raw.p2p.call_binary_stream_handler(PeerID.from_base58(bad.first), RPC_INFERENCE)
        try:
            writer.write(payload)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)  # everything until the server hangs up
        finally:
            writer.close()

    # A message marker, a length, then bytes that are no ExpertRequest; then an unknown marker byte.
    garbage = b"\xff\xff\xff\xff\x0f\x07"
    answer = frame_answer(bad.raw.run(send_raw(P2P.MESSAGE_MARKER + len(garbage).to_bytes(8, "big") + garbage)))
    rejected(answer, "not an ExpertRequest")
    assert answer.error_type == "ProtocolError"
    rejected(frame_answer(bad.raw.run(send_raw(b"\x07" + b"\x00" * 16))), "unknown frame marker")


@pytest.mark.timeout(30)
def test_bad_hidden_states_are_rejected_and_the_session_stays_usable(bad: BadInputSwarm) -> None:
    results = inference(
        bad,
        open_msg(batch=1),
        step_msg(hidden(size=32)),
        step_msg(hidden(batch=2)),
        step_msg(runtime_pb2.Tensor(buffer=b"\x00" * 8 * HIDDEN, size=[1, 1, HIDDEN], dtype="int64")),
        step_msg(runtime_pb2.Tensor(buffer=b"\x00" * 10, size=[1, 1, HIDDEN], dtype="float32")),
        step_msg(runtime_pb2.Tensor(buffer=b"", size=[1, 0, HIDDEN], dtype="float32")),
        step_msg(hidden().index_fill(2, torch.tensor([3]), float("nan"))),
        step_msg(hidden(length=1), position=5),
        step_msg(hidden(length=17)),
        runtime_pb2.ExpertRequest(metadata=Step(session_id="s1", position=0, step_id=1).encode()),
        step_msg(hidden(length=3)),  # a good step after all of that
    )
    opened, size, batch, dtype, buffer, empty, nan, ahead, too_long, no_tensor, good = results
    assert opened.ok
    rejected(size, f"[batch, length, {HIDDEN}]", "[1, 2, 32]")
    rejected(batch, "session batch size is 1, got 2")
    rejected(dtype, "unsupported tensor dtype 'int64'")
    rejected(buffer, "tensor buffer has 10 bytes")
    rejected(empty, "bad tensor shape [1, 0, 64]")
    rejected(nan, "NaN")
    rejected(ahead, "step at position 5", "holds 0 tokens")
    rejected(too_long, "17 tokens exceed the session's max_length of 16")
    rejected(no_tensor, "expected exactly one tensor")
    assert all(r.error_type == "ProtocolError" for r in results[1:-1])
    assert good.ok and good.position == 3 and good.step_id == 7


@pytest.mark.timeout(30)
def test_bad_sessions_are_rejected(bad: BadInputSwarm) -> None:
    (r,) = inference(bad, step_msg(hidden()))
    rejected(r, "unknown session id 's1'", "open a session")
    assert r.error_type == "SessionClosedError"
    opened, other = inference(bad, open_msg("s1"), step_msg(hidden(), session_id="s2"))
    assert opened.ok
    rejected(other, "unknown session id 's2'")
    opened, again = inference(bad, open_msg("s1"), open_msg("s1"))
    assert opened.ok
    rejected(again, "already has an open session")
    (r,) = inference(bad, open_msg(start=3, end=6))
    rejected(r, "blocks 3:6 are not hosted here", "this server hosts 0:3")
    (r,) = inference(bad, open_msg(start=2, end=4))
    rejected(r, "blocks 2:4 are not hosted here")
    (r,) = inference(bad, open_msg(max_length=9000))
    rejected(r, "max_length 9000 exceeds this server's limit of 8192")
    (r,) = inference(bad, open_msg(batch=9))
    rejected(r, "batch size 9 exceeds this server's limit of 8")
    (r,) = inference(bad, open_msg(start=5, end=1))
    rejected(r)
    old = msgpack.packb(
        {**OpenSession(session_id="s1", start=0, end=3, max_length=8, batch_size=1).model_dump(), "version": 99}
    )
    (r,) = inference(bad, runtime_pb2.ExpertRequest(metadata=old))
    rejected(r, "protocol version 99 is not supported")


# ---- stateless forward ----------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_bad_forward_requests_are_rejected(bad: BadInputSwarm) -> None:
    meta = ForwardRequest(start=0, end=3).encode()

    def part(t: torch.Tensor | runtime_pb2.Tensor, metadata: bytes = meta) -> Any:
        return runtime_pb2.ExpertRequest(
            tensors=[serialize(t) if isinstance(t, torch.Tensor) else t], metadata=metadata
        )

    ((r, _),) = forward(bad, part(hidden(), b"\xc1 garbage"), early=True)
    rejected(r, "metadata is not valid msgpack")
    ((r, _),) = forward(bad, runtime_pb2.ExpertRequest(metadata=meta))
    rejected(r, "empty forward request")
    ((r, _),) = forward(bad, part(hidden(size=48)))
    rejected(r, f"[batch, length, {HIDDEN}]")
    ((r, _),) = forward(bad, part(hidden(), ForwardRequest(start=0, end=6).encode()))
    rejected(r, "blocks 0:6 are not hosted here")
    ((r, _),) = forward(bad, part(hidden().fill_(float("inf"))))
    rejected(r, "NaN or infinity")
    ((r, _),) = forward(
        bad, part(runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[1, 1, 1], dtype="complex64")), early=True
    )
    rejected(r, "unsupported tensor dtype")
    ((r, _),) = forward(bad, part(hidden(batch=1)), part(hidden(batch=2)))
    rejected(r, "one batch size")
    ((r, _),) = forward(bad, part(hidden(batch=9, length=1)))
    rejected(r, "batch of 9 exceeds")
    old = msgpack.packb({"start": 0, "end": 3, "version": 99})
    ((r, _),) = forward(bad, part(hidden(), old), early=True)
    rejected(r, "protocol version 99 is not supported")
    # A good forward still works and returns the span's outputs.
    ((r, tensors),) = forward(bad, part(hidden()))
    assert r.ok and [list(t.size) for t in tensors] == [[1, 2, HIDDEN]]


# ---- cache budget ---------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_session_over_the_cache_budget_gets_cache_full(bad: BadInputSwarm) -> None:
    (r,) = inference(bad, open_msg(start=0, end=6, max_length=1000), peer=bad.small)
    rejected(r, "cache full", "needs", "MiB free", "shorter max_length")
    assert r.error_type == "CacheFullError"
    # Corolla's own client turns it into CacheFullError (raised, not a crash), and a session that fits opens.
    stream = HopStream(bad.small, 0, 6)
    with pytest.raises(CacheFullError, match="cache full"):
        bad.raw.run(stream.open(bad.raw.p2p, "big", 1000, 1, 10.0, 10.0))
    bad.raw.run(stream.close("big"))
    opened, step = inference(bad, open_msg(start=0, end=6, max_length=32), step_msg(hidden()), peer=bad.small)
    assert opened.ok and step.ok


@pytest.mark.timeout(60)
def test_client_session_over_the_cache_budget_raises_cache_full(bad: BadInputSwarm) -> None:
    model = client(bad.path, bad.swarm, dht_prefix=SMALL_PREFIX)
    with model, pytest.raises(CacheFullError, match="cache full"):
        model.generate(random_ids(1, 4, seed=40), max_new_tokens=4, max_length=1000)


@pytest.mark.timeout(60)
def test_client_session_that_fits_the_small_cache_runs(bad: BadInputSwarm) -> None:
    with client(bad.path, bad.swarm, dht_prefix=SMALL_PREFIX) as model:
        ids = random_ids(1, 4, seed=40)
        out = model.generate(ids, max_new_tokens=4, eos_token_id=[])  # 8 tokens fit
        assert torch.equal(out, hf_greedy(hf_model(bad.path), ids, 4, eos=False))
    assert read_records(bad.swarm.dht, SMALL_PREFIX, [0])[0]  # the small server is still announced


# ---- and after all of that ------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_servers_keep_serving_after_bad_input(bad: BadInputSwarm) -> None:
    assert all(s.alive() for s in bad.swarm.servers)
    with client(bad.path, bad.swarm) as model:
        ids = random_ids(2, 9, seed=41)
        out = model.generate(ids, max_new_tokens=10, eos_token_id=[])
        assert torch.equal(out, hf_greedy(hf_model(bad.path), ids, 10, eos=False))
        # Every rejected or finished session above has been freed.
        deadline = time.monotonic() + 10
        for peer in (bad.first, bad.small):
            while (sessions := model.loop.run(remote_info(model.p2p, peer, 10.0))["sessions"]) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.1)
            assert sessions == 0, f"server …{peer[-6:]} still holds {sessions} sessions"

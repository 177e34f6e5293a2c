"""Failures are data: errors name the full peer id as a field, bans forget servers that answer well."""

from __future__ import annotations

import asyncio
import pickle
import time
from types import SimpleNamespace

import pytest
import torch
from hivemind.proto import runtime_pb2

from corolla.engine.client.hops import Hop, culprit
from corolla.engine.client.remote import HopStream, Pipe, _check
from corolla.engine.config import ClientConfig
from corolla.engine.errors import (
    CacheFullError,
    MissingBlocksError,
    NoRouteError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.routing.sequence_manager import SequenceManager
from corolla.engine.wire.messages import StepResult
from corolla.engine.wire.tensors import serialize

# Two peer ids that end alike: a culprit found by matching the end of the id in a message would be wrong.
PEER_A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaSAME6x"
PEER_B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbSAME6x"


def test_peer_unavailable_carries_the_full_peer_id() -> None:
    error = PeerUnavailableError(PEER_A, "no answer within 1.0 s")
    assert error.peer_id == PEER_A
    assert error.reason == "no answer within 1.0 s"
    assert "…SAME6x" in str(error) and PEER_A not in str(error)  # messages stay short for people
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.peer_id, copy.reason, str(copy)) == (
        PeerUnavailableError,
        PEER_A,
        error.reason,
        str(error),
    )


@pytest.mark.parametrize("cls", [CacheFullError, ProtocolError, SessionClosedError])
def test_peer_errors_keep_their_peer_through_pickling(cls: type[PeerError]) -> None:
    error = cls("server …SAME6x: cache full", peer_id=PEER_B)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.peer_id, str(copy)) == (cls, PEER_B, str(error))
    assert cls("raised by the server itself").peer_id is None


@pytest.mark.parametrize(
    ("error_type", "cls"),
    [
        ("CacheFullError", CacheFullError),
        ("ProtocolError", ProtocolError),
        ("SessionClosedError", SessionClosedError),
        ("PeerUnavailableError", PeerUnavailableError),
        ("ServerError", PeerError),
    ],
)
def test_a_servers_error_answer_becomes_a_typed_error_naming_it(error_type: str, cls: type[PeerError]) -> None:
    with pytest.raises(cls) as caught:
        _check(PEER_A, StepResult(ok=False, step_id=3, error="something went wrong", error_type=error_type))
    assert type(caught.value) is cls
    assert caught.value.peer_id == PEER_A


class FakePipe(Pipe):
    """A stream whose server answers with ``responses`` in turn, then closes its side."""

    def __init__(self, *responses: runtime_pb2.ExpertResponse) -> None:
        self.responses = list(responses)
        self.sent: list[object] = []
        self.closed = False

    async def send(self, request: object) -> None:  # type: ignore[override]
        self.sent.append(request)

    async def receive(self) -> runtime_pb2.ExpertResponse:
        if not self.responses:
            raise asyncio.IncompleteReadError(b"", 1)
        return self.responses.pop(0)

    def close(self) -> None:
        self.closed = True


def _stream_answering(*responses: runtime_pb2.ExpertResponse, peer: str = PEER_B) -> HopStream:
    stream = HopStream(peer, 0, 2)
    stream._pipe = FakePipe(*responses)
    return stream


def test_garbage_from_a_server_names_that_server() -> None:
    hidden = torch.zeros(1, 1, 4)
    bad_tensor = serialize(hidden)
    bad_tensor.buffer = b"\x00" * 3  # too short for its shape
    ok = StepResult(ok=True, step_id=1, position=1).encode()
    cases = [
        runtime_pb2.ExpertResponse(metadata=b"\xc1 not msgpack"),
        runtime_pb2.ExpertResponse(metadata=ok, tensors=[bad_tensor]),
        runtime_pb2.ExpertResponse(metadata=ok, tensors=[serialize(torch.zeros(1, 2, 4))]),
        runtime_pb2.ExpertResponse(metadata=StepResult(ok=True, step_id=9, position=1).encode()),
    ]
    for response in cases:
        stream = _stream_answering(response)
        with pytest.raises(ProtocolError) as caught:
            asyncio.run(stream.step("s", hidden, 0, 1, timeout=5.0))
        assert caught.value.peer_id == PEER_B


def test_a_stream_the_server_closed_fails_at_once_naming_its_peer() -> None:
    stream = _stream_answering(peer=PEER_A)  # the server died: its side of the stream is closed
    began = time.monotonic()
    with pytest.raises(PeerUnavailableError) as caught:
        asyncio.run(stream.step("s", torch.zeros(1, 1, 4), 0, 1, timeout=30.0))
    assert time.monotonic() - began < 5  # not the step timeout
    assert caught.value.peer_id == PEER_A
    assert stream.closed


def test_the_culprit_is_read_from_the_error_not_its_text() -> None:
    hops = [Hop(HopStream(PEER_A, 0, 2)), Hop(HopStream(PEER_B, 2, 4))]
    # The message names …SAME6x, which both ids end with; only the field tells them apart.
    assert culprit(PeerUnavailableError(PEER_B, "closed the stream"), hops) == PEER_B
    assert culprit(CacheFullError("server …SAME6x: full", peer_id=PEER_B), hops) == PEER_B
    assert culprit(ProtocolError("no peer known"), hops) == PEER_A  # none named: the route's first hop


def manager(**overrides: float) -> SequenceManager:
    config = ClientConfig(**{"min_backoff": 1.0, "max_backoff": 8.0, **overrides})  # type: ignore[arg-type]
    return SequenceManager(None, "tiny", 4, config)


def test_bans_grow_with_repeats_and_are_capped() -> None:
    m = manager()
    assert [m.ban(PEER_A, "failed") for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert m.banned() == {PEER_A}


def test_a_server_that_answers_well_is_forgiven() -> None:
    m = manager()
    m.ban(PEER_A, "failed")
    m.ban(PEER_A, "failed again")
    m.ban(PEER_B, "failed")
    m.mark_ok(PEER_A)
    assert m.banned() == {PEER_B}
    assert m.ban(PEER_A, "failed once more") == 1.0  # strikes cleared: back to the shortest ban
    assert m.ban(PEER_B, "failed twice") == 2.0


def test_no_route_error_is_a_missing_blocks_error_naming_the_avoided_servers() -> None:
    error = NoRouteError("tiny", [5, 4, 6], [PEER_B, PEER_A, PEER_A])
    assert isinstance(error, MissingBlocksError)
    assert error.blocks == [4, 5, 6] and error.avoided == (PEER_A, PEER_B)
    assert "4:7" in str(error) and "failed recently" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.blocks, copy.avoided, str(copy)) == (error.blocks, error.avoided, str(error))


def test_a_stale_swarm_read_is_refreshed_in_the_background_after_the_first() -> None:
    """The first plan reads the swarm at once; later stale reads run in a background thread (one at a time)
    while plans use the last read; update_period 0 always reads at once."""
    import threading
    import time

    m = manager(update_period=0.01)
    reads: list[str] = []
    gate = threading.Event()

    def refresh() -> None:
        reads.append(threading.current_thread().name)
        if len(reads) > 1:
            gate.wait(5)
        m._spans = {PEER_A: object()}  # type: ignore[dict-item]
        m._updated = time.monotonic()

    m.refresh = refresh  # type: ignore[method-assign]
    m.first_read = refresh  # type: ignore[method-assign]  # the first read: only the blocks a route needs
    m._refresh_if_stale()
    assert reads == [threading.current_thread().name]  # nothing read yet: at once
    time.sleep(0.02)
    m._refresh_if_stale()
    m._refresh_if_stale()  # one background read at a time
    deadline = time.monotonic() + 5
    while len(reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert reads[1] == "corolla-refresh" and len(reads) == 2
    gate.set()
    always = manager(update_period=0.0)
    always_reads: list[str] = []
    always.refresh = lambda: always_reads.append(threading.current_thread().name)  # type: ignore[method-assign]
    always._spans = {PEER_A: object()}  # type: ignore[dict-item]
    always._refresh_if_stale()
    assert always_reads == [threading.current_thread().name]


def test_a_known_route_is_planned_without_waiting_for_a_read() -> None:
    """plan_known plans from the last read in the caller's thread (a session's first token plans on the event
    loop); it never reads the DHT at once: None before the first read, with update_period 0, or when the last
    read does not cover the blocks (plan_inference then reads, in a worker thread)."""
    from corolla.engine.dht.records import ServerRecord, ServerState
    from corolla.engine.routing.spans import RemoteSpan

    def span(peer: str, start: int, end: int) -> RemoteSpan:
        return RemoteSpan(peer, start, end, ServerRecord(state=ServerState.ONLINE, start=start, end=end))

    m = manager()
    reads: list[int] = []
    m.refresh = lambda: reads.append(1)  # type: ignore[method-assign]
    assert m.plan_known(0, 4) is None and reads == []  # never read: the caller reads in a worker thread
    m._spans = {PEER_A: span(PEER_A, 0, 2), PEER_B: span(PEER_B, 2, 4)}
    m._updated = time.monotonic()
    route = m.plan_known(0, 4)
    assert route is not None and [(h.peer_id, h.start, h.end) for h in route] == [(PEER_A, 0, 2), (PEER_B, 2, 4)]
    assert m.plan_known(0, 4, exclude={PEER_B}) is None and reads == []  # not covered: no read here
    m.ban(PEER_A, "failed")
    assert m.plan_known(0, 4) is None
    assert m.plan_known(0, 4, ignore_bans=True) is not None  # the last chance puts bans aside, as plan_inference
    always = manager(update_period=0.0)
    always.refresh = lambda: reads.append(1)  # type: ignore[method-assign]
    always._spans = dict(m._spans)
    assert always.plan_known(0, 4) is None and reads == []


@pytest.mark.timeout(30)
def test_closing_a_session_does_not_wait_for_the_client_loop() -> None:
    """close() hands the goodbyes to the loop and returns (generate's caller does not wait for a thread hop);
    the goodbyes still run there; after the loop stopped, close() drops them quietly instead of hanging."""
    import threading
    import warnings

    from corolla.engine.client.loop import LoopThread
    from corolla.engine.client.session import InferenceSession

    loop = LoopThread()
    gate, ran = threading.Event(), threading.Event()

    async def goodbye() -> None:
        while not gate.is_set():  # still running when submit returns
            await asyncio.sleep(0.005)
        ran.set()

    try:
        loop.submit(goodbye())
        assert not ran.is_set()
        gate.set()
        assert ran.wait(10)
        closed: list[str] = []
        sent = threading.Event()

        class Stream:
            async def close(self, session_id: str) -> None:
                while not sent.is_set():  # a goodbye still on its way
                    await asyncio.sleep(0.005)
                closed.append(session_id)

        context = SimpleNamespace(config=ClientConfig(), loop=loop)
        session = InferenceSession(context, 8)  # type: ignore[arg-type]
        session.hops = [SimpleNamespace(stream=Stream())]  # type: ignore[list-item]
        began = time.monotonic()
        session.close()
        session.close()  # idempotent
        assert time.monotonic() - began < 1 and not closed
        sent.set()
        deadline = time.monotonic() + 10
        while not closed and time.monotonic() < deadline:
            time.sleep(0.005)
        assert closed == [session.session_id]
    finally:
        loop.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        began = time.monotonic()
        loop.submit(goodbye())
        assert time.monotonic() - began < 1

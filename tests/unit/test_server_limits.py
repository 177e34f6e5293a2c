"""The server's pure limits: fair compute queue, per-peer budgets, stream counts, frame size checks."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hivemind.proto import runtime_pb2

from corolla.engine.errors import CacheFullError, ProtocolError
from corolla.engine.server.compute_queue import ComputeThread, FairQueue, Priority
from corolla.engine.server.frames import ERROR_MARKER, MESSAGE_MARKER, FrameLimits, StreamCounter, read_frame
from corolla.engine.server.limits import PeerBudget


# ---- fair queue -----------------------------------------------------------------------------
def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_fair_queue_takes_turns_between_peers() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.put(f"flood{i}", Priority.FORWARD, "flooder")
    queue.put("a0", Priority.FORWARD, "alice")
    queue.put("a1", Priority.FORWARD, "alice")
    queue.put("b0", Priority.FORWARD, "bob")
    assert len(queue) == 8 and queue.waiting("flooder") == 5
    assert drain(queue) == ["flood0", "a0", "b0", "flood1", "a1", "flood2", "flood3", "flood4"]
    assert len(queue) == 0 and queue.pop() is None


def test_fair_queue_runs_inference_steps_before_forwards() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.put(f"fwd{i}", Priority.FORWARD, "flooder")
    queue.put("step0", Priority.INFERENCE, "alice")
    queue.put("step1", Priority.INFERENCE, "bob")
    assert queue.pop() == "step0"
    queue.put("step2", Priority.INFERENCE, "alice")  # arrives later, still before every forward
    assert drain(queue) == ["step1", "step2", "fwd0", "fwd1", "fwd2"]


def test_fair_queue_keeps_each_peers_order() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(100):
        queue.put(i, Priority.INFERENCE, f"peer{i % 3}")
    out = [queue.pop() for _ in range(100)]
    for p in range(3):
        mine = [i for i in out if i is not None and i % 3 == p]
        assert mine == sorted(mine)


@pytest.mark.timeout(30)
def test_compute_thread_runs_jobs_in_fair_order_and_reports_errors() -> None:
    compute = ComputeThread("test-compute")
    gate = threading.Event()
    order: list[str] = []

    def job(name: str) -> str:
        if name == "block":
            gate.wait(10)
        if name == "boom":
            raise ValueError("boom")
        order.append(name)
        return name

    async def main() -> list[object]:
        first = asyncio.ensure_future(compute.run(lambda: job("block"), Priority.FORWARD, "x"))
        await asyncio.sleep(0)  # queued
        while len(compute):  # until the thread took it (it then blocks on the gate)
            await asyncio.sleep(0.01)
        calls = [compute.run(lambda n=f"f{i}": job(n), Priority.FORWARD, "flooder") for i in range(3)]
        calls.append(compute.run(lambda: job("step"), Priority.INFERENCE, "alice"))
        calls.append(compute.run(lambda: job("boom"), Priority.INFERENCE, "bob"))
        tasks = [asyncio.ensure_future(c) for c in calls]
        while len(compute) < 5:  # all queued behind the blocking job
            await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(first, *tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        compute.shutdown()
    assert order == ["block", "step", "f0", "f1", "f2"]
    assert isinstance(results[-1], ValueError)


# ---- per-peer budgets -----------------------------------------------------------------------
def test_peer_budget_caps_each_peer_and_the_total() -> None:
    budget = PeerBudget("tokens in flight", per_peer=100, total=250)
    budget.acquire("a", 60)
    budget.acquire("a", 40)
    with pytest.raises(CacheFullError, match="over its limit of 100 per peer"):
        budget.acquire("a", 1)
    budget.acquire("b", 100)
    with pytest.raises(CacheFullError, match="holds 200 tokens in flight of its limit of 250"):
        budget.acquire("c", 60)
    with budget.holding("c", 50):
        assert budget.held() == 250 and budget.held("c") == 50
    assert budget.held("c") == 0
    budget.release("a", 100)
    budget.acquire("c", 60)
    assert budget.held() == 160


def test_stream_counter_caps_streams_per_peer_and_in_total() -> None:
    streams = StreamCounter(FrameLimits(max_message_bytes=10, max_streams_per_peer=2, max_streams=3))
    streams.open("a")
    streams.open("a")
    with pytest.raises(CacheFullError, match="2 streams open"):
        streams.open("a")
    streams.open("b")
    with pytest.raises(CacheFullError, match="3 streams open, its limit"):
        streams.open("c")
    streams.close("a")
    streams.open("c")
    assert streams.total == 3


# ---- frames ---------------------------------------------------------------------------------
def frames(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


def frame(body: bytes, marker: bytes = MESSAGE_MARKER, length: int | None = None) -> bytes:
    return marker + (len(body) if length is None else length).to_bytes(8, "big") + body


def test_read_frame_reads_requests_and_the_end_of_stream() -> None:
    request = runtime_pb2.ExpertRequest(metadata=b"hello")

    async def main() -> list[object]:
        reader = frames(frame(request.SerializeToString()), frame(b"", ERROR_MARKER))
        got = [await read_frame(reader, 1024), await read_frame(reader, 1024)]
        return [*got, await read_frame(frames(), 1024)]  # then one that hangs up between messages

    assert asyncio.run(main()) == [request, None, None]


def test_read_frame_refuses_oversized_frames_from_the_header_alone() -> None:
    limit = 4 * 1024 * 1024

    async def refused(length: int) -> str:
        reader = frames(frame(b"", length=length), eof=False)  # no body at all: it must not be awaited
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(read_frame(reader, limit), 5)
        return str(info.value)

    assert "message of 4194305 bytes exceeds this server's limit of 4194304" in asyncio.run(refused(limit + 1))
    assert "1073741824 bytes" in asyncio.run(refused(1 << 30))
    assert "exceeds" in asyncio.run(refused((1 << 64) - 1))

    async def garbage(data: bytes) -> None:
        await read_frame(frames(data), limit)

    with pytest.raises(ProtocolError, match="unknown frame marker"):
        asyncio.run(garbage(b"\x07" + b"\x00" * 8))
    with pytest.raises(ProtocolError, match="not an ExpertRequest"):
        asyncio.run(garbage(frame(b"\xff\xff\xff\xff\x0f\x07")))


def test_a_peer_that_hangs_up_mid_answer_leaves_no_unretrieved_task_error() -> None:
    """A relay killed mid-stream: writing the answer fails; the stream ends quietly, its slot is freed."""
    import gc

    from hivemind.p2p import PeerID

    from corolla.engine.server.frames import BoundedStreams, StreamContext

    class BrokenWriter:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            raise ConnectionResetError("the relay went away")

        def close(self) -> None:
            pass

    async def handler(requests, context):  # type: ignore[no-untyped-def]
        async for _ in requests:
            yield runtime_pb2.ExpertResponse(metadata=b"answer")

    unretrieved: list[str] = []

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx["message"]))
        limits = FrameLimits(max_message_bytes=1024, max_streams_per_peer=2, max_streams=4, drain_seconds=0.1)
        streams = BoundedStreams(limits, lambda e: runtime_pb2.ExpertResponse())
        peer = PeerID(b"\x00\x01peer")
        context = StreamContext(handle_name="rpc", local_id=peer, remote_id=peer)
        request = runtime_pb2.ExpertRequest(metadata=b"hello").SerializeToString()
        reader = frames(frame(request), eof=False)
        await asyncio.wait_for(streams.serve(context, reader, BrokenWriter(), handler), 5)  # type: ignore[arg-type]
        gc.collect()
        await asyncio.sleep(0)
        return streams.streams.total

    assert asyncio.run(main()) == 0
    gc.collect()
    assert not [m for m in unretrieved if "never retrieved" in m]


# ---- chunked forwards -----------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_long_forwards_run_in_chunks_with_the_same_output(tmp_path: Path) -> None:
    import torch

    from corolla.engine.apps.tiny_models import make_tiny_checkpoint
    from corolla.engine.config import ServerConfig
    from corolla.engine.models.checkpoint import Checkpoint, load_span
    from corolla.engine.server.backend import SpanBackend

    ckpt = Checkpoint(str(make_tiny_checkpoint(tmp_path / "tiny")))
    config = ckpt.config()
    span = load_span(ckpt, config, 0, 6, torch.float32, "cpu")
    hidden = torch.randn(2, 23, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = span(hidden, None, 0, start=1, end=5)
    backend = SpanBackend(span, config, ServerConfig(compute_chunk_tokens=10), torch.float32)  # 5 positions a job
    try:
        chunked = asyncio.run(backend.forward(1, 5, hidden, "peer"))
    finally:
        backend.shutdown()
    assert chunked.shape == whole.shape
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert backend.tokens_processed == 46


@pytest.mark.timeout(60)
def test_a_forward_within_the_job_budget_runs_whole_a_few_blocks_per_job(tmp_path: Path) -> None:
    """Sequences that fit compute_chunk_tokens x blocks run whole, a few blocks per compute job (no cache):
    the same output as one call, and no job does more than the budget's work."""
    import torch

    from corolla.engine.apps.tiny_models import make_tiny_checkpoint
    from corolla.engine.config import ServerConfig
    from corolla.engine.models.checkpoint import Checkpoint, load_span
    from corolla.engine.server.backend import SpanBackend

    ckpt = Checkpoint(str(make_tiny_checkpoint(tmp_path / "tiny")))
    config = ckpt.config()
    span = load_span(ckpt, config, 0, 6, torch.float32, "cpu")
    hidden = torch.randn(2, 23, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = span(hidden, None, 0, start=1, end=5)
    # 46 tokens, budget 24 x 4 blocks = 96 token-blocks a job: two blocks per job, two jobs
    backend = SpanBackend(span, config, ServerConfig(compute_chunk_tokens=24), torch.float32)
    jobs: list[tuple[int, int, int, bool]] = []
    real = span.forward

    def spy(x: torch.Tensor, cache: object = None, offset: int = 0, **kwargs: object) -> torch.Tensor:
        jobs.append((x.shape[1], int(kwargs["start"]), int(kwargs["end"]), cache is None))  # type: ignore[call-overload]
        return real(x, cache, offset, **kwargs)  # type: ignore[arg-type]

    span.forward = spy  # type: ignore[method-assign]
    try:
        out = asyncio.run(backend.forward(1, 5, hidden, "peer"))
    finally:
        backend.shutdown()
    assert jobs == [(23, 1, 3, True), (23, 3, 5, True)]
    assert torch.equal(out, whole)

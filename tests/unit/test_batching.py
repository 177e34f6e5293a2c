"""Batching across sessions: one forward for several sessions' decode steps equals running them one by one."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest
import torch

from corolla.engine.apps.tiny_models import FAMILY_TEST_OVERRIDES, tiny_config
from corolla.engine.config import ServerConfig
from corolla.engine.errors import ProtocolError, SessionClosedError
from corolla.engine.models import shared_rows
from corolla.engine.models.batched import run_rows
from corolla.engine.models.registry import get_family
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.compute_queue import Batchable, ComputeThread, FairQueue, Priority

ATOL = 1e-5  # fp32: only the summation order of the matmuls differs between a batch and a single row
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False}),
    "qwen2-mixed-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
}
CASES = {**{name: (name, overrides) for name, overrides in FAMILY_TEST_OVERRIDES.items()}, **VARIANTS}
# Sessions of different batch sizes and prompt lengths (longer and shorter than the tiny windows of 4 and 5).
SESSIONS = [(1, 7), (2, 3), (1, 1), (1, 10)]
DECODE_STEPS = 4


def random_span(config: object, start: int, end: int) -> BlockSpan:
    """Blocks with random weights. Fused expert tensors and some vectors (gpt-oss's attention sinks and router
    bias) are allocated empty, so every matrix and every vector but the norms' is drawn here: memory left
    uninitialised made gpt-oss's outputs NaN now and then, and NaN never equals NaN."""
    torch.manual_seed(0)
    span = BlockSpan(config, start, end).eval()  # type: ignore[arg-type]
    for name, p in span.named_parameters():
        if p.ndim >= 2 or "norm" not in name:
            p.data.normal_(0, 0.1)
    return span


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_batched_decode_equals_one_by_one(case: str) -> None:
    family, overrides = CASES[case]
    config = tiny_config(family, **overrides)
    span = random_span(config, 1, 4)  # a sub-span: global block indices do not start at 0
    hidden = config.hidden_size
    prompts = [torch.randn(batch, length, hidden) for batch, length in SESSIONS]
    alone = [SpanCache(1, 3, 32) for _ in SESSIONS]
    together = [SpanCache(1, 3, 32) for _ in SESSIONS]
    for prompt, a, b in zip(prompts, alone, together, strict=True):
        assert torch.equal(span(prompt, a), span(prompt, b))
    for step in range(DECODE_STEPS):
        # A different subset of the sessions decodes together each step (a session may skip a step).
        members = [i for i in range(len(SESSIONS)) if (i + step) % 4 != 3]
        tokens = {i: torch.randn(SESSIONS[i][0], 1, hidden) for i in members}
        expected = {i: span(tokens[i], alone[i]) for i in members}
        # Sessions batch together only within the family's batch group, as the server's batch key has it.
        # Sessions with recurrent states (Qwen3-Next) each get their own key.
        groups: dict[object, list[int]] = {}
        for i in members:
            alone_key = i if together[i].recurrent else None
            groups.setdefault((span.family.batch_group(config, together[i].length), alone_key), []).append(i)
        got = {}
        for group in groups.values():
            outs = run_rows(span, [tokens[i] for i in group], [together[i] for i in group], 1, 4)
            got.update(zip(group, outs, strict=True))
        for i, out in got.items():
            assert out.shape == expected[i].shape
            diff = (out - expected[i]).abs().max().item()
            assert diff < ATOL, f"{case}: session {i} step {step} differs by {diff}"
            assert together[i].length == alone[i].length


# Per step: the sessions that decode together, then what one session does on its own before the next step.
SHARED_SCHEDULE: list[tuple[list[int], tuple[str, int] | None]] = [
    ([0, 1, 2, 3], None),
    ([0, 1, 2, 3], None),  # the same sessions again: they move into shared rows
    ([3, 2, 1, 0], ("prompt", 0)),  # any order; then session 0 runs 3 tokens alone, in its rows (or grows out)
    ([0, 1, 2, 3], ("rewind", 1)),  # session 1 then goes back 2 tokens (a resent step)
    ([0, 1, 2, 3], None),
    ([0, 1, 2], None),  # session 3 leaves: the others form new rows at the next step, 3 gets its own storage
    ([0, 1, 2], None),
    ([0, 1, 2, 3], None),  # it comes back
    ([0, 1, 2, 3], None),
    ([0, 1, 2, 3], None),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_sessions_in_shared_rows_decode_as_one_by_one(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions sharing rows (joining, leaving, rewinding, running prompts alone, outgrowing the rows) decode
    exactly as on their own."""
    monkeypatch.setattr(shared_rows, "MIN_CAPACITY", 4)  # rows that the steps below outgrow
    family, overrides = CASES[case]
    config = tiny_config(family, **overrides)
    span = random_span(config, 1, 4)
    hidden = config.hidden_size
    alone = [SpanCache(1, 3, 40) for _ in SESSIONS]
    together = [SpanCache(1, 3, 40) for _ in SESSIONS]
    for (batch, length), a, b in zip(SESSIONS, alone, together, strict=True):
        prompt = torch.randn(batch, length, hidden)
        assert torch.equal(span(prompt, a), span(prompt, b))
    shared_steps = 0
    for step, (members, then) in enumerate(SHARED_SCHEDULE):
        tokens = {i: torch.randn(SESSIONS[i][0], 1, hidden) for i in members}
        expected = {i: span(tokens[i], alone[i]) for i in members}
        groups: dict[object, list[int]] = {}
        for i in members:
            alone_key = i if together[i].recurrent else None
            groups.setdefault((span.family.batch_group(config, together[i].length), alone_key), []).append(i)
        for group in groups.values():
            outs = run_rows(span, [tokens[i] for i in group], [together[i] for i in group], 1, 4)
            shared_steps += together[group[0]].group is not None
            for i, out in zip(group, outs, strict=True):
                diff = (out - expected[i]).abs().max().item()
                assert diff < ATOL, f"{case}: session {i} step {step} differs by {diff}"
                assert together[i].length == alone[i].length
        if then is not None:
            what, i = then
            if what == "prompt":
                x = torch.randn(SESSIONS[i][0], 3, hidden)
                assert (span(x, together[i]) - span(x, alone[i])).abs().max().item() < ATOL
            else:
                for cache in (together[i], alone[i]):
                    if cache.can_rewind(cache.length - 2):
                        cache.truncate(cache.length - 2)
    if not any(cache.recurrent for cache in together):
        assert shared_steps > 0  # the schedule did run steps on shared rows


@torch.inference_mode()
def test_sessions_of_different_batch_groups_are_not_batched() -> None:
    """Llama 4's temperature (blocks without rotary) follows the batch's cache length: one value for every row."""
    config = tiny_config("llama4_text", **FAMILY_TEST_OVERRIDES["llama4_text"])  # floor_scale 4
    span = random_span(config, 1, 4)
    assert [span.family.batch_group(config, p) for p in (2, 3, 6, 7)] == [0, 1, 1, 2]
    caches = [SpanCache(1, 3, 32) for _ in range(2)]
    span(torch.randn(1, 2, config.hidden_size), caches[0])
    span(torch.randn(1, 3, config.hidden_size), caches[1])
    with pytest.raises(ValueError, match="batch groups"):
        run_rows(span, [torch.randn(1, 1, config.hidden_size) for _ in caches], caches, 1, 4)
    assert [c.length for c in caches] == [2, 3]  # nothing was appended
    assert get_family(tiny_config("llama")).batch_group(tiny_config("llama"), 5) is None  # the common case: one group


@torch.inference_mode()
def test_sessions_with_recurrent_states_are_not_batched_together() -> None:
    """A recurrent state is updated in place in its own cache: rows of several sessions never share a forward."""
    config = tiny_config("qwen3_next")
    span = random_span(config, 0, 3)
    caches = [SpanCache(0, 3, 32) for _ in range(2)]
    for cache in caches:
        span(torch.randn(1, 2, config.hidden_size), cache)
    assert all(cache.recurrent for cache in caches)
    with pytest.raises(ValueError, match="one session at a time"):
        run_rows(span, [torch.randn(1, 1, config.hidden_size) for _ in caches], caches, 0, 3)
    assert [c.length for c in caches] == [2, 2]  # nothing was appended

    steps = [torch.randn(1, 1, config.hidden_size) for _ in range(3)]
    got, batched = decode_two_sessions_queued_together(span, config, steps)
    assert batched == 0
    for i in range(2):  # each session's outputs are its own, as if it were alone on the server
        ref = SpanCache(0, 3, 32)
        span(torch.randn(1, 2, config.hidden_size, generator=torch.Generator().manual_seed(i)), ref)
        for x, out in zip(steps, got[i], strict=True):
            assert (out - span(x, ref)).abs().max().item() <= ATOL
    # Control: the same scenario batches a family without recurrent states.
    llama = tiny_config("llama")
    _, batched = decode_two_sessions_queued_together(random_span(llama, 0, 3), llama, steps)
    assert batched > 0


def decode_two_sessions_queued_together(
    span: BlockSpan, config: object, steps: list[torch.Tensor]
) -> tuple[list[list[torch.Tensor]], int]:
    """Two sessions' decode steps queued while the compute thread is busy (so they could batch); their outputs
    and the rows the server ran batched."""
    backend = SpanBackend(span, config, ServerConfig(batch_rows=8), torch.float32)  # type: ignore[arg-type]
    hidden = span.config.hidden_size

    async def scenario() -> list[list[torch.Tensor]]:
        sessions = [backend.open_session(f"s{i}", 0, 3, 32, 1, f"peer{i}") for i in range(2)]
        for i, s in enumerate(sessions):
            await backend.inference_step(s, 0, torch.randn(1, 2, hidden, generator=torch.Generator().manual_seed(i)))
        outs: list[list[torch.Tensor]] = [[], []]
        for k, x in enumerate(steps):
            gate, started = threading.Event(), threading.Event()
            blocker = asyncio.ensure_future(backend.compute(functools.partial(block, started, gate), "X"))
            while not started.is_set():
                await asyncio.sleep(0.01)
            tasks = [asyncio.ensure_future(backend.inference_step(s, 2 + k, x)) for s in sessions]
            while backend.queued() < len(tasks):
                await asyncio.sleep(0.01)
            gate.set()
            await blocker
            for i, out in enumerate(await asyncio.gather(*tasks)):
                outs[i].append(out)
        return outs

    try:
        got = asyncio.run(scenario())
    finally:
        backend.shutdown()
    return got, backend.rows_batched


@torch.inference_mode()
def test_sessions_stepping_together_again_share_rows_and_steps_copy_nothing() -> None:
    """The first batched step copies; from the second one on the sessions' keys are rows of one tensor per block,
    which no later step reallocates (each step writes its keys in place)."""
    config = tiny_config("llama")
    span = random_span(config, 0, 2)
    caches = [SpanCache(0, 2, 64) for _ in range(3)]
    for i, cache in enumerate(caches):
        span(torch.randn(1, 2 + i, config.hidden_size), cache)
    own = [cache.span_layers[0].keys.data_ptr() for cache in caches]  # type: ignore[union-attr]
    run_rows(span, [torch.randn(1, 1, config.hidden_size) for _ in caches], caches, 0, 2)
    assert [cache.span_layers[0].keys.data_ptr() for cache in caches] == own  # type: ignore[union-attr]
    assert all(cache.group is None for cache in caches)
    run_rows(span, [torch.randn(1, 1, config.hidden_size) for _ in caches], caches, 0, 2)
    shared = caches[0].group
    assert shared is not None and all(cache.group is shared for cache in caches)
    for block in range(2):
        for cache, part in zip(caches, shared.rows, strict=True):
            keys = cache.span_layers[block].keys
            assert keys is not None and keys.data_ptr() == shared.keys[block][part].data_ptr()
    storage = [cache.span_layers[0].keys.data_ptr() for cache in caches]  # type: ignore[union-attr]
    for _ in range(4):
        run_rows(span, [torch.randn(1, 1, config.hidden_size) for _ in caches][::-1], caches[::-1], 0, 2)
    assert [cache.span_layers[0].keys.data_ptr() for cache in caches] == storage  # type: ignore[union-attr]
    assert [cache.length for cache in caches] == [8, 9, 10]


@torch.inference_mode()
def test_batched_step_refuses_mismatched_rows() -> None:
    config = tiny_config("llama")
    span = random_span(config, 0, 2)
    cache = SpanCache(0, 2, 16)
    span(torch.randn(2, 3, config.hidden_size), cache)
    with pytest.raises(ValueError, match="one token per row"):
        run_rows(span, [torch.randn(1, 1, config.hidden_size)], [cache], 0, 2)
    with pytest.raises(ValueError, match="holds tokens"):
        run_rows(span, [torch.randn(1, 1, config.hidden_size)], [SpanCache(0, 2, 16)], 0, 2)
    assert cache.length == 3


def block(started: threading.Event, gate: threading.Event) -> None:
    """A job that holds the compute thread until the test has queued what it wants batched."""
    started.set()
    gate.wait(20)


def test_queue_take_keeps_the_pick_order_and_the_others_places() -> None:
    queue: FairQueue[str] = FairQueue()
    for item, priority, peer in [("a1", 0, "A"), ("b1", 0, "B"), ("a2", 0, "A"), ("f1", 1, "A"), ("b2", 0, "B")]:
        queue.put(item, priority, peer)
    assert queue.take(lambda item: item != "b1", 3) == ["a1", "b2", "a2"]  # one per peer per round
    assert len(queue) == 2
    assert [queue.pop(), queue.pop(), queue.pop()] == ["b1", "f1", None]
    queue.put("a3", 0, "A")
    assert queue.take(lambda item: True, 1) == ["a3"] and len(queue) == 0


@pytest.mark.timeout(30)
def test_compute_thread_runs_queued_steps_of_one_key_as_one_batch() -> None:
    thread = ComputeThread()
    gate, started = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def run_many(payloads: list[int]) -> list[int]:
        calls.append(payloads)
        return [p * 10 for p in payloads]

    def step(n: int, key: str = "span", size: int = 1) -> Batchable:
        return Batchable(key, n, run_many, size=size, limit=4)

    async def scenario() -> list[int]:
        blocker = asyncio.ensure_future(thread.run(lambda: block(started, gate), Priority.INFERENCE, "X"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        jobs = [
            thread.run(lambda: -1, Priority.INFERENCE, "A", step(1)),
            thread.run(lambda: -2, Priority.INFERENCE, "B", step(2, key="other")),
            thread.run(lambda: -3, Priority.INFERENCE, "C", step(3, size=2)),
            thread.run(lambda: -4, Priority.INFERENCE, "D", step(4, size=2)),  # over the limit of 4 rows
            thread.run(lambda: -5, Priority.INFERENCE, "E", step(5)),
            thread.run(lambda: 6, Priority.INFERENCE, "F"),
        ]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        while len(thread) < len(jobs):
            await asyncio.sleep(0.01)
        gate.set()
        await blocker
        return list(await asyncio.gather(*tasks))

    try:
        results = asyncio.run(scenario())
    finally:
        thread.shutdown()
    assert results == [10, -2, 30, -4, 50, 6]  # grouped steps through run_many, lone ones through their own fn
    assert calls[0] == [1, 3, 5]  # the first key's steps, up to 4 rows; the others ran alone (their own fn)
    assert len(calls) == 1


@pytest.mark.timeout(30)
def test_a_failing_batch_runs_its_steps_one_by_one() -> None:
    thread = ComputeThread()
    gate, started = threading.Event(), threading.Event()

    def run_many(payloads: list[int]) -> list[int]:
        raise ValueError("one member is bad")

    async def scenario() -> list[object]:
        blocker = asyncio.ensure_future(thread.run(lambda: block(started, gate), Priority.INFERENCE, "X"))
        while not started.is_set():
            await asyncio.sleep(0.01)

        def bad() -> int:
            raise RuntimeError("bad step")

        jobs = [
            thread.run(lambda: 1, Priority.INFERENCE, "A", Batchable("k", 1, run_many, limit=8)),
            thread.run(bad, Priority.INFERENCE, "B", Batchable("k", 2, run_many, limit=8)),
        ]
        tasks = [asyncio.ensure_future(job) for job in jobs]
        while len(thread) < len(jobs):
            await asyncio.sleep(0.01)
        gate.set()
        await blocker
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    try:
        results = asyncio.run(scenario())
    finally:
        thread.shutdown()
    assert results[0] == 1 and isinstance(results[1], RuntimeError)


@pytest.mark.timeout(60)
def test_a_long_prompt_runs_in_chunks_that_other_sessions_steps_can_pass() -> None:
    """A prompt step is split into compute jobs of compute_chunk_tokens; its output equals one forward, and a
    decode step queued meanwhile runs before the prompt's last chunk."""
    config = tiny_config("llama")
    span = random_span(config, 0, 3)
    cfg = ServerConfig(compute_chunk_tokens=4)
    backend = SpanBackend(span, config, cfg, torch.float32)
    prompt = torch.randn(1, 23, config.hidden_size)
    with torch.inference_mode():
        whole = span(prompt, SpanCache(0, 3, 64))
    order: list[str] = []
    real_run = backend.span.forward

    def spy(hidden: torch.Tensor, cache: object = None, *args: object, **kwargs: object) -> torch.Tensor:
        order.append(f"{hidden.shape[1]}")
        return real_run(hidden, cache, *args, **kwargs)  # type: ignore[arg-type]

    backend.span.forward = spy  # type: ignore[method-assign]

    async def scenario() -> torch.Tensor:
        long = backend.open_session("long", 0, 3, 64, 1, "A")
        short = backend.open_session("short", 0, 3, 64, 1, "B")
        await backend.inference_step(short, 0, torch.randn(1, 2, config.hidden_size))
        order.clear()
        prompt_task = asyncio.ensure_future(backend.inference_step(long, 0, prompt))
        while not order:  # the prompt's first chunk has started
            await asyncio.sleep(0.001)
        await backend.inference_step(short, 2, torch.randn(1, 1, config.hidden_size))
        order.append("decode done")
        return await prompt_task

    try:
        out = asyncio.run(scenario())
    finally:
        backend.shutdown()
    assert (out - whole).abs().max().item() < ATOL
    assert order.count("4") == 5 and order.count("3") == 1  # 23 positions in jobs of 4
    assert order.index("decode done") < len(order) - 1  # the decode step did not wait for the whole prompt


@pytest.mark.timeout(60)
def test_one_message_of_many_sessions_equals_their_own_steps() -> None:
    """decode_steps (a client's sessions batched into one message) gives each session what its own step gives,
    in as many forwards as the server's batch_rows allow, and refuses what a peer may not ask."""
    config = tiny_config("llama")
    span = random_span(config, 0, 3)
    hidden = config.hidden_size
    backend = SpanBackend(span, config, ServerConfig(batch_rows=3), torch.float32)
    sizes = [1, 2, 1, 1]  # rows per session: 5 rows run as jobs of at most 3
    prompts = [torch.randn(b, 2 + i, hidden) for i, b in enumerate(sizes)]
    tokens = [torch.randn(b, 1, hidden) for b in sizes]
    forwards: list[int] = []
    real_rows = backend._decode_many

    def spy(steps: list[tuple[object, int, torch.Tensor]]) -> list[torch.Tensor]:
        forwards.append(sum(x.shape[0] for _, _, x in steps))
        return real_rows(steps)  # type: ignore[arg-type]

    async def scenario() -> tuple[list[torch.Tensor], torch.Tensor]:
        alone, together = [], []
        for i, (b, prompt) in enumerate(zip(sizes, prompts, strict=True)):
            alone.append(backend.open_session(f"a{i}", 0, 3, 16, b, "A"))
            together.append(backend.open_session(f"t{i}", 0, 3, 16, b, "A"))
            await backend.inference_step(alone[i], 0, prompt)
            await backend.inference_step(together[i], 0, prompt)
        expected = [await backend.inference_step(s, s.cache.length, x) for s, x in zip(alone, tokens, strict=True)]
        backend._decode_many = spy  # type: ignore[method-assign]
        got = await backend.decode_steps([(s, s.cache.length) for s in together], torch.cat(tokens))
        assert [s.cache.length for s in together] == [s.cache.length for s in alone]
        other = backend.open_session("b", 0, 3, 16, 1, "B")
        await backend.inference_step(other, 0, prompts[0][:1])
        with pytest.raises(SessionClosedError):  # another peer's session cannot be named
            backend.session_of("b", "A")
        step = torch.randn(1, 1, hidden)
        bad = [
            [(together[0], together[0].cache.length), (together[0], together[0].cache.length)],  # twice
            [(together[0], 0)],  # a decode step follows the prompt
            [(together[0], together[0].cache.length + 1)],  # past what the server holds
        ]
        for steps in bad:
            with pytest.raises(ProtocolError):
                await backend.decode_steps(steps, step)
        with pytest.raises(ProtocolError):  # rows that do not match the sessions' batch sizes
            await backend.decode_steps([(together[1], together[1].cache.length)], step)
        return expected, got

    try:
        expected, got = asyncio.run(scenario())
    finally:
        backend.shutdown()
    assert (got - torch.cat(expected)).abs().max().item() < ATOL
    assert sorted(forwards) == [2, 3]  # 5 rows, batch_rows 3: two forwards, no session split


def test_a_closed_sessions_shared_rows_are_freed_and_the_others_decode_on() -> None:
    """Closing (or the server reclaiming) a session that shares rows frees the rows before the next job; the
    other sessions keep their tokens in storage of their own and decode as on their own."""
    config = tiny_config("llama")
    span = random_span(config, 0, 3)
    hidden = config.hidden_size
    backend = SpanBackend(span, config, ServerConfig(batch_rows=8), torch.float32)

    async def scenario() -> None:
        alone = [backend.open_session(f"a{i}", 0, 3, 16, 1, "A") for i in range(3)]
        together = [backend.open_session(f"t{i}", 0, 3, 16, 1, "A") for i in range(3)]
        for i in range(3):
            prompt = torch.randn(1, 2 + i, hidden)
            await backend.inference_step(alone[i], 0, prompt)
            await backend.inference_step(together[i], 0, prompt)
        for round_ in range(4):
            members = together if round_ < 2 else together[1:]
            if round_ == 2:
                rows = together[0].cache.group
                assert rows is not None and all(s.cache.group is rows for s in together)
                backend.close_session(together[0])
                assert rows.caches  # freed by the compute thread, not here
            tokens = torch.randn(len(members), 1, hidden)
            got = await backend.decode_steps([(s, s.cache.length) for s in members], tokens)
            if round_ == 2:
                assert not rows.caches and all(s.cache.group is None for s in together)
            first = len(together) - len(members)
            for k, s in enumerate(alone[first:]):
                expected = await backend.inference_step(s, s.cache.length, tokens[k : k + 1])
                assert (got[k : k + 1] - expected).abs().max().item() < ATOL
        rows = together[1].cache.group  # the sessions left share new rows from their second step together on
        assert rows is not None and rows.holds([s.cache for s in together[1:]])

    try:
        asyncio.run(scenario())
    finally:
        backend.shutdown()


def test_shared_rows_never_take_more_than_the_sessions_reserved() -> None:
    """Rows x positions stay within the sessions' max_length x batch sizes; rows that cannot are not shared."""
    caches = [SpanCache(0, 1, 100), SpanCache(0, 1, 20)]  # batch sizes 1 and 3: 100 + 60 = 160 positions
    assert shared_rows.shared_capacity(caches, [1, 3], needed=10) == 40  # 4 rows x 40 = 160
    assert shared_rows.shared_capacity(caches, [1, 3], needed=41) is None  # the short session's rows cannot grow
    big = [SpanCache(0, 1, 4096), SpanCache(0, 1, 4096)]
    assert shared_rows.shared_capacity(big, [1, 1], needed=10) == shared_rows.MIN_CAPACITY
    assert shared_rows.shared_capacity(big, [1, 1], needed=65, held=64) == 128  # grows by doubling

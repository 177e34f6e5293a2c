"""Cache budget accounting and the span backend's checks on everything a peer sends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig

from corolla.engine.apps.tiny_models import TINY_DEFAULTS
from corolla.engine.config import ServerConfig
from corolla.engine.errors import CacheFullError, CorollaError, ProtocolError
from corolla.engine.models.cache_size import token_cache_bytes
from corolla.engine.models.span import BlockSpan, SpanCache
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.kv_cache import CacheBudget, cache_bytes_per_token

MiB = 2**20
HIDDEN = TINY_DEFAULTS["hidden_size"]
KV_HEADS = TINY_DEFAULTS["num_key_value_heads"]
HEAD_DIM = HIDDEN // TINY_DEFAULTS["num_attention_heads"]
BLOCK_BYTES = 2 * KV_HEADS * HEAD_DIM * 4  # keys and values of one token in one Llama block, float32
SPAN = (1, 4)  # the backend hosts blocks 1..3


# ---- CacheBudget --------------------------------------------------------------------------------


def test_reserve_and_release() -> None:
    budget = CacheBudget(capacity=1000)
    budget.reserve(600, "a")
    budget.reserve(400, "b")  # exactly full is fine
    assert budget.used == 1000 and budget.free == 0
    with pytest.raises(CacheFullError):
        budget.reserve(1, "c")
    assert budget.used == 1000  # a refused reservation takes nothing
    budget.release(400)
    assert budget.free == 400
    budget.reserve(400, "c")
    budget.release(5000)  # over-release clamps at zero
    assert budget.used == 0 and budget.free == 1000


def test_cache_full_message_says_how_much_is_free_and_what_to_do() -> None:
    budget = CacheBudget(capacity=10 * MiB)
    budget.reserve(6 * MiB, "first")
    with pytest.raises(CacheFullError) as info:
        budget.reserve(5 * MiB, "a session of 2x128 tokens")
    message = str(info.value)
    assert isinstance(info.value, CorollaError)
    assert "a session of 2x128 tokens" in message
    assert "5.0 MiB" in message  # needed
    assert "4.0 MiB free" in message
    assert "10.0 MiB" in message  # capacity
    assert "max_length" in message and "batch" in message and "retry" in message


def test_concurrent_reservations_never_overcommit() -> None:
    budget = CacheBudget(capacity=5000)
    refused = []

    def worker() -> None:
        for _ in range(1000):
            try:
                budget.reserve(1, "x")
            except CacheFullError:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 5000
    assert len(refused) == 8 * 1000 - 5000


def test_cache_bytes_per_token_adds_the_blocks() -> None:
    assert cache_bytes_per_token([256, 256, 512]) == 1024  # blocks may store different amounts
    assert cache_bytes_per_token([]) == 0


def test_a_llama_block_stores_keys_and_values_of_its_kv_heads() -> None:
    config = LlamaConfig(**TINY_DEFAULTS)
    assert token_cache_bytes(config, torch.float32) == (BLOCK_BYTES,) * config.num_hidden_layers
    assert token_cache_bytes(config, torch.bfloat16) == (BLOCK_BYTES // 2,) * config.num_hidden_layers


@torch.inference_mode()
def test_cache_bytes_per_token_matches_what_a_full_span_cache_holds() -> None:
    config = LlamaConfig(**TINY_DEFAULTS)
    span = BlockSpan(config, 0, 3)
    batch, max_length = 2, 70
    cache = SpanCache(0, 3, max_length)
    span(torch.randn(batch, max_length, HIDDEN), cache)
    held = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )
    assert held == cache_bytes_per_token(token_cache_bytes(config, torch.float32)[0:3]) * max_length * batch


# ---- SpanBackend --------------------------------------------------------------------------------


def per_token_bytes() -> int:
    return (SPAN[1] - SPAN[0]) * BLOCK_BYTES


def make_backend(**cfg: int) -> SpanBackend:
    config = LlamaConfig(**TINY_DEFAULTS)
    torch.manual_seed(0)
    span = BlockSpan(config, *SPAN).eval()
    return SpanBackend(span, config, ServerConfig(**cfg), torch.float32)  # type: ignore[arg-type]


@pytest.fixture
def backend() -> Iterator[SpanBackend]:
    # Room for exactly two sessions of 1 x 100 tokens over the whole span.
    b = make_backend(
        cache_bytes=2 * 100 * per_token_bytes() + 10, max_length=256, max_batch_size=4, max_chunk_tokens=64
    )
    yield b
    b.shutdown()


def test_open_session_refuses_past_the_budget_and_accepts_after_close(backend: SpanBackend) -> None:
    a = backend.open_session("a", *SPAN, max_length=100, batch_size=1)
    assert a.reserved_bytes == 100 * per_token_bytes()
    backend.open_session("b", *SPAN, max_length=100, batch_size=1)
    with pytest.raises(CacheFullError, match="free"):
        backend.open_session("c", *SPAN, max_length=100, batch_size=1)
    assert set(backend.sessions) == {"a", "b"}
    backend.close_session(a)
    backend.close_session(a)  # idempotent: releases once
    assert backend.budget.used == 100 * per_token_bytes()
    backend.open_session("c", *SPAN, max_length=100, batch_size=1)


def test_reservation_scales_with_blocks_batch_and_length(backend: SpanBackend) -> None:
    s = backend.open_session("s", 2, 3, max_length=30, batch_size=3)  # one block of the three
    assert s.reserved_bytes == BLOCK_BYTES * 30 * 3
    assert backend.budget.used == s.reserved_bytes
    assert backend.cache_tokens_left() == backend.budget.free // per_token_bytes()


def test_open_session_limits(backend: SpanBackend) -> None:
    with pytest.raises(ProtocolError, match="max_length"):
        backend.open_session("x", *SPAN, max_length=257, batch_size=1)
    with pytest.raises(ProtocolError, match="batch"):
        backend.open_session("x", *SPAN, max_length=8, batch_size=5)
    with pytest.raises(ProtocolError, match="not hosted"):
        backend.open_session("x", 0, 2, max_length=8, batch_size=1)
    backend.open_session("x", *SPAN, max_length=8, batch_size=1, peer="alice")
    with pytest.raises(ProtocolError, match="already open"):  # another peer cannot take over a session id
        backend.open_session("x", *SPAN, max_length=8, batch_size=1, peer="mallory")
    assert backend.budget.used == 8 * per_token_bytes()  # refusals reserved nothing
    # Its own client may reopen it (failover back to this server): the old one is dropped, not doubled.
    backend.open_session("x", *SPAN, max_length=8, batch_size=1, peer="alice")
    assert backend.budget.used == 8 * per_token_bytes() and len(backend.sessions) == 1


def test_max_sessions_is_enforced() -> None:
    b = make_backend(max_sessions=2)
    try:
        b.open_session("1", *SPAN, max_length=4, batch_size=1)
        b.open_session("2", *SPAN, max_length=4, batch_size=1)
        with pytest.raises(CacheFullError, match="sessions"):
            b.open_session("3", *SPAN, max_length=4, batch_size=1)
    finally:
        b.shutdown()


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 2), (0, 4), (1, 5), (3, 5), (2, 2), (3, 2), (-1, 2), (4, 5)],
)
def test_check_span_rejects_blocks_not_hosted(backend: SpanBackend, start: int, end: int) -> None:
    with pytest.raises(ProtocolError, match="not hosted"):
        backend.check_span(start, end)


@pytest.mark.parametrize(("start", "end"), [(1, 4), (1, 2), (2, 4), (3, 4)])
def test_check_span_accepts_hosted_blocks(backend: SpanBackend, start: int, end: int) -> None:
    backend.check_span(start, end)


def test_check_hidden_accepts_and_converts(backend: SpanBackend) -> None:
    out = backend.check_hidden(torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16), 2)
    assert out.dtype == torch.float32 and out.shape == (2, 5, HIDDEN)


@pytest.mark.parametrize(
    "shape",
    [(5, HIDDEN), (2, 5, HIDDEN + 1), (2, 5, HIDDEN - 1), (1, 2, 5, HIDDEN), (HIDDEN,)],
)
def test_check_hidden_rejects_wrong_shape(backend: SpanBackend, shape: tuple[int, ...]) -> None:
    with pytest.raises(ProtocolError, match="shape"):
        backend.check_hidden(torch.zeros(shape), None)


def test_check_hidden_rejects_wrong_batch(backend: SpanBackend) -> None:
    with pytest.raises(ProtocolError, match="batch size"):
        backend.check_hidden(torch.zeros(3, 1, HIDDEN), 2)
    with pytest.raises(ProtocolError, match="exceeds"):
        backend.check_hidden(torch.zeros(5, 1, HIDDEN), None)  # max_batch_size=4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_hidden_rejects_non_finite(backend: SpanBackend, bad: float) -> None:
    hidden = torch.zeros(1, 3, HIDDEN)
    hidden[0, 1, 7] = bad
    with pytest.raises(ProtocolError, match="NaN or infinity"):
        backend.check_hidden(hidden, 1)


def test_check_hidden_rejects_too_many_tokens(backend: SpanBackend) -> None:
    backend.check_hidden(torch.zeros(4, 16, HIDDEN), None)  # 64 tokens: the limit
    with pytest.raises(ProtocolError, match="smaller chunks"):
        backend.check_hidden(torch.zeros(4, 17, HIDDEN), None)
    with pytest.raises(ProtocolError, match="smaller chunks"):
        backend.check_hidden(torch.zeros(1, 65, HIDDEN), None)


def test_inference_steps_match_an_uncached_forward(backend: SpanBackend) -> None:
    x = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(0))

    async def run() -> tuple[torch.Tensor, torch.Tensor]:
        session = backend.open_session("s", *SPAN, max_length=8, batch_size=1)
        first = await backend.inference_step(session, 0, x[:, :4])
        second = await backend.inference_step(session, 4, x[:, 4:])
        with pytest.raises(ProtocolError, match="holds 6"):
            await backend.inference_step(session, 7, x[:, :1])  # ahead of the server
        with pytest.raises(ProtocolError, match="max_length"):
            await backend.inference_step(session, 6, x[:, :3])  # 9 > 8 tokens
        full = await backend.forward(*SPAN, x)
        return torch.cat([first, second], dim=1), full

    stepped, full = asyncio.run(run())
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


def test_recurrent_states_are_reserved_per_sequence_and_rewinds_need_a_replay() -> None:
    """Qwen3-Next: attention blocks reserve per token, linear-attention blocks their state per sequence (twice:
    the state and its copy from the step's start); a session's real holdings never exceed its reservation."""
    from corolla.engine.apps.tiny_models import tiny_config
    from corolla.engine.models.cache_size import state_cache_bytes

    config = tiny_config("qwen3_next")
    torch.manual_seed(0)
    span = BlockSpan(config, 0, 3).eval()  # blocks 0 and 2 linear attention, block 1 full attention
    for p in span.parameters():  # fused expert tensors are allocated empty: draw every matrix
        if p.ndim >= 2:
            p.data.normal_(0, 0.1)
    # compute_chunk_tokens 6: the server runs a 5-token step of 2 rows as chunks of 3 and 2 positions.
    backend = SpanBackend(span, config, ServerConfig(max_length=64, compute_chunk_tokens=6), torch.float32)
    per_token = token_cache_bytes(config, torch.float32)[0:3]
    per_state = state_cache_bytes(config, torch.float32)[0:3]
    assert per_token[0] == per_token[2] == 0 < per_token[1] and per_state[0] == per_state[2] > 0 == per_state[1]
    batch, max_length = 2, 8
    x = torch.randn(batch, max_length, config.hidden_size, generator=torch.Generator().manual_seed(1))

    async def run() -> tuple[torch.Tensor, torch.Tensor]:
        session = backend.open_session("s", 0, 3, max_length=max_length, batch_size=batch)
        assert session.reserved_bytes == batch * (per_token[1] * max_length + 2 * (per_state[0] + per_state[2]))
        first = await backend.inference_step(session, 0, x[:, :5])
        second = await backend.inference_step(session, 5, x[:, 5:])
        layer = session.cache.span_layers[1]
        held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        held += sum(2 * state.nbytes() for state in session.cache.states.values())  # the state and its copy
        assert held <= session.reserved_bytes
        with pytest.raises(ProtocolError, match="replay the session's inputs from position 0"):
            await backend.inference_step(session, 3, x[:, 3:4])
        again = await backend.inference_step(session, 5, x[:, 5:])  # the last step resent: exact
        torch.testing.assert_close(again, second, atol=1e-6, rtol=0)
        restart = await backend.inference_step(session, 0, x[:, :5])  # position 0: a fresh state
        torch.testing.assert_close(restart, first, atol=1e-5, rtol=0)
        return torch.cat([first, second], dim=1), await backend.forward(0, 3, x)

    try:
        stepped, full = asyncio.run(run())
    finally:
        backend.shutdown()
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(stepped, span(x), atol=1e-5, rtol=0)  # one uncached forward, no chunks
    assert backend.cache_tokens_left() > 0

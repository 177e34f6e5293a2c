"""The servers' prefix cache: sessions sharing a prompt's first blocks copy them instead of computing them, with
outputs bit-identical to a server without it, within the cache budget, never across adapters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from corolla.engine.apps.tiny_models import TINY_FAMILIES, tiny_config
from corolla.engine.config import ServerConfig
from corolla.engine.errors import CacheFullError
from corolla.engine.models.lora import LoraAdapter, attach_adapters
from corolla.engine.models.span import BlockSpan
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.kv_cache import CacheBudget
from corolla.engine.server.prefix_cache import PrefixBlock, PrefixCache, block_key, first_key

pytestmark = pytest.mark.timeout(60)

BLOCK = 16  # prefix_block_tokens of the tests' servers
SYSTEM = 3 * BLOCK + 5  # a shared "system prompt" of 3 whole blocks and a bit


def make_span(family: str = "llama", blocks: int = 2, seed: int = 0) -> BlockSpan:
    overrides = {"max_position_embeddings": 131072} if family == "gpt_oss" else {}
    config = tiny_config(family, num_hidden_layers=blocks, **overrides)
    torch.manual_seed(seed)
    span = BlockSpan(config, 0, blocks).eval()
    with torch.no_grad():
        for p in span.parameters():
            p.normal_(0, 0.1)  # random weights large enough that every block changes the hidden states
    return span


def make_backend(span: BlockSpan, **cfg: int) -> SpanBackend:
    settings = dict(prefix_block_tokens=BLOCK, prefix_cache_tokens=8 * BLOCK, max_length=256) | cfg
    return SpanBackend(span, span.config, ServerConfig(**settings), torch.float32)  # type: ignore[arg-type]


@pytest.fixture
def backends() -> Iterator[tuple[SpanBackend, SpanBackend]]:
    """A server with the prefix cache and one without, over the same blocks."""
    span = make_span()
    with_cache, without = make_backend(span), make_backend(span, prefix_cache_tokens=0)
    yield with_cache, without
    with_cache.shutdown()
    without.shutdown()


def run_session(
    backend: SpanBackend, steps: list[torch.Tensor], adapter: str | None = None, name: str = "s", max_length: int = 256
) -> torch.Tensor:
    """Open a session, send ``steps`` one after the other, close it; the outputs of all its positions."""
    session = backend.open_session(name, 0, backend.end, max_length, steps[0].shape[0], "peer", adapter)

    async def run() -> list[torch.Tensor]:  # one event loop for the session, as its stream has on a server
        outputs, position = [], 0
        for x in steps:
            outputs.append(await backend.inference_step(session, position, x))
            position += x.shape[1]
        return outputs

    try:
        return torch.cat(asyncio.run(run()), dim=1)
    finally:
        backend.close_session(session)


def prompt(system: torch.Tensor, question_seed: int, length: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(question_seed)
    return torch.cat([system, torch.randn(1, length, system.shape[2], generator=gen)], dim=1)


def test_sessions_sharing_a_system_prompt_compute_only_their_new_blocks_with_identical_outputs(
    backends: tuple[SpanBackend, SpanBackend],
) -> None:
    cached, plain = backends
    system = torch.randn(1, SYSTEM, 64)
    first, second = prompt(system, 1), prompt(system, 2)
    decode = torch.randn(1, 1, 64)
    out1 = run_session(cached, [first, decode], name="a")
    assert cached.prefix_tokens_reused == 0 and cached.tokens_computed == first.shape[1] + 1
    computed = cached.tokens_computed
    out2 = run_session(cached, [second, decode], name="b")
    # The second prompt copies the system prompt's 3 whole blocks and computes only the rest (and its decode step).
    assert cached.prefix_tokens_reused == 3 * BLOCK
    assert cached.tokens_computed - computed == second.shape[1] - 3 * BLOCK + 1
    assert torch.equal(out1, run_session(plain, [first, decode], name="a"))
    assert torch.equal(out2, run_session(plain, [second, decode], name="b"))  # bit for bit, decode step included
    assert plain.prefix is None and plain.prefix_tokens_reused == 0


def test_a_prompt_sent_in_several_messages_is_shared_only_with_the_same_split(
    backends: tuple[SpanBackend, SpanBackend],
) -> None:
    cached, plain = backends
    x = torch.randn(1, 5 * BLOCK, 64)
    split = [x[:, : 2 * BLOCK + 3], x[:, 2 * BLOCK + 3 :]]  # a message ends inside block 2
    expected = run_session(plain, split)
    assert torch.equal(run_session(cached, split), expected)
    assert torch.equal(run_session(cached, split), expected)
    assert cached.prefix_tokens_reused == 5 * BLOCK - 3  # all but the 3 positions computed before the copy
    whole = run_session(cached, [x])  # block 2 ran as another job: only blocks 0 and 1 are the same computation
    assert cached.prefix_tokens_reused == 5 * BLOCK - 3 + 2 * BLOCK
    assert torch.equal(whole, run_session(plain, [x]))


def test_decode_steps_and_rewinds_end_a_sessions_sharing(backends: tuple[SpanBackend, SpanBackend]) -> None:
    cached, plain = backends
    x = torch.randn(1, 3 * BLOCK, 64)

    async def steps(backend: SpanBackend) -> list[torch.Tensor]:
        session = backend.open_session("r", 0, 2, 256, 1, "peer")
        try:
            return [
                await backend.inference_step(session, 0, x[:, : BLOCK + 4]),
                await backend.inference_step(session, BLOCK + 4, x[:, BLOCK + 4 : BLOCK + 5]),  # a decode step
                await backend.inference_step(session, BLOCK + 5, x[:, BLOCK + 5 :]),  # block 1 held a decode step
                await backend.inference_step(session, 2, x[:, 2:]),  # rewound: the chain no longer matches
            ]
        finally:
            backend.close_session(session)

    outs = asyncio.run(steps(cached))
    assert len(cached.prefix or ()) == 1  # only block 0, computed before the decode step
    for out, expected in zip(outs, asyncio.run(steps(plain)), strict=True):
        assert torch.equal(out, expected)
    assert torch.equal(run_session(cached, [x]), run_session(plain, [x]))
    assert cached.prefix_tokens_reused == BLOCK  # block 0 only: blocks 1 and 2 were never kept


def test_blocks_run_as_several_jobs_are_copied_bit_for_bit() -> None:
    span = make_span()
    cached = make_backend(span, compute_chunk_tokens=6)
    plain = make_backend(span, compute_chunk_tokens=6, prefix_cache_tokens=0)
    try:
        x = torch.randn(1, 3 * BLOCK + 4, 64)
        split = [x[:, : BLOCK + 9], x[:, BLOCK + 9 :]]  # jobs of 6 from each block's start, and one ending at 25
        first = run_session(cached, split)
        assert cached.tokens_computed == x.shape[1] and len(cached.prefix or ()) == 3
        assert torch.equal(run_session(cached, split), first)
        assert cached.prefix_tokens_reused == 3 * BLOCK - 9
        assert torch.equal(run_session(plain, split), first)  # copied or computed: the same bits
    finally:
        cached.shutdown()
        plain.shutdown()


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_copied_prefixes_equal_recomputed_ones_in_float32_for_every_family(family: str) -> None:
    span = make_span(family)
    cached, plain = make_backend(span), make_backend(span, prefix_cache_tokens=0)
    try:
        if cached.prefix is None:  # only families whose blocks keep state besides keys/values may skip it
            kinds = set(span.config.layer_types) - {"full_attention", "sliding_attention", "chunked_attention"}
            assert kinds, f"{family} keeps no prefix cache though its blocks are attention only"
            return
        hidden = int(span.config.hidden_size)
        system = torch.randn(1, 2 * BLOCK, hidden)
        first, second = prompt(system, 1, 7), prompt(system, 2, 9)
        decode = torch.randn(1, 1, hidden)
        out1, out2 = run_session(cached, [first, decode], name="a"), run_session(cached, [second, decode], name="b")
        assert cached.prefix_tokens_reused == 2 * BLOCK
        assert torch.equal(out1, run_session(plain, [first, decode], name="a"))
        assert torch.equal(out2, run_session(plain, [second, decode], name="b"))
    finally:
        cached.shutdown()
        plain.shutdown()


def test_no_reuse_across_adapters_or_batch_sizes() -> None:
    span = make_span()
    gen = torch.Generator().manual_seed(5)
    adapters = [
        LoraAdapter(name, 2.0, {(0, "self_attn.q_proj"): (torch.randn(4, 64, generator=gen), torch.randn(64, 4))})
        for name in ("alpha", "beta")
    ]
    attach_adapters(span, adapters)
    cached, plain = make_backend(span), make_backend(span, prefix_cache_tokens=0)
    try:
        x = torch.randn(1, 2 * BLOCK, 64)
        outs = {name: run_session(cached, [x], adapter=name) for name in (None, "alpha", "beta")}
        assert cached.prefix_tokens_reused == 0 and len(cached.prefix or ()) == 6  # 2 blocks for each adapter
        for name, out in outs.items():
            assert torch.equal(out, run_session(plain, [x], adapter=name))
        assert not torch.equal(outs["alpha"], outs["beta"])
        run_session(cached, [x.expand(2, -1, -1).contiguous()])  # a batch of two: another computation
        assert cached.prefix_tokens_reused == 0
        run_session(cached, [x], adapter="beta")
        assert cached.prefix_tokens_reused == 2 * BLOCK
    finally:
        cached.shutdown()
        plain.shutdown()


def test_prefix_blocks_stay_within_their_tokens_and_give_way_to_sessions() -> None:
    span = make_span()
    kv_token = 2 * 2 * (2 * 16 * 4)  # keys and values of 2 blocks (2 kv heads of 16), float32
    per_token = kv_token + 64 * 4  # and the span's outputs
    budget = 192 * per_token
    cached = make_backend(span, prefix_cache_tokens=4 * BLOCK, cache_bytes=budget, max_length=512)
    try:
        assert cached.prefix is not None and cached.prefix.capacity == 4 * BLOCK * per_token
        first, second = torch.randn(1, 3 * BLOCK, 64), torch.randn(1, 3 * BLOCK, 64)
        run_session(cached, [first], name="a", max_length=64)
        run_session(cached, [second], name="b", max_length=64)
        assert len(cached.prefix) == 4 and cached.prefix.evictions == 2  # least recently used first: first's
        assert cached.prefix.used == 4 * BLOCK * per_token == cached.budget.used
        run_session(cached, [second], name="c", max_length=64)
        assert cached.prefix_tokens_reused == 3 * BLOCK  # second's blocks stayed
        run_session(cached, [first], name="d", max_length=64)
        assert cached.prefix_tokens_reused == 3 * BLOCK  # first's were evicted: computed again
        # Prefix blocks count as free room in what the server announces, and give way to a session needing it.
        assert cached.cache_tokens_left() == budget // kv_token
        big = cached.open_session("big", 0, 2, budget // kv_token, 1, "peer")
        assert len(cached.prefix) == 0 and cached.budget.used == big.reserved_bytes == budget
        cached.close_session(big)
    finally:
        cached.shutdown()


def test_prefix_cache_unit_eviction_pins_and_budget() -> None:
    budget = CacheBudget(1000)
    cache = PrefixCache(budget, capacity=600)

    def block(n: int) -> PrefixBlock:
        return PrefixBlock((torch.zeros(n // 4 - 1),), (), torch.zeros(1))  # n bytes of float32

    assert cache.put(b"a", block(200)) and cache.put(b"b", block(200)) and cache.put(b"c", block(200))
    assert budget.used == 600 and cache.used == 600
    pinned = cache.take(b"a")  # now the most recently used, and pinned
    assert pinned is not None
    assert cache.put(b"d", block(200)) and cache.take(b"b") is None  # "b" was least recently used
    cache.make_room(1000)  # everything unpinned goes; "a" stays while pinned
    assert len(cache) == 1 and budget.used == 200
    assert not cache.put(b"e", block(800))  # larger than the prefix cache may hold
    cache.give_back(pinned)
    cache.make_room(1000)
    assert len(cache) == 0 and budget.used == 0
    budget.reserve(900, "a session")
    assert not cache.put(b"f", block(200))  # never takes room sessions hold
    with pytest.raises(CacheFullError):
        budget.reserve(200, "another session")


def test_block_names_cover_inputs_splits_and_what_computes_them() -> None:
    x = torch.randn(1, BLOCK, 8)
    root = first_key(0, 2, None, torch.float32, 1, BLOCK)
    name = block_key(root, [x], [])
    assert name == block_key(root, [x.clone()], [])
    assert name != block_key(root, [x[:, :3], x[:, 3:]], [3])  # two jobs: another computation
    assert name != block_key(root, [x.to(torch.bfloat16)], [])
    y = x.clone()
    y[0, -1, -1] = torch.nextafter(y[0, -1, -1], torch.tensor(10.0))  # one bit of one value
    assert name != block_key(root, [y], [])
    others = [
        first_key(0, 3, None, torch.float32, 1, BLOCK),
        first_key(0, 2, "lora", torch.float32, 1, BLOCK),
        first_key(0, 2, None, torch.bfloat16, 1, BLOCK),
        first_key(0, 2, None, torch.float32, 2, BLOCK),
        first_key(0, 2, None, torch.float32, 1, 2 * BLOCK),
    ]
    assert len({root, *others}) == 6

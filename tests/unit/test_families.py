"""Every family's distributed blocks reproduce the local transformers model's logits (tiny random configs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from corolla.engine.apps.tiny_models import FAMILY_TEST_OVERRIDES, TINY_FAMILIES, tiny_config
from corolla.engine.errors import CorollaError
from corolla.engine.models.cache_size import state_cache_bytes, token_cache_bytes
from corolla.engine.models.checkpoint import Checkpoint, ClientHead, load_client_head, load_span
from corolla.engine.models.family import ExpertNames, fuse_experts
from corolla.engine.models.registry import FAMILIES, get_family, sliding_window_of
from corolla.engine.models.span import BlockSpan, SpanCache, build_attention_mask
from corolla.engine.server.kv_cache import cache_bytes_per_token

ATOL = 1e-4
FAMILY_OVERRIDES = FAMILY_TEST_OVERRIDES
# Variants: blocks 3:6 use a window and 0:3 do not (the window layers sit on the second "peer"); a head_dim
# that is not hidden_size / heads.
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "qwen2-mixed-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3}),
    "qwen3-mixed-window": ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3}),
    "qwen3-head-dim-32": ("qwen3", {"head_dim": 32}),
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False}),
    "falcon-new-architecture": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt_neox-sequential-residual": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.5}),
    "bloom-post-layernorm-residual": ("bloom", {"apply_residual_connection_post_layernorm": True, "n_head": 8}),
}
CASES = {**{name: (name, overrides) for name, overrides in FAMILY_OVERRIDES.items()}, **VARIANTS}
SPLIT = 3  # blocks 0:3 on one "peer", 3:6 on the other (TINY_DEFAULTS has 6 blocks)
PROMPT_LEN = 8
DECODE_STEPS = 10


def refused_here(family: str) -> bool:
    """Whether this transformers release is one Corolla refuses ``family`` on: Qwen3-Next before 5.21 (the floor,
    5.0), whose linear-attention layers restart their state at every multi-token step."""
    from transformers.cache_utils import Cache

    return family == "qwen3_next" and not hasattr(Cache, "get_conv_state")


def assert_refused(family: str) -> None:
    """What :func:`refused_here` releases do instead: say what to install."""
    with pytest.raises(CorollaError, match=r"needs transformers 5.21 or newer.*pip install -U"):
        BlockSpan(tiny_config(family), 0, 2, empty=True)


def hf_model(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def load_distributed(path: Path) -> tuple[ClientHead, list[BlockSpan]]:
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    head = load_client_head(ckpt, config, torch.float32)
    n = config.num_hidden_layers
    spans = [
        load_span(ckpt, config, 0, SPLIT, torch.float32, "cpu"),
        load_span(ckpt, config, SPLIT, n, torch.float32, "cpu"),
    ]
    return head, spans


def run_spans(spans: list[BlockSpan], hidden: torch.Tensor, caches: list[SpanCache] | None = None) -> torch.Tensor:
    for i, span in enumerate(spans):
        hidden = span(hidden, caches[i] if caches is not None else None)
    return hidden


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_prefill_and_cached_decode_match_transformers(case: str, tiny_checkpoint: Callable[..., Path]) -> None:
    family, overrides = CASES[case]
    if refused_here(family):
        return assert_refused(family)
    path = tiny_checkpoint(family, **overrides)
    model = hf_model(path)
    head, spans = load_distributed(path)
    config = spans[0].config
    assert config.model_type == family
    if family == "mistral":
        # The window (5) is shorter than the prompt and the decoded sequence: it must be in effect.
        assert all(w == 5 for span in spans for w in span.windows)
        assert model.config.sliding_window == 5
    if case.endswith("mixed-window"):
        assert spans[0].windows == [None] * SPLIT and spans[1].windows == [4] * SPLIT

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(7, config.vocab_size, (2, PROMPT_LEN), generator=gen)  # [batch=2, length]
    max_length = PROMPT_LEN + DECODE_STEPS
    caches = [SpanCache(span.start, span.end - span.start, max_length) for span in spans]

    logits = head.logits(run_spans(spans, head.embed(ids), caches))  # [2, PROMPT_LEN, vocab]
    expected = model(ids).logits.float()
    assert max_diff(logits, expected) <= ATOL
    assert all(c.length == PROMPT_LEN for c in caches)

    for step in range(DECODE_STEPS):
        token = logits[:, -1].argmax(-1, keepdim=True)  # [2, 1]
        ids = torch.cat([ids, token], dim=1)
        logits = head.logits(run_spans(spans, head.embed(token), caches))  # [2, 1, vocab]
        expected = model(ids).logits[:, -1:].float()
        assert max_diff(logits, expected) <= ATOL, f"{case}: decode step {step} diverges from transformers"
        assert all(c.length == ids.shape[1] for c in caches)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@torch.inference_mode()
def test_sub_span_runs_only_the_requested_blocks(family: str, tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint(family, **FAMILY_OVERRIDES[family])
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    whole = load_span(ckpt, config, 0, config.num_hidden_layers, torch.float32, "cpu")
    middle = load_span(ckpt, config, 2, 4, torch.float32, "cpu")
    model = hf_model(path)

    ids = torch.randint(7, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    hf_hidden = model(ids, output_hidden_states=True).hidden_states  # [0]: embeddings; [i]: output of block i-1
    x = hf_hidden[2]  # input of block 2
    sub = whole(x, start=2, end=4)
    assert max_diff(sub, middle(x)) <= ATOL
    assert max_diff(sub, hf_hidden[4]) <= ATOL
    # A sub-span is not the whole span: running all blocks from block 2's input gives something else.
    assert max_diff(whole(x, start=2, end=whole.end), sub) > 1e-3

    # With a cache over exactly the sub-span, prefill then one step equals the uncached run.
    cache = SpanCache(2, 2, 16)
    first = whole(x[:, :-1], cache, start=2, end=4)
    last = whole(x[:, -1:], cache, start=2, end=4)
    assert max_diff(torch.cat([first, last], dim=1), sub) <= ATOL


@torch.inference_mode()
def test_cache_rewind_recomputes_the_same_outputs(tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint("llama")
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    span = load_span(ckpt, config, 0, 2, torch.float32, "cpu")
    x = torch.randn(1, 6, config.hidden_size, generator=torch.Generator().manual_seed(3))
    cache = SpanCache(0, 2, 8)
    full = span(x, cache)
    cache.truncate(4)
    again = span(x[:, 4:], cache)
    assert max_diff(again, full[:, 4:]) <= ATOL
    with pytest.raises(ValueError):
        span(x[:, :3], cache)  # 6 + 3 tokens exceed max_length 8
    with pytest.raises(ValueError):
        cache.truncate(7)


def test_unsupported_model_type_names_the_supported_families() -> None:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(CorollaError) as info:
        get_family(config)
    message = str(info.value)
    assert "gpt2" in message
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in message
    with pytest.raises(CorollaError):
        BlockSpan(config, 0, 1)


@torch.inference_mode()
def test_qwen3_next_chunked_prefill_and_multi_token_steps_match_transformers(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    """Recurrent-state blocks continue their state across prompt chunks and multi-token steps exactly."""
    if refused_here("qwen3_next"):
        return assert_refused("qwen3_next")
    path = tiny_checkpoint("qwen3_next", **FAMILY_OVERRIDES["qwen3_next"])
    model = hf_model(path)
    head, spans = load_distributed(path)
    ids = torch.randint(7, 160, (2, 13), generator=torch.Generator().manual_seed(6))
    expected = model(ids).logits.float()  # [2, 13, vocab]
    caches = [SpanCache(span.start, span.end - span.start, 16) for span in spans]
    got = [head.logits(run_spans(spans, head.embed(ids[:, a:b]), caches)) for a, b in [(0, 3), (3, 8), (8, 9), (9, 13)]]
    assert max_diff(torch.cat(got, dim=1), expected) <= ATOL
    assert all(
        sorted(c.states) == [b for b in (0, 2, 4) if span.start <= b < span.end]
        for c, span in zip(caches, spans, strict=True)
    )
    # Control: restarting the state at a chunk (what releases before the linear-attention Cache API did) differs.
    fresh = [SpanCache(span.start, span.end - span.start, 16) for span in spans]
    restarted = head.logits(run_spans(spans, head.embed(ids[:, 3:8]), fresh))
    assert max_diff(restarted, expected[:, 3:8]) > 1e-3


@torch.inference_mode()
def test_recurrent_state_rewinds_only_where_it_is_exact(tiny_checkpoint: Callable[..., Path]) -> None:
    """A recurrent state goes back to the start of the last step (a resent or failed step) or to 0, nowhere else."""
    if refused_here("qwen3_next"):
        return assert_refused("qwen3_next")
    path = tiny_checkpoint("qwen3_next", **FAMILY_OVERRIDES["qwen3_next"])
    ckpt = Checkpoint(str(path))
    span = load_span(ckpt, ckpt.config(), 0, 3, torch.float32, "cpu")
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(7))
    cache = SpanCache(0, 3, 8)
    span(x[:, :4], cache)
    step = span(x[:, 4:5], cache)
    assert cache.recurrent and cache.can_rewind(4) and not cache.can_rewind(2)
    cache.truncate(4)  # the last step again (e.g. a forwarded step the client redoes)
    assert max_diff(span(x[:, 4:5], cache), step) <= 1e-6
    with pytest.raises(ValueError, match="replay the inputs from position 0"):
        cache.truncate(2)
    # A step that fails half-way leaves the state as it was.
    cache.begin_step(1)
    span.layers[0](
        x[:, 5:6], **span.family.layer_inputs(span.config, span.rotary_emb, x[:, 5:6], 5, range(0, 1))[0], cache=cache
    )
    cache.abort_step()
    cache.begin_step(1)  # a step that raises half-way (never ended nor aborted): the next step starts clean
    span.layers[0](
        x[:, 5:6], **span.family.layer_inputs(span.config, span.rotary_emb, x[:, 5:6], 5, range(0, 1))[0], cache=cache
    )
    alone = SpanCache(0, 3, 8)
    span(x[:, :5], alone)
    assert max_diff(span(x[:, 5:7], cache), span(x[:, 5:7], alone)) <= 1e-6
    cache.truncate(0)
    assert not any(state.held for state in cache.states.values())
    assert max_diff(span(x[:, :3], cache), span(x[:, :3])) <= ATOL


def test_qwen3_next_on_a_release_without_the_linear_attention_cache_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Releases before ``Cache.get_conv_state`` restart the state at every multi-token step: refused by name."""
    from transformers.cache_utils import Cache

    config = tiny_config("qwen3_next")
    monkeypatch.delattr(Cache, "get_conv_state", raising=False)  # absent on the floor already
    with pytest.raises(CorollaError, match=r"qwen3_next needs transformers 5.21 or newer.*pip install -U"):
        BlockSpan(config, 0, 2, empty=True)
    BlockSpan(tiny_config("llama"), 0, 2, empty=True)  # families without recurrent blocks are unaffected


def test_registry_lists_exactly_the_tested_families() -> None:
    assert set(FAMILIES) == set(FAMILY_OVERRIDES) == set(TINY_FAMILIES)
    for name, family in FAMILIES.items():
        assert family.model_type == name
        assert family.layer_class().__name__.endswith(("DecoderLayer", "Layer", "Block"))
        config = tiny_config(name)
        norm = family.final_norm(config)
        assert isinstance(norm, torch.nn.LayerNorm) == family.layer_norm
        assert type(norm).__name__.endswith("Norm")


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_cache_accounting_matches_the_cached_keys(case: str) -> None:
    """The server reserves cache by the measured bytes per token: exactly what a SpanCache holds after N tokens."""
    family, overrides = CASES[case]
    if refused_here(family):
        return assert_refused(family)
    config = tiny_config(family, **overrides)
    batch, prompt, steps = 2, 3, 2
    tokens = prompt + steps
    span = BlockSpan(config, 1, 3)
    cache = SpanCache(1, 2, max_length=tokens)  # storage for exactly ``tokens`` tokens
    span(torch.randn(batch, prompt, config.hidden_size), cache)
    for _ in range(steps):
        span(torch.randn(batch, 1, config.hidden_size), cache)
    per_block = token_cache_bytes(config, torch.float32)
    per_state = state_cache_bytes(config, torch.float32)  # a linear-attention block's state, per sequence
    assert len(per_block) == len(per_state) == config.num_hidden_layers
    for block, layer in zip(range(1, 3), cache.span_layers, strict=True):
        held = [t for t in (layer.keys, layer.values) if t is not None]
        if block in cache.states:  # a recurrent state instead of keys/values: its size does not grow with tokens
            assert not held and per_block[block] == 0
            assert cache.states[block].nbytes() == per_state[block] * batch > 0
            continue
        assert held and all(t.shape[0] == batch and t.shape[2] == tokens for t in held)
        assert sum(t.numel() * t.element_size() for t in held) == per_block[block] * batch * tokens
        assert per_state[block] == 0
    assert cache_bytes_per_token(per_block[1:3]) * batch * tokens == sum(
        t.numel() * t.element_size() for layer in cache.span_layers for t in (layer.keys, layer.values) if t is not None
    )


def test_span_bounds_are_checked() -> None:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
    for start, end in [(-1, 2), (2, 2), (3, 2), (0, 5)]:
        with pytest.raises(ValueError):
            BlockSpan(config, start, end, empty=True)


def test_sliding_window_of_follows_layer_types() -> None:
    config = LlamaConfig(num_hidden_layers=3)
    assert sliding_window_of(config, 0) is None
    config.sliding_window = 7
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    assert [sliding_window_of(config, i) for i in range(3)] == [None, 7, None]


def test_attention_mask_is_causal_with_window() -> None:
    mask = build_attention_mask(offset=3, new=2, window=2, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 2, 5)
    allowed = (mask[0, 0] == 0).tolist()
    # query at position 3 sees keys 2..3; query at 4 sees keys 3..4
    assert allowed == [[False, False, True, True, False], [False, False, False, True, True]]


@torch.inference_mode()
def test_tied_embeddings_load_and_match(tiny_checkpoint: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    path = tiny_checkpoint("llama", tie_word_embeddings=True)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the checkpoint really relies on tying
    model = hf_model(path)
    with caplog.at_level("WARNING"):
        head, spans = load_distributed(path)
    assert not [r for r in caplog.records if "lm_head" in r.getMessage()]
    assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()
    ids = torch.randint(7, 160, (2, 7), generator=torch.Generator().manual_seed(4))
    assert max_diff(head.logits(run_spans(spans, head.embed(ids))), model(ids).logits.float()) <= ATOL

    # Control: the same checkpoint under a config that claims untied weights is loaded with a warning.
    ckpt = Checkpoint(str(path))
    untied = ckpt.config()
    untied.tie_word_embeddings = False
    with caplog.at_level("WARNING"):
        head = load_client_head(ckpt, untied, torch.float32)
    assert [r for r in caplog.records if "lm_head" in r.getMessage()]
    assert torch.equal(head.lm_head.weight, head.embed_tokens.weight)


def test_span_cache_is_a_transformers_cache_and_ignores_new_arguments() -> None:
    """Future releases may pass new positional or keyword arguments to ``Cache.update``: none may break it."""
    from transformers.cache_utils import Cache

    cache = SpanCache(3, 2, 16)
    assert isinstance(cache, Cache)
    k = torch.randn(1, 2, 4, 8)
    cache.begin_step(4)
    keys, values = cache.update(k, k + 1, 3, {"cache_position": None}, kwargs={"x": 1}, some_new_flag=True)
    keys2, _ = cache.update(k * 2, k, 4)
    cache.end_step()
    assert torch.equal(keys, k) and torch.equal(values, k + 1) and torch.equal(keys2, k * 2)
    assert cache.get_seq_length() == 4
    with pytest.raises(IndexError):
        cache.update(k, k, 5)


@pytest.mark.parametrize("name", sorted(FAMILY_OVERRIDES))
def test_spans_run_without_deprecation_warnings(name: str, recwarn: pytest.WarningsRecorder) -> None:
    """The adapter passes the cache by the keyword the installed release accepts (``cache=`` or not)."""
    if refused_here(name):
        return assert_refused(name)
    import warnings

    warnings.simplefilter("always")
    config = tiny_config(name, **FAMILY_OVERRIDES[name])
    span = BlockSpan(config, 0, 2)
    cache = SpanCache(0, 2, 8)
    with torch.inference_mode():
        span(torch.randn(1, 3, config.hidden_size), cache)
        span(torch.randn(1, 1, config.hidden_size), cache)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [m for m in messages if "past_key_values" in m or "cache" in m], messages


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@torch.inference_mode()
def test_softcaps_are_in_effect(family: str, tiny_checkpoint: Callable[..., Path]) -> None:
    """Control for the Gemma cases: their caps change the logits, so matching transformers proves them."""
    path = tiny_checkpoint(family, **FAMILY_OVERRIDES[family])
    capped = hf_model(path)
    config = AutoConfig.from_pretrained(path)
    config.final_logit_softcapping = None
    config.attn_logit_softcapping = None
    uncapped = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    ids = torch.randint(7, 160, (2, 8), generator=torch.Generator().manual_seed(5))
    assert max_diff(capped(ids).logits, uncapped(ids).logits) > 1e-2
    head, spans = load_distributed(path)
    assert head.softcap == 0.3
    assert max_diff(head.logits(run_spans(spans, head.embed(ids))), capped(ids).logits) <= ATOL


@torch.inference_mode()
def test_checkpoint_without_base_prefix_loads(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """Bloom's published checkpoints name tensors ``h.0...`` and ``word_embeddings`` (no ``transformer.``)."""
    from safetensors.torch import load_file, save_file

    path = tiny_checkpoint("bloom")
    tensors = load_file(str(path / "model.safetensors"))
    assert all(name.startswith("transformer.") for name in tensors)
    save_file(
        {name.removeprefix("transformer."): t for name, t in tensors.items()}, str(tmp_path / "model.safetensors")
    )
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    head, spans = load_distributed(tmp_path)
    ids = torch.randint(7, 160, (2, 8), generator=torch.Generator().manual_seed(6))
    assert max_diff(head.logits(run_spans(spans, head.embed(ids))), hf_model(path)(ids).logits) <= ATOL


def test_moe_checkpoint_with_a_missing_expert_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tiny_checkpoint("mixtral")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.4.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ckpt = Checkpoint(str(tmp_path))
    load_span(ckpt, ckpt.config(), 0, 3, torch.float32, "cpu")  # blocks without the gap load
    with pytest.raises(CorollaError, match="block 4"):
        load_span(ckpt, ckpt.config(), 3, 6, torch.float32, "cpu")


def test_fused_expert_tensors_pass_through() -> None:
    layout = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
    fused = {"mlp.experts.gate_up_proj": torch.zeros(4, 8, 2), "mlp.gate.weight": torch.zeros(4, 2)}
    passed = fuse_experts(fused, layout, 4)
    assert passed.keys() == fused.keys() and all(passed[k] is fused[k] for k in fused)
    parts = ("gate_proj", "up_proj", "down_proj")
    per_expert = {f"mlp.experts.{e}.{p}.weight": torch.full((2, 3), float(e)) for e in range(2) for p in parts}
    out = fuse_experts(per_expert, layout, 2)
    assert out["mlp.experts.gate_up_proj"].shape == (2, 4, 3)  # [experts, gate rows + up rows, hidden]
    assert out["mlp.experts.down_proj"].shape == (2, 2, 3)
    assert torch.equal(out["mlp.experts.gate_up_proj"][1], torch.ones(4, 3))


@torch.inference_mode()
def test_stale_buffers_of_older_checkpoints_are_ignored(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """Older GPT-NeoX (Pythia) and Llama checkpoints carry mask and rotary buffers that today's modules compute."""
    from safetensors.torch import load_file, save_file

    path = tiny_checkpoint("gpt_neox")
    tensors = load_file(str(path / "model.safetensors"))
    for i in range(6):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    head, spans = load_distributed(tmp_path)
    ids = torch.randint(7, 160, (2, 8), generator=torch.Generator().manual_seed(7))
    assert max_diff(head.logits(run_spans(spans, head.embed(ids))), hf_model(path)(ids).logits) <= ATOL
    # Control: a tensor that is neither a weight nor a known stale buffer is still refused.
    tensors["gpt_neox.layers.4.attention.surprise"] = torch.ones(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(str(tmp_path))
    with pytest.raises(CorollaError, match="surprise"):
        load_span(ckpt, ckpt.config(), 3, 6, torch.float32, "cpu")

"""Selective loading: a server opens only the shards of its blocks, a client only embeddings/norm/head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import corolla.engine.models.checkpoint as checkpoint_module
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    load_client_head,
    load_span,
    parse_dtype,
)

# The tensors of a Llama-shaped checkpoint a client reads (names come from the family adapter).
CLIENT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]) -> Path:
    """The tiny llama re-saved in ~100 KB shards with an index (several shards, several tensors each)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32)
    path = tmp_path_factory.mktemp("sharded-llama")
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def index_of(path: Path) -> dict[str, str]:
    with open(path / INDEX_FILE) as f:
        return dict(json.load(f)["weight_map"])


class SafeOpenSpy:
    """Wraps ``safe_open`` as the checkpoint module uses it; records files opened and tensors read."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.tensors: list[str] = []
        self._real = checkpoint_module.safe_open

    def __call__(self, filename: str, *args: Any, **kwargs: Any) -> Any:
        self.files.append(Path(filename).name)
        spy = self

        class Handle:
            def __enter__(self) -> Handle:
                self._cm = spy._real(filename, *args, **kwargs)
                self._f = self._cm.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self._cm.__exit__(*exc)

            def keys(self) -> list[str]:
                return list(self._f.keys())

            def get_tensor(self, name: str) -> torch.Tensor:
                spy.tensors.append(name)
                return self._f.get_tensor(name)

        return Handle()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SafeOpenSpy:
    s = SafeOpenSpy()
    monkeypatch.setattr(checkpoint_module, "safe_open", s)
    return s


def test_sharded_fixture_really_has_several_shards(sharded: Path) -> None:
    shards = set(index_of(sharded).values())
    assert len(shards) >= 4
    assert all((sharded / s).exists() for s in shards)
    assert not (sharded / "model.safetensors").exists()


@pytest.mark.parametrize(("start", "end"), [(0, 1), (2, 4), (5, 6), (0, 6)])
def test_load_span_opens_only_the_shards_of_its_blocks(sharded: Path, spy: SafeOpenSpy, start: int, end: int) -> None:
    weight_map = index_of(sharded)
    prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
    wanted = {name for name in weight_map if name.startswith(prefixes)}
    expected_files = {weight_map[name] for name in wanted}

    ckpt = Checkpoint(str(sharded))
    span = load_span(ckpt, ckpt.config(), start, end, torch.float32, "cpu")

    assert set(spy.files) == expected_files
    assert len(spy.files) == len(expected_files)  # each shard opened once
    assert sorted(spy.tensors) == sorted(wanted)
    if (start, end) != (0, 6):
        assert expected_files < set(weight_map.values())
    assert len(span.layers) == end - start


def test_load_span_weights_equal_the_checkpoint(sharded: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    ckpt = Checkpoint(str(sharded))
    span = load_span(ckpt, ckpt.config(), 2, 4, torch.float32, "cpu")
    theirs = model.state_dict()
    ours = span.state_dict()
    layer_keys = [k for k in ours if k.startswith("layers.")]
    assert layer_keys
    for key in layer_keys:
        i, rest = key[len("layers.") :].split(".", 1)
        assert torch.equal(ours[key], theirs[f"model.layers.{int(i) + 2}.{rest}"]), key
    assert all(not p.is_meta for p in span.parameters())
    assert all(not b.is_meta for b in span.buffers())


def test_client_head_reads_only_embeddings_norm_and_head(sharded: Path, spy: SafeOpenSpy) -> None:
    weight_map = index_of(sharded)
    ckpt = Checkpoint(str(sharded))
    config = ckpt.config()
    head = load_client_head(ckpt, config, torch.float32)
    assert sorted(spy.tensors) == sorted(CLIENT_TENSORS)
    assert set(spy.files) == {weight_map[n] for n in CLIENT_TENSORS}
    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    assert torch.equal(head.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(head.norm.weight, model.model.norm.weight)
    assert torch.equal(head.lm_head.weight, model.lm_head.weight)


def test_dtype_is_applied(sharded: Path) -> None:
    ckpt = Checkpoint(str(sharded))
    config = ckpt.config()
    span = load_span(ckpt, config, 0, 1, torch.bfloat16, "cpu")
    assert {p.dtype for p in span.layers.parameters()} == {torch.bfloat16}
    head = load_client_head(ckpt, config, torch.float16)
    assert {p.dtype for p in head.parameters()} == {torch.float16}
    assert head.logits(head.embed(torch.tensor([[5, 6]]))).dtype == torch.float32


def test_single_file_checkpoint_weight_map(tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint("llama")
    ckpt = Checkpoint(str(path))
    assert ckpt.is_local
    assert ckpt.default_dht_prefix == path.name
    weight_map = ckpt.weight_map()
    assert set(weight_map.values()) == {"model.safetensors"}
    assert set(CLIENT_TENSORS) <= set(weight_map)
    assert sum(n.startswith("model.layers.0.") for n in weight_map) == 9  # 4 attention, 3 mlp, 2 norms


def test_checkpoint_without_weights_raises(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    (tmp_path / "config.json").write_text((tiny_checkpoint("llama") / "config.json").read_text())
    ckpt = Checkpoint(str(tmp_path))
    with pytest.raises(CorollaError, match="safetensors"):
        ckpt.weight_map()
    with pytest.raises(FileNotFoundError):
        ckpt.file("model.safetensors")


def test_span_beyond_the_checkpoint_raises(tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = Checkpoint(str(tiny_checkpoint("llama")))
    config = ckpt.config()
    config.num_hidden_layers = 8  # the checkpoint has 6 blocks
    with pytest.raises(CorollaError, match="does not match"):
        load_span(ckpt, config, 5, 8, torch.float32, "cpu")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("float32", "cpu", torch.float32),
        ("float16", "cpu", torch.float16),
        ("bfloat16", "cuda", torch.bfloat16),
        ("auto", "cpu", torch.float32),
        ("auto", "mps", torch.float16),
    ],
)
def test_parse_dtype(name: str, device: str, expected: torch.dtype) -> None:
    assert parse_dtype(name, device) == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_parse_dtype_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert parse_dtype("auto", "cuda:1") == expected


@pytest.mark.parametrize("name", ["fp32", "float64", "", "Float32", "int8"])
def test_parse_dtype_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="auto, float32, float16, bfloat16"):
        parse_dtype(name, "cpu")

"""Training calls at the server's level, every family: forward with deep prompts and backward through two
spans (0:3 and 3:6, as on two servers) equal transformers' own autograd; bad headers are refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from reference_grads import reference_block_grads
from transformers import AutoModelForCausalLM

from corolla.engine.apps.tiny_models import FAMILY_TEST_OVERRIDES
from corolla.engine.client.route_autograd import micro_batches
from corolla.engine.config import ServerConfig
from corolla.engine.errors import ProtocolError
from corolla.engine.models.checkpoint import Checkpoint, load_span
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.training import check_request, train_backward, train_forward
from corolla.engine.wire.training import Assembler, TrainRequest, answer_shapes, pieces, request_shapes

RTOL = 1e-4  # relative to the largest magnitude of the reference
SPLIT = 3
BATCH, LENGTH, PRE = 2, 7, 3


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def backends(path: Path, **cfg: int) -> list[SpanBackend]:
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    n = config.num_hidden_layers
    return [
        SpanBackend(load_span(ckpt, config, a, b, torch.float32, "cpu"), config, ServerConfig(**cfg), torch.float32)  # type: ignore[arg-type]
        for a, b in ((0, SPLIT), (SPLIT, n))
    ]


@pytest.fixture
def shutdown() -> Iterator[list[SpanBackend]]:
    made: list[SpanBackend] = []
    yield made
    for backend in made:
        backend.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", sorted(FAMILY_TEST_OVERRIDES))
def test_two_span_gradients_match_transformers(
    family: str, tiny_checkpoint: Callable[..., Path], shutdown: list[SpanBackend]
) -> None:
    path = tiny_checkpoint(family, **FAMILY_TEST_OVERRIDES[family])
    spans = backends(path)
    shutdown.extend(spans)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hidden_size = int(hf.config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LENGTH, hidden_size, generator=gen)
    prompts = torch.randn(hf.config.num_hidden_layers, BATCH, PRE, hidden_size, generator=gen) * 0.5
    grad_out = torch.randn(BATCH, LENGTH, hidden_size, generator=gen)
    for deep in (prompts, None):
        out_ref, grad_ref, prompts_ref = reference_block_grads(hf, hidden, grad_out, deep)
        # forward, keeping each span's inputs (what the client keeps)
        inputs, x = [], hidden
        for backend in spans:
            req = TrainRequest(
                kind="forward",
                start=backend.start,
                end=backend.end,
                batch=BATCH,
                length=LENGTH,
                pre=PRE if deep is not None else 0,
            )
            inputs.append(x)
            x = train_forward(backend, req, x, deep[backend.start : backend.end] if deep is not None else None)()
        assert rel_diff(x, out_ref) <= RTOL
        # backward, last span first
        g = grad_out
        grad_prompts = []
        for backend, x_in in reversed(list(zip(spans, inputs, strict=True))):
            req = TrainRequest(
                kind="backward",
                start=backend.start,
                end=backend.end,
                batch=BATCH,
                length=LENGTH,
                pre=PRE if deep is not None else 0,
            )
            part = deep[backend.start : backend.end] if deep is not None else None
            answer = train_backward(backend, req, x_in, g, part)()
            assert len(answer) == len(answer_shapes(req, hidden_size))
            g = answer[0]
            if deep is not None:
                grad_prompts.insert(0, answer[1])
        assert rel_diff(g, grad_ref) <= RTOL
        if deep is not None:
            assert prompts_ref is not None
            assert rel_diff(torch.cat(grad_prompts), prompts_ref) <= RTOL
            assert float(prompts_ref.abs().max()) > 0  # the prompts really matter


@pytest.mark.timeout(60)
def test_headers_are_checked_before_any_tensor(
    tiny_checkpoint: Callable[..., Path], shutdown: list[SpanBackend]
) -> None:
    spans = backends(tiny_checkpoint("llama"), max_batch_size=4, max_chunk_tokens=64)
    shutdown.extend(spans)
    first = spans[0]

    def header(**kw: int) -> TrainRequest:
        fields = {"kind": "backward", "start": 0, "end": 3, "batch": 2, "length": 8, "pre": 2, **kw}
        return TrainRequest(**fields)  # type: ignore[arg-type]

    check_request(first, header())
    for bad, match in [
        (header(end=4), "not hosted"),
        (header(batch=5), "batch"),
        (header(length=40), "tokens"),
        (header(pre=9), "deep prompt positions"),
        (header(version=99), "version"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            check_request(first, bad)
    with pytest.raises(ProtocolError, match="adapter"):
        check_request(first, TrainRequest(kind="forward", start=0, end=3, batch=1, length=4, adapter="nope"))
    with pytest.raises(ProtocolError, match="NaN"):
        req = header(pre=0)
        train_backward(first, req, torch.full((2, 8, 64), float("nan")), torch.zeros(2, 8, 64), None)


def test_pieces_reassemble_and_extra_values_are_refused() -> None:
    req = TrainRequest(kind="backward", start=0, end=3, batch=2, length=5, pre=2)
    shapes = request_shapes(req, 8)
    tensors = [torch.randn(s) for s in shapes]
    collected = Assembler(shapes)
    for piece in pieces(tensors, max_bytes=36):  # several pieces per tensor
        collected.add(piece)
    for a, b in zip(collected.tensors(), tensors, strict=True):
        assert torch.equal(a, b)
    short = Assembler(shapes)
    with pytest.raises(ProtocolError, match="announced"):
        short.tensors()
    over = Assembler([(2, 2)])
    with pytest.raises(ProtocolError, match="more than"):
        for piece in pieces([torch.zeros(5)], max_bytes=1024):
            over.add(piece)


def test_micro_batches_cover_the_batch_in_order() -> None:
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(3, 8) == [slice(0, 3)]
    rows = torch.arange(7)
    assert torch.equal(torch.cat([rows[s] for s in micro_batches(7, 3)]), rows)
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(4, 0)
    with pytest.raises(ValueError, match="no sequences"):
        micro_batches(0, 4)

"""Quantized blocks: int8 / nf4 linears, quantized spans against float32, records and exact-only routing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from corolla.engine.config import ClientConfig, ServerConfig, from_env
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import MissingBlocksError
from corolla.engine.models.checkpoint import Checkpoint, load_client_head, load_span
from corolla.engine.models.quant import (
    NF4_LEVELS,
    Int8Linear,
    NF4Linear,
    check_quant,
    quantize_linears,
    tensor_bytes,
)
from corolla.engine.routing.exact import exact_spans
from corolla.engine.routing.planner import plan_inference_route
from corolla.engine.routing.spans import RemoteSpan
from corolla.engine.server.memory import block_weight_bytes

pytestmark = pytest.mark.timeout(120)

# Stated tolerances: relative error of one layer's output (weights ~ N(0, 0.02)), and of a tiny model's
# logits through all six blocks (max |quantized - float32| / max |float32|).
LAYER_TOLERANCE = {"int8": 0.01, "nf4": 0.12}
LOGIT_TOLERANCE = {"int8": 0.03, "nf4": 0.35}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def normal_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    return linear


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(256, 128, True), (30, 7, False), (64, 1, True)])
@torch.inference_mode()
def test_quantized_linear_stays_close_to_float32(mode: str, in_features: int, out_features: int, bias: bool) -> None:
    linear = normal_linear(in_features, out_features, bias)
    quantized = (Int8Linear if mode == "int8" else NF4Linear)(linear)
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(1))  # [batch, length, in]
    out = quantized(x)
    assert out.shape == (2, 5, out_features) and out.dtype == torch.float32
    assert 0 < relative_error(out, linear(x)) <= LAYER_TOLERANCE[mode]
    out_bf16 = quantized(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert relative_error(out_bf16, linear(x)) <= LAYER_TOLERANCE[mode] + 0.01


@torch.inference_mode()
def test_nf4_stores_the_nearest_level_of_each_weight() -> None:
    linear = normal_linear(64, 2, bias=False)
    weight = linear.weight.detach()
    dequantized = NF4Linear(linear).dequantize(torch.float32)
    absmax = weight.reshape(-1, 64).abs().amax(dim=1)  # [2] one group per row here
    levels = torch.tensor(NF4_LEVELS)
    expected = levels[(weight / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1)] * absmax[:, None]
    torch.testing.assert_close(dequantized, expected)
    assert torch.equal(dequantized.abs().amax(dim=1), absmax)  # the largest weight of a group is exact


def test_quantize_linears_replaces_every_linear_and_only_them() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 4), nn.ReLU()))
    assert quantize_linears(model, "nf4") == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model[1], nn.LayerNorm)
    assert quantize_linears(model, "none") == 0
    with pytest.raises(ValueError, match="int8, nf4"):
        check_quant("int4")


@pytest.fixture(scope="module")
def fp32_logits_and_inputs(tiny_checkpoint: Callable[..., Path]) -> tuple[Checkpoint, torch.Tensor, torch.Tensor]:
    ckpt = Checkpoint(str(tiny_checkpoint("llama")))
    config = ckpt.config()
    head = load_client_head(ckpt, config, torch.float32)
    ids = torch.randint(7, 160, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = head.embed(ids)
        logits = head.logits(load_span(ckpt, config, 0, 6, torch.float32, "cpu")(hidden))
    return ckpt, hidden, logits


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_quantized_span_logits_within_tolerance_and_memory_as_predicted(
    fp32_logits_and_inputs: tuple[Checkpoint, torch.Tensor, torch.Tensor], mode: str, dtype: torch.dtype
) -> None:
    ckpt, hidden, reference = fp32_logits_and_inputs
    config = ckpt.config()
    span = load_span(ckpt, config, 0, 6, dtype, "cpu", mode)
    head = load_client_head(ckpt, config, torch.float32)
    logits = head.logits(span(hidden.to(dtype)).float())
    error = float((logits - reference).abs().max() / reference.abs().max())
    if mode == "none" and dtype == torch.float32:
        assert error == 0.0
    else:
        assert 0 < error <= LOGIT_TOLERANCE.get(mode, 0.02), error  # bfloat16 alone: within 2%
    # What the memory plan predicts is exactly what the loaded blocks hold.
    assert tensor_bytes(span.layers) == sum(block_weight_bytes(config, dtype, mode))
    if mode != "none":
        full = sum(block_weight_bytes(config, dtype, "none"))
        assert tensor_bytes(span.layers) < full * (0.3 if mode == "int8" else 0.2) * (4 / dtype.itemsize)


# ---- records and routing ------------------------------------------------------------------------


def test_record_names_its_quantization_and_older_records_count_as_exact() -> None:
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=3, dtype="bfloat16", quant="nf4")
    decoded = ServerRecord.from_dht(record.to_dict())
    assert decoded is not None and decoded.quant == "nf4" and decoded.dtype == "bfloat16"
    old = record.to_dict()
    del old["quant"]
    decoded_old = ServerRecord.from_dht(old)
    assert decoded_old is not None and decoded_old.quant == "none"
    assert ServerRecord.from_dht({**record.to_dict(), "quant": "x" * 17}) is None  # bounded


def span_of(peer: str, start: int, end: int, quant: str, speed: float) -> RemoteSpan:
    record = ServerRecord(state=ServerState.ONLINE, start=start, end=end, inference_rps=speed, quant=quant)
    return RemoteSpan(peer, start, end, record)


def test_exact_only_routing_avoids_quantized_servers() -> None:
    spans = {
        "fast-nf4": span_of("fast-nf4", 0, 6, "nf4", 1000.0),
        "slow-exact": span_of("slow-exact", 0, 6, "none", 1.0),
        "int8-tail": span_of("int8-tail", 3, 6, "int8", 1000.0),
    }
    assert {hop.peer_id for hop in plan_inference_route(spans, 0, 6)} == {"fast-nf4"}  # any: the fastest
    exact = exact_spans(spans)
    assert set(exact) == {"slow-exact"}
    assert {hop.peer_id for hop in plan_inference_route(exact, 0, 6)} == {"slow-exact"}
    with pytest.raises(MissingBlocksError):  # blocks only quantized servers host are missing to such a client
        plan_inference_route(exact_spans({"q": spans["int8-tail"]}), 3, 6)


def test_config_fields_and_their_env() -> None:
    assert ClientConfig().require_exact is False
    assert from_env(ClientConfig, require_exact=True).require_exact is True
    cfg = from_env(ServerConfig, quant="int8", max_memory="6GB")
    assert cfg.quant == "int8" and cfg.max_memory == 6 * 10**9
    assert ServerConfig().quant == "none" and ServerConfig().max_memory is None

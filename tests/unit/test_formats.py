"""Published weight formats: DeepSeek's block FP8 and gpt-oss's MXFP4, against plain-torch references."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import Checkpoint, load_span
from corolla.engine.models.formats import (
    PLAIN,
    WeightFormat,
    dequantize_block,
    dequantize_fp8,
    dequantize_mxfp4,
    weight_format,
)
from corolla.engine.models.quant import QuantizedExperts, tensor_bytes
from corolla.engine.server.memory import block_weight_bytes

pytestmark = pytest.mark.timeout(120)

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
FP8_MAX = 448.0  # largest float8_e4m3fn


# ---- independent references ---------------------------------------------------------------------
def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → float8_e4m3fn weight and float32 scale_inv per block, as DeepSeek publishes."""
    rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            s = w[rs, cs].abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[rs, cs] = (w[rs, cs] / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block: fp8 values times their block's scale, in float32."""
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = q[rs, cs].float() * scale[i, j]
    return out


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, out, G, 16] bytes, [E, out, G] exponents → [E, G * 32, out], one value at a time."""
    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, rows)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                factor = 2.0 ** (int(scales[e, r, g]) - 127)
                for k in range(16):
                    byte = int(blocks[e, r, g, k])
                    out[e, g * 32 + 2 * k, r] = FP4[byte & 0x0F] * factor
                    out[e, g * 32 + 2 * k + 1, r] = FP4[byte >> 4] * factor
    return out


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] float → MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32] (nearest FP4 value)."""
    t = w.transpose(1, 2)  # [E, out, in]
    groups = t.unflatten(-1, (-1, 32))  # [E, out, G, 32]
    amax = groups.abs().amax(-1).clamp(min=1e-12)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # largest code 6 covers amax
    lut = torch.tensor(FP4)
    codes = ((groups / torch.exp2(exp).unsqueeze(-1)).unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


# ---- pure functions -----------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_fp8_dequant_matches_the_block_reference(block: tuple[int, int]) -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))  # partial blocks on both axes
    q, scale = fp8_quantize(w, block)
    got = dequantize_fp8(q, scale, block, torch.float32)
    assert torch.equal(got, fp8_reference(q, scale, block))
    assert (got - w).abs().max() <= w.abs().max() / 8  # e4m3 keeps 3 mantissa bits
    assert dequantize_fp8(q, scale, block, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_dequant_matches_transformers() -> None:
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    theirs = getattr(fp8, "_dequantize_fp8_weight", None)
    if theirs is None:
        pytest.skip("this transformers has no FP8 dequantize function")
    q, scale = fp8_quantize(torch.randn(300, 260, generator=torch.Generator().manual_seed(1)), (128, 128))
    assert torch.equal(dequantize_fp8(q, scale, (128, 128), torch.float32), theirs(q, scale, [128, 128], torch.float32))


def test_fp8_dequant_rejects_wrong_scales() -> None:
    q = torch.zeros(200, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs scales"):
        dequantize_fp8(q, torch.ones(1, 3), (128, 128), torch.float32)


def test_mxfp4_dequant_matches_the_value_by_value_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 135, (2, 3, 2), generator=gen, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (2, 64, 3)
    assert torch.equal(got, mxfp4_reference(blocks, scales))
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), got)  # FP4 * 2**k fits bf16


def test_mxfp4_dequant_matches_transformers() -> None:
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 8, 4), generator=gen, dtype=torch.uint8)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), theirs)


def test_weight_format_reads_the_quantization_config() -> None:
    assert weight_format(None) == PLAIN
    assert weight_format({"quant_method": "fp8", "weight_block_size": [128, 128]}) == WeightFormat("fp8", (128, 128))
    assert weight_format({"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}) == WeightFormat("mxfp4")
    with pytest.raises(CorollaError, match="fp8, mxfp4"):
        weight_format({"quant_method": "awq"})


def test_dequantize_block_refuses_unpaired_tensors() -> None:
    with pytest.raises(ValueError, match="without a"):
        dequantize_block(
            {"a.weight": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, WeightFormat("fp8", (1, 1)), torch.float32
        )
    with pytest.raises(ValueError, match="has no"):
        dequantize_block(
            {"p_blocks": torch.zeros(1, 1, 1, 16, dtype=torch.uint8)}, WeightFormat("mxfp4"), torch.float32
        )
    norm = {"norm.weight": torch.ones(4)}
    assert dequantize_block(norm, WeightFormat("fp8", (128, 128)), torch.float32) == norm


# ---- whole checkpoints --------------------------------------------------------------------------
def rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    """A copy of checkpoint ``src`` with other tensors and (optionally) a quantization_config."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def span_outputs(path: Path, start: int, end: int, quant: str = "none") -> torch.Tensor:
    ckpt = Checkpoint(str(path))
    config = ckpt.config()
    assert not hasattr(config, "quantization_config")  # the engine builds plain layers
    span = load_span(ckpt, config, start, end, torch.float32, "cpu", quant=quant)
    if quant != "none":  # the dequantized published experts were quantized again, as --quant says
        assert sum(isinstance(m, QuantizedExperts) for m in span.modules()) == 2 * (end - start)
        planned = block_weight_bytes(config, torch.float32, quant)[start:end]
        assert tensor_bytes(span.layers) == sum(planned)
        assert sum(planned) < 0.3 * sum(block_weight_bytes(config, torch.float32, "none")[start:end])
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        return span(x)


def test_deepseek_fp8_checkpoint_loads_like_its_plain_dequantized_copy(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    src = tiny_checkpoint("deepseek_v3")
    block = (16, 32)  # small blocks, so the tiny projections have several, some partial
    published, plain = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if ".layers." in name and name.endswith(("_proj.weight", "_mqa.weight")):  # DeepSeek's FP8 linears
            q, scale = fp8_quantize(t.float(), block)
            published[name], published[name + "_scale_inv"] = q, scale
            plain[name] = fp8_reference(q, scale, block)
        else:
            published[name] = plain[name] = t  # norms, router, embeddings and head stay as they are
    assert sum(n.endswith("_scale_inv") for n in published) > 20
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    fp8_dir = rewrite(src, tmp_path / "fp8", published, qc)
    plain_dir = rewrite(src, tmp_path / "plain", plain, None)
    assert Checkpoint(str(fp8_dir)).weight_format() == WeightFormat("fp8", block)
    got, expected = span_outputs(fp8_dir, 0, 3), span_outputs(plain_dir, 0, 3)  # block 0 dense, 1-2 experts
    assert (got - expected).abs().max() <= 1e-6
    assert (span_outputs(fp8_dir, 1, 3, "int8") - span_outputs(plain_dir, 1, 3, "int8")).abs().max() <= 1e-6


def test_gpt_oss_mxfp4_checkpoint_loads_like_its_plain_dequantized_copy(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    src = tiny_checkpoint("gpt_oss")
    published, plain = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quantize(t.float())
            published[name + "_blocks"], published[name + "_scales"] = blocks, scales
            plain[name] = mxfp4_reference(blocks, scales)
            assert (plain[name] - t).abs().max() <= t.abs().max() / 2  # a coarse but faithful copy
        else:
            published[name] = plain[name] = t
    mxfp4_dir = rewrite(src, tmp_path / "mxfp4", published, {"quant_method": "mxfp4"})
    plain_dir = rewrite(src, tmp_path / "plain", plain, None)
    got, expected = span_outputs(mxfp4_dir, 1, 3), span_outputs(plain_dir, 1, 3)  # a sliding and a full block
    assert (got - expected).abs().max() <= 1e-6
    for quant in ("int8", "nf4"):  # dequantized MXFP4 experts are quantized again, as the plain ones are
        assert (span_outputs(mxfp4_dir, 0, 2, quant) - span_outputs(plain_dir, 0, 2, quant)).abs().max() <= 1e-6


def test_unknown_published_format_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_checkpoint("llama")
    dst = tmp_path / "awq"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(str(dst))
    with pytest.raises(CorollaError, match="Supported: fp8, mxfp4"):
        load_span(ckpt, ckpt.config(), 0, 1, torch.float32, "cpu")

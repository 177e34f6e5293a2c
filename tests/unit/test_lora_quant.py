"""LoRA adapters on quantized spans (``--adapters`` with ``--quant int8`` / ``nf4``): the update runs next to
the quantized layer, so the span answers like PEFT's float32 model within the quantization's tolerance,
forward and backward, and the adapter really applies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from reference_grads import reference_block_grads
from transformers import AutoModelForCausalLM

from corolla.engine.models.checkpoint import Checkpoint, load_span
from corolla.engine.models.lora import LoraLinear, attach_adapters, read_adapter
from corolla.engine.models.quant import Int8Linear, NF4Linear

pytestmark = pytest.mark.timeout(120)

# max |span - PEFT float32| / max |PEFT float32| of the last block's outputs and of the input gradients
TOLERANCE = {"int8": 0.01, "nf4": 0.1}  # measured: 0.002-0.003 and 0.04-0.05


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def peft_adapter(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny Llama's PEFT LoRA adapter with large random weights (saved), and the PEFT model."""
    from peft import LoraConfig, get_peft_model

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(hf, config).eval()
    folder = tmp_path_factory.mktemp("adapters") / "quant-lora"
    peft_model.save_pretrained(folder)
    return folder, peft_model


@pytest.mark.parametrize(("mode", "linear"), [("int8", Int8Linear), ("nf4", NF4Linear)])
def test_adapter_on_a_quantized_span_matches_peft_within_tolerance(
    tiny_checkpoint: Callable[..., Path], peft_adapter: tuple[Path, Any], mode: str, linear: type
) -> None:
    folder, peft_model = peft_adapter
    ckpt = Checkpoint(str(tiny_checkpoint("llama")))
    span = load_span(ckpt, ckpt.config(), 0, 6, torch.float32, "cpu", mode)
    assert attach_adapters(span, [read_adapter(folder)]) == ["quant-lora"]
    wrapped = [m for m in span.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 3 * 6 and all(isinstance(m.base, linear) for m in wrapped)  # kept quantized
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 64, generator=gen)
    grad_out = torch.randn(2, 6, 64, generator=gen)
    out_ref, grad_ref, _ = reference_block_grads(peft_model, hidden, grad_out, None)
    x = hidden.clone().requires_grad_(True)
    out = span(x, adapter="quant-lora")
    out.backward(grad_out)
    assert x.grad is not None
    error = rel_diff(out.detach(), out_ref)
    assert 0 < error <= TOLERANCE[mode], error
    assert rel_diff(x.grad, grad_ref) <= TOLERANCE[mode]
    with torch.no_grad():
        base = span(hidden)  # no adapter active: the quantized base model
    assert rel_diff(base, out_ref) > 3 * error  # the adapter is what brings it close to PEFT

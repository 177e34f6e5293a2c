"""Reading weights: a server reads only its blocks' tensors, a client only embeddings, norm and head.

A model is a local checkpoint folder (``config.json`` + safetensors) or a Hub repo id. For a Hub repo
only the files that hold the needed tensors are downloaded (for sharded checkpoints, the shards named
by ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from corolla.engine.errors import CorollaError
from corolla.engine.models.formats import WeightFormat, dequantize_block, weight_format
from corolla.engine.models.quant import check_quant, quantize_block
from corolla.engine.models.registry import get_family
from corolla.engine.models.source import check_model_source
from corolla.engine.models.span import BlockSpan

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """Where a model's files are, and which file holds which tensor."""

    def __init__(self, name_or_path: str, token: str | None = None, revision: str | None = None) -> None:
        self.name = name_or_path
        self.token = token
        self.revision = revision
        self.local_dir: Path | None = check_model_source(name_or_path)
        self._weight_map: dict[str, str] | None = None
        self._weight_format: WeightFormat | None = None

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r})"

    @property
    def is_local(self) -> bool:
        """True for a checkpoint folder on this machine."""
        return self.local_dir is not None

    @property
    def default_dht_prefix(self) -> str:
        """Name the swarm knows this model by: the repo id, or the folder's name."""
        return self.local_dir.name if self.local_dir is not None else self.name

    def file(self, filename: str) -> Path:
        """Path of one file of the checkpoint, downloading it from the Hub if needed."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist (is {self.local_dir} a full checkpoint?)")
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.name, filename, token=self.token, revision=self.revision))

    def has_file(self, filename: str) -> bool:
        """Whether the checkpoint has a file (without downloading it)."""
        if self.local_dir is not None:
            return (self.local_dir / filename).exists()
        from huggingface_hub import file_exists

        return bool(file_exists(self.name, filename, token=self.token, revision=self.revision))

    def config(self) -> PretrainedConfig:
        """The model's transformers config, without its ``quantization_config``.

        The engine builds plain layers and dequantizes published formats itself (:meth:`weight_format`),
        so nothing downstream should see a quantizer's settings and try to build quantized layers.
        """
        if self.local_dir is not None:
            config = AutoConfig.from_pretrained(self.local_dir)
        else:
            config = AutoConfig.from_pretrained(self.name, token=self.token, revision=self.revision)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config

    def weight_format(self) -> WeightFormat:
        """How the block tensors are published (``config.json``'s ``quantization_config``); CorollaError if unreadable."""
        if self._weight_format is None:
            with open(self.file("config.json")) as f:
                raw = json.load(f)
            self._weight_format = weight_format(raw.get("quantization_config"))
        return self._weight_format

    def weight_map(self) -> dict[str, str]:
        """Tensor name → safetensors file name."""
        if self._weight_map is None:
            if self.has_file(INDEX_FILE):
                with open(self.file(INDEX_FILE)) as f:
                    self._weight_map = dict(json.load(f)["weight_map"])
            elif self.has_file(SINGLE_FILE):
                with safe_open(str(self.file(SINGLE_FILE)), framework="pt") as f:
                    self._weight_map = {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118
            else:
                raise CorollaError(
                    f"{self.name} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}). "
                    "Convert the checkpoint with transformers' save_pretrained(safe_serialization=True)."
                )
        return self._weight_map

    def read(self, names: Iterable[str], desc: str) -> dict[str, torch.Tensor]:
        """Read the named tensors, touching only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        wanted = list(names)
        weight_map = self.weight_map()
        for name in wanted:
            if name in weight_map:
                by_file.setdefault(weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        # None: tqdm shows the bar only when stderr is a terminal, so logs and piped output never hold its text.
        disable = True if os.environ.get("COROLLA_NO_PROGRESS") == "1" else None
        with tqdm(total=len(wanted), desc=desc, unit="tensor", disable=disable, leave=False) as bar:
            for filename, file_names in sorted(by_file.items()):
                with safe_open(str(self.file(filename)), framework="pt", device="cpu") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name)
                        bar.update(1)
        return out


def load_span(
    ckpt: Checkpoint,
    config: PretrainedConfig,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: str = "none",
) -> BlockSpan:
    """Build blocks ``start..end-1`` and load only their tensors; ``quant`` int8/nf4 quantizes their linears
    and experts.

    Blocks are filled (and quantized) one at a time, and each block's checkpoint tensors are dropped once
    it holds them, so the device never holds more than one block in full precision besides the rest; a
    quantized block is quantized one matrix at a time on its way to the device, so the device never holds
    it in full precision at all (the CPU holds one block's checkpoint tensors while it loads).
    Weights published in FP8 or MXFP4 (:mod:`corolla.engine.models.formats`) are read with their scales
    and dequantized to ``dtype`` first.
    """
    check_quant(quant)
    fmt = ckpt.weight_format()
    span = BlockSpan(config, start, end, empty=True)
    family = span.family
    weight_map = ckpt.weight_map()
    prefixes = {i: family.layer_prefix(weight_map, i) for i in range(start, end)}
    names = [n for n in weight_map if any(n.startswith(p) for p in prefixes.values())]
    tensors = ckpt.read(names, desc=f"blocks {start}:{end}")
    for i, prefix in prefixes.items():
        block = {name[len(prefix) :]: tensors.pop(name) for name in list(tensors) if name.startswith(prefix)}
        try:
            block = family.block_state(dequantize_block(block, fmt, dtype), config)
        except ValueError as e:
            raise CorollaError(f"checkpoint {ckpt.name} does not match block {i}: {e}") from e
        layer = span.layers[i - start]
        if quant == "none":
            layer.to_empty(device=device)
            layer.to(dtype)
            missing, unexpected = layer.load_state_dict(block, strict=False)
        else:
            # The block (still on meta) takes its checkpoint tensors, on the CPU, as its own (no copy, nothing
            # allocated for it); quantize_block then sends each matrix to the device alone: a giant block never
            # needs its full-precision size on the device (a 23 GB DeepSeek-V3 block reaches a 24 GB card as
            # 11.5 GB with int8).
            block = {name: t.to(dtype) if t.is_floating_point() else t for name, t in block.items()}
            missing, unexpected = layer.load_state_dict(block, strict=False, assign=True)
            _materialize_meta_buffers(layer)
        if missing or unexpected:
            where = f"layers.{i - start}."
            raise CorollaError(
                f"checkpoint {ckpt.name} does not match blocks {start}:{end}: "
                f"missing {[where + m for m in missing][:5]}, unexpected {[where + u for u in unexpected][:5]}"
            )
        if quant != "none":
            quantize_block(layer, quant, device)
            layer.to(device)  # what stays in the compute dtype: norms, routers, biases
        del block
    if span.rotary_emb is not None:
        span.rotary_emb.to(device)
    span.requires_grad_(False)  # frozen: backward passes reach only the inputs and deep prompts
    return span.eval()


def _materialize_meta_buffers(layer: nn.Module) -> None:
    """Buffers a checkpoint does not hold (non-persistent ones) made on the CPU as ``to_empty`` makes them."""
    for module in layer.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")


class ClientHead(nn.Module):
    """What a client keeps locally: token embeddings, the final norm and the LM head, as its family has them.

    The family decides the norm (RMSNorm or LayerNorm), a norm right after the embeddings (Bloom), an
    embedding scale (Gemma) and the checkpoint names; a config's ``final_logit_softcapping`` (Gemma 2)
    caps the logits the way transformers does.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        family = get_family(config)
        self.family = family
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = family.embed_norm(config)
        self.embed_scale = family.embedding_scale(config)
        self.norm = family.final_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        softcap = getattr(config, "final_logit_softcapping", None)
        self.softcap = float(softcap) if softcap else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, length] token ids → [batch, length, hidden] inputs of block 0."""
        hidden: torch.Tensor = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, length, hidden] last hidden states → [batch, length, vocab] float32 logits."""
        logits: torch.Tensor = self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype)))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


def load_client_head(ckpt: Checkpoint, config: PretrainedConfig, dtype: torch.dtype) -> ClientHead:
    """Load embeddings, final norm and LM head (tied embeddings reuse the embedding matrix)."""
    with torch.device("meta"):
        head = ClientHead(config)
    names = head.family.client_tensors(ckpt.weight_map())
    if "embed_tokens.weight" not in names or "norm.weight" not in names:
        raise CorollaError(
            f"{ckpt.name} lacks the embeddings or the final norm its family ({config.model_type}) names: "
            f"found {sorted(names.values())}; is it a complete checkpoint?"
        )
    tensors = ckpt.read(sorted(names.values()), desc="embeddings and head")
    state = {key: tensors[name] for key, name in names.items()}
    if "lm_head.weight" not in state:
        if not getattr(config, "tie_word_embeddings", False):
            lm_head = f"{head.family.names.lm_head}.weight"
            logger.warning("%s has no %s; using the tied embedding matrix", ckpt.name, lm_head)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    head.to_empty(device="cpu")
    head.to(dtype)
    head.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        head.lm_head.weight = head.embed_tokens.weight
    return head.eval()


def parse_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA with bf16 support, float16 on other GPUs, float32 on CPU."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.startswith("mps") else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)} (got {name!r})")
    return dtypes[name]

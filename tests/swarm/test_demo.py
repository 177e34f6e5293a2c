"""`corolla demo` end to end: the GGUF → safetensors conversion, a real swarm, an answer, a clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from corolla.engine.testing import server_env, smollm2_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.swarm, pytest.mark.timeout(400)]


def test_demo_converts_once_and_answers_paris(tmp_path: Path) -> None:
    env = {**server_env(), "COROLLA_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "corolla.engine.cli", "demo", "--prompt", "What is the capital of France?"]
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "converting SmolLM2-135M-Instruct" in result.stderr  # first run: converted into the cache dir
    checkpoint = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()

    # Later runs reuse the converted checkpoint instead of converting again.
    stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert smollm2_checkpoint(tmp_path / "cache") == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp

    # Every process the demo started (servers, their DHT processes and p2p daemons) is gone.
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and "corolla.engine.cli" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []

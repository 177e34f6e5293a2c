"""examples/prompt_tuning.py, short: a real SmolLM2 swarm of 2 servers, the loss falls, everything stops."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from corolla.engine.apps.local_swarm import server_env

pytestmark = [pytest.mark.slow, pytest.mark.swarm, pytest.mark.timeout(600)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prompt_tuning.py"


def test_prompt_tuning_example_lowers_the_loss(tmp_path: Path) -> None:
    saved = tmp_path / "prompts.safetensors"
    cmd = [sys.executable, str(EXAMPLE), "--steps", "3", "--save", str(saved)]
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=server_env())
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], result.stdout
    assert "before: Capital of Germany?" in result.stdout and "after: Capital of Germany?" in result.stdout
    assert saved.stat().st_size > 16 * 576 * 4  # the 16 trained prompt vectors of SmolLM2's width
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and "corolla.engine.apps.cli" in " ".join(p.info["cmdline"] or [])
        and "SmolLM2" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []

"""examples/langchain_chain.py on the shared loopback swarm, read as a user sees it (stdout and stderr together)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from corolla_swarm import SwarmModel

from corolla.engine.apps.local_swarm import server_env

pytestmark = [pytest.mark.swarm, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_langchain_example_prints_answers_without_warnings_or_bars(corolla_swarm: SwarmModel) -> None:
    env = {k: v for k, v in server_env().items() if k != "COROLLA_NO_PROGRESS"}  # bars allowed, as for a user
    cmd = [sys.executable, str(EXAMPLES / "langchain_chain.py"), "--model", corolla_swarm.model]
    cmd += ["--initial-peers", *corolla_swarm.initial_peers, "--max-tokens", "4"]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240, env=env)
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    lines = out.splitlines()
    answer = next(line for line in lines if line.startswith("A: "))
    assert answer.endswith("…") and len(answer) > len("A: …"), out  # 4 tokens cut the answer, visibly
    assert lines[lines.index(answer) + 1] == "[cut at 4 tokens: --max-tokens]", out
    assert "unverified" not in out and "WARN" not in out, out  # the swarm's servers run on this machine
    assert "embeddings and head" not in out and "\r" not in out, out
    assert "usage:" in out and "completion:" in out, out

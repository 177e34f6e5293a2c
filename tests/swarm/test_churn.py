"""The churn soak, short: benchmarks/churn.py with a few kills loses no generation and every answer
matches transformers (its timing figures are printed by the full benchmark, never asserted here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corolla.engine.apps.local_swarm import server_env

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "churn.py"


@pytest.mark.timeout(900)
def test_short_churn_loses_nothing_and_matches_transformers(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    args = ["--generations", "6", "--kills", "3", "--new-tokens", "10", "--max-seconds", "600"]
    args += ["--log-dir", str(tmp_path), "--json", str(figures_path)]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=server_env(),
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=840)
    finally:
        if proc.poll() is None:  # stop it the way it stops its servers: SIGTERM unwinds its swarm
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    figures = json.loads(figures_path.read_text())
    assert figures["kills"] == 3, text[-4000:]
    assert figures["lost"] == 0, figures["errors"]
    assert figures["completed"] == figures["identical"] == 6, text[-4000:]

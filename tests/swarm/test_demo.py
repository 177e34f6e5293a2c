"""`corolla demo` end to end: the GGUF → safetensors conversion, a real swarm, an answer, a clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from corolla.engine.apps.local_swarm import server_env, smollm2_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.swarm, pytest.mark.timeout(400)]


def test_demo_converts_once_and_answers_paris(tmp_path: Path) -> None:
    env = {**server_env(), "COROLLA_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "corolla.engine.apps.cli", "demo", "--prompt", "What is the capital of France?"]
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "unverified" not in result.stderr  # the demo's servers are the user's own: nothing to distrust
    assert "converting SmolLM2-135M-Instruct" in result.stderr  # first run: converted into the cache dir
    checkpoint = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()

    # Later runs reuse the converted checkpoint instead of converting again.
    stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert smollm2_checkpoint(tmp_path / "cache") == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp

    # Every process the demo started (servers, their DHT processes and p2p daemons) is gone. Only the
    # demo's own are counted (its servers name the checkpoint in tmp_path), not other suites' on the box.
    def ours(cmdline: str) -> bool:
        return "corolla.engine.apps.cli" in cmdline and (str(tmp_path) in cmdline or " demo " in cmdline)

    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and ours(" ".join(p.info["cmdline"] or []))
    ]
    assert leftovers == []


def test_a_cut_answer_is_marked_and_shares_its_lines_with_no_warning_or_progress_bar() -> None:
    """stdout and stderr in one stream, as in a terminal; progress bars allowed (COROLLA_NO_PROGRESS unset)."""
    env = {k: v for k, v in server_env().items() if k != "COROLLA_NO_PROGRESS"}
    cmd = [sys.executable, "-m", "corolla.engine.apps.cli", "demo", "--prompt", "What is the capital of France?"]
    cmd += ["--max-new-tokens", "5"]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=360, env=env)
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert "[cut at 5 tokens: --max-new-tokens]" in lines, out[-3000:]  # on its own line
    answer = lines[lines.index("[cut at 5 tokens: --max-new-tokens]") - 1]
    assert answer.endswith("…") and "France" in answer, out[-3000:]
    for noise in ("\r", "%|", "embeddings and head", "WARN", "INFO"):
        assert noise not in answer, out[-3000:]
    assert "unverified" not in out and "embeddings and head" not in out, out[-3000:]


def test_ctrl_c_of_the_serving_demo_prints_no_error_and_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the demo's whole process group, once the swarm serves."""
    cmd = [sys.executable, "-m", "corolla.engine.apps.cli", "demo", "--serve"]
    err_path = tmp_path / "demo.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=server_env(), start_new_session=True
        )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test timeout
            if "Ctrl-C stops" in line:
                break
        assert proc.poll() is None, err_path.read_text()[-3000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 2 + 2 * 2  # 2 servers + their DHT processes and daemons (and the demo's own)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, err_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    stderr = err_path.read_text()
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    _, alive = psutil.wait_procs(started, timeout=15)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_ctrl_c_while_the_demo_answers_prints_no_error_and_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a streamed answer: a quiet exit, every process stopped."""
    prompt = "Write a long story about a cat who travels the world."
    cmd = [sys.executable, "-m", "corolla.engine.apps.cli", "demo", "--prompt", prompt, "--max-new-tokens", "400"]
    err_path = tmp_path / "demo.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=server_env(), start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(1)  # the answer starts streaming (bounded by the test timeout)
        assert first, err_path.read_text()[-3000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        proc.stdout.read()
        assert proc.wait(timeout=120) == 130, err_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    stderr = err_path.read_text()
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    _, alive = psutil.wait_procs(started, timeout=15)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]

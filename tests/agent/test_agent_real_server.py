"""The supervisor running a real ``corolla server`` on a tiny random Llama checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from agent_helpers import kill_pid, pid_alive, wait_for

from corolla.agent.serverstatus import read_stats
from corolla.agent.settings import AgentSettings
from corolla.agent.supervisor import Supervisor

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        importlib.util.find_spec("corolla.engine.cli") is None, reason="corolla.engine.cli not written yet"
    ),
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_supervisor_runs_real_server(tiny_llama: Path, tmp_path: Path) -> None:
    settings = AgentSettings(model=str(tiny_llama), num_blocks=2, new_swarm=True, host="127.0.0.1")
    status_file = tmp_path / "status.json"
    argv = settings.server_argv(status_file, device="cpu")
    supervisor = Supervisor(tmp_path / "server.log", grace_s=30)
    supervisor.start(argv)
    pid = supervisor.pid
    try:
        stats = wait_for(
            lambda: (
                ((s := read_stats(status_file)) and s.state == "online" and s)
                or (supervisor.poll().pid is None and pytest.fail((tmp_path / "server.log").read_text()))
            ),
            timeout_s=120,
            what="the server to come online",
        )
        assert stats.blocks is not None  # type: ignore[attr-defined]
        start, end = (int(x) for x in stats.blocks.split(":"))  # type: ignore[attr-defined]
        assert end - start == 2
        assert pid_alive(pid) and supervisor.poll().crashes == 0
        code = supervisor.stop()  # SIGTERM: the server leaves the swarm and exits by itself
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert not pid_alive(pid)
    finally:
        supervisor.stop()
        kill_pid(pid)

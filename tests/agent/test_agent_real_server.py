"""The supervisor running a real ``corolla server`` on a tiny random Llama checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import kill_pid, pid_alive, wait_for

from corolla.agent.paths import AgentPaths
from corolla.agent.serverstatus import read_stats
from corolla.agent.settings import AgentSettings, SettingsStore
from corolla.agent.supervisor import Supervisor

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        importlib.util.find_spec("corolla.engine.apps.cli") is None, reason="corolla.engine.apps.cli not written yet"
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


def test_sigkilled_agent_takes_its_real_server_along(tiny_llama: Path, agent_paths: AgentPaths) -> None:
    """`corolla-agent --headless` sharing a real server is SIGKILLed: the server and its DHT process and p2p
    daemon exit by themselves within seconds (nobody is left to stop them)."""
    import psutil

    settings = AgentSettings(
        model=str(tiny_llama), num_blocks=2, new_swarm=True, host="127.0.0.1",
        share_enabled=True, idle_minutes=0, poll_interval_s=0.2,
    )  # fmt: skip
    SettingsStore(agent_paths.settings_file).save(settings)
    log = open(agent_paths.log_dir / "headless.out", "wb")  # noqa: SIM115 - closed below
    agent = subprocess.Popen([sys.executable, "-m", "corolla.agent.cli", "--headless"], stdout=log, stderr=log)
    server: list[psutil.Process] = []
    try:
        wait_for(
            lambda: (
                ((s := read_stats(agent_paths.status_file)) and s.state == "online")
                or (agent.poll() is not None and pytest.fail((agent_paths.log_dir / "headless.out").read_text()))
            ),
            timeout_s=150,
            what="the agent's server to come online",
        )
        main = psutil.Process(json.loads(agent_paths.status_file.read_text())["pid"])
        server = [main, *main.children(recursive=True)]
        assert {"p2pd"} <= {p.name() for p in server}, [p.name() for p in server]
        agent.kill()
        agent.wait(timeout=10)
        _, alive = psutil.wait_procs(server, timeout=45)  # the server leaves the swarm first (SIGTERM), then exits
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        for proc in server:
            kill_pid(proc.pid)
        log.close()

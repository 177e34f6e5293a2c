"""`corolla-agent --headless` driven by `corolla-agent status|share|pause|quit` over the socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from agent_helpers import fake_server_command, kill_pid, pid_alive, wait_for

from corolla.agent.control import AgentNotRunningError, send_command
from corolla.agent.paths import AgentPaths
from corolla.agent.settings import AgentSettings, SettingsStore

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform == "win32", reason="uses a Unix control socket"),
]

AGENT = [sys.executable, "-m", "corolla.agent.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=30, env=os.environ.copy())


def status(paths: AgentPaths) -> dict[str, Any]:
    result = cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["status"]  # type: ignore[no-any-return]


@pytest.fixture
def headless(agent_paths: AgentPaths) -> Iterator[subprocess.Popen[bytes]]:
    settings = AgentSettings(server_command=fake_server_command(), idle_minutes=0, poll_interval_s=0.2)
    SettingsStore(agent_paths.settings_file).save(settings)
    log = open(agent_paths.log_dir / "headless.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*AGENT, "--headless"], stdout=log, stderr=subprocess.STDOUT)
    server_pids: list[int] = []
    try:
        wait_for(lambda: _answers(agent_paths) or proc.poll() is not None, what="control socket")
        assert proc.poll() is None, (agent_paths.log_dir / "headless.out").read_text()
        proc.server_pids = server_pids  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in server_pids:
            kill_pid(pid)
        log.close()


def _answers(paths: AgentPaths) -> bool:
    try:
        send_command(paths.control_socket, "status", timeout_s=1)
    except AgentNotRunningError:
        return False
    return True


def test_cli_controls_headless_agent(headless: subprocess.Popen[bytes], agent_paths: AgentPaths) -> None:
    pids: list[int] = headless.server_pids  # type: ignore[attr-defined]
    first = status(agent_paths)
    assert first["state"] == "stopped" and not first["share_enabled"]  # first run: not sharing
    assert first["agent_pid"] == headless.pid

    assert cli("share").returncode == 0
    sharing = wait_for(lambda: (s := status(agent_paths))["state"] == "sharing" and s, what="sharing")
    pid = sharing["pid"]  # type: ignore[index]
    pids.append(pid)
    assert pid_alive(pid) and sharing["blocks"] == "0:4"  # type: ignore[index]
    assert "Sharing" in cli("status").stdout

    result = cli("pause", "--snooze")
    assert result.returncode == 0 and "snoozed" in result.stdout
    wait_for(lambda: status(agent_paths)["state"] == "paused-busy" and not pid_alive(pid), what="snooze")
    assert status(agent_paths)["share_enabled"]

    cli("share")
    pid = wait_for(lambda: (s := status(agent_paths))["state"] == "sharing" and s["pid"], what="share again")
    pids.append(pid)  # type: ignore[arg-type]
    assert "sharing off" in cli("pause").stdout
    wait_for(lambda: status(agent_paths)["state"] == "stopped" and not pid_alive(pid), what="pause")

    # a second agent refuses to start while this one runs
    second = subprocess.run([*AGENT, "--headless"], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "already running" in second.stderr

    cli("share")
    pid = wait_for(lambda: (s := status(agent_paths))["state"] == "sharing" and s["pid"], what="share")
    pids.append(pid)  # type: ignore[arg-type]
    result = cli("quit")
    assert result.returncode == 0 and "quitting" in result.stdout
    assert headless.wait(20) == 0
    assert not pid_alive(pid) and not agent_paths.control_socket.exists()
    assert cli("status").returncode == 3


def test_sigterm_stops_the_server(headless: subprocess.Popen[bytes], agent_paths: AgentPaths) -> None:
    cli("share")
    pid = wait_for(lambda: (s := status(agent_paths))["state"] == "sharing" and s["pid"], what="sharing")
    headless.server_pids.append(pid)  # type: ignore[attr-defined]
    headless.send_signal(signal.SIGTERM)
    assert headless.wait(20) == 0
    assert not pid_alive(pid)  # type: ignore[arg-type]
    log = (agent_paths.log_dir / "agent.log").read_text()
    assert "no server left running" in log


def test_commands_without_agent(agent_paths: AgentPaths) -> None:
    result = cli("status")
    assert result.returncode == 3 and "corolla-agent --headless" in result.stderr
    assert cli("logs").stdout.strip() == str(agent_paths.log_dir)

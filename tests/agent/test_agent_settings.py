"""Settings validation, first run, command line, start-at-login entries, paths."""

from __future__ import annotations

import json
import plistlib
import sys
from pathlib import Path

import pytest

from corolla.agent import autostart
from corolla.agent.paths import AgentPaths
from corolla.agent.settings import AgentSettings, SettingsStore

pytestmark = pytest.mark.timeout(10)

PEER = "/ip4/10.0.0.1/tcp/31337/p2p/QmXyz"


def test_first_run_writes_defaults_with_sharing_off(agent_paths: AgentPaths) -> None:
    store = SettingsStore(agent_paths.settings_file)
    settings, error = store.load()
    assert error is None and settings.share_enabled is False and settings.start_at_login is False
    assert json.loads(agent_paths.settings_file.read_text())["share_enabled"] is False
    store.save(settings.model_copy(update={"share_enabled": True, "idle_minutes": 2}))
    again, _ = store.load()
    assert again.share_enabled and again.idle_minutes == 2


def test_invalid_file_is_reported_not_overwritten(agent_paths: AgentPaths) -> None:
    agent_paths.settings_file.write_text('{"idle_minutes": -3, "future_key": 1}')
    settings, error = SettingsStore(agent_paths.settings_file).load()
    assert error is not None and "idle_minutes" in error and "delete it" in error
    assert settings.share_enabled is False
    assert "-3" in agent_paths.settings_file.read_text()  # the user's file is left alone
    agent_paths.settings_file.write_text("{not json")
    assert SettingsStore(agent_paths.settings_file).load()[1] is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"initial_peers": ["10.0.0.1:31337"]},
        {"public_name": "x" * 65},
        {"public_name": "bad\nname"},
        {"num_blocks": 0},
        {"server_command": []},
        {"device": "tpu"},
    ],
)
def test_validation_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AgentSettings.model_validate(bad)


def test_server_argv(tmp_path: Path) -> None:
    status = tmp_path / "s.json"
    settings = AgentSettings(model="m", initial_peers=[PEER], num_blocks=3, public_name="alice's box")
    assert settings.server_argv(status, "cuda") == [
        sys.executable, "-m", "corolla.engine.apps.cli", "server", "m", "--num-blocks", "3",
        "--initial-peers", PEER, "--public-name", "alice's box", "--device", "cuda",
        "--status-file", str(status),
    ]  # fmt: skip
    swarm = AgentSettings(model="m", server_command=["fake"], host="127.0.0.1", extra_server_args=["-x"])
    assert swarm.server_argv(status, "cpu") == [
        "fake", "m", "--new-swarm", "--host", "127.0.0.1", "--device", "cpu",
        "--status-file", str(status), "-x",
    ]  # fmt: skip


def test_max_vram_gb_caps_the_server_memory(tmp_path: Path) -> None:
    from corolla.engine.config import ServerConfig, from_env, parse_size

    argv = AgentSettings(model="m", max_vram_gb=6.5).server_argv(tmp_path / "s.json", "cuda")
    value = argv[argv.index("--max-memory") + 1]
    assert parse_size(value) == round(6.5 * 2**30)
    assert from_env(ServerConfig, max_memory=value).max_memory == round(6.5 * 2**30)  # the server reads it
    assert "--max-memory" not in AgentSettings(model="m").server_argv(tmp_path / "s.json", "cuda")


def test_autostart_desktop_entry(agent_paths: AgentPaths, tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("XDG autostart is Linux-only")
    assert not autostart.is_enabled()
    autostart.set_enabled(True, ["/opt/my python/bin/python", "-m", "corolla.agent.cli"])
    path = tmp_path / "xdg-config" / "autostart" / "corolla-agent.desktop"
    text = path.read_text()
    assert autostart.is_enabled()
    assert 'Exec="/opt/my python/bin/python" -m corolla.agent.cli\n' in text and "Type=Application" in text
    autostart.set_enabled(False)
    assert not path.exists() and not autostart.is_enabled()


def test_launch_agent_plist() -> None:
    plist = plistlib.loads(autostart.launch_agent_plist(["/usr/bin/python3", "-m", "corolla.agent.cli"]))
    assert plist["Label"] == "org.corolla.agent" and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][-1] == "corolla.agent.cli"
    assert autostart.entry_path("darwin") == Path.home() / "Library/LaunchAgents/org.corolla.agent.plist"


def test_paths_follow_home_env(agent_paths: AgentPaths) -> None:
    assert agent_paths.settings_file.parent.is_dir() and agent_paths.control_socket.parent.is_dir()
    assert agent_paths.server_log.parent == agent_paths.log_dir

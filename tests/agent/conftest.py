"""Fixtures for the agent tests: an isolated agent home and fake sensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import FakeApps, FakeGpu, FakeIdle

from corolla.agent.paths import AgentPaths
from corolla.agent.sensors import Sensors


@pytest.fixture
def agent_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentPaths:
    """Agent dirs under a temp folder (also via COROLLA_AGENT_HOME for subprocesses)."""
    home = tmp_path / "home"
    monkeypatch.setenv("COROLLA_AGENT_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    paths = AgentPaths.default()
    paths.ensure()
    return paths


@pytest.fixture
def fake_sensors() -> Iterator[tuple[Sensors, FakeIdle, FakeGpu, FakeApps]]:
    """Sensors the test controls: idle for a long time, no GPU, no pausing apps."""
    idle, gpu, apps = FakeIdle(), FakeGpu(), FakeApps()
    yield Sensors(gpu=gpu, idle=idle, apps=apps), idle, gpu, apps

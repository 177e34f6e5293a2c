"""The app core imports no GUI toolkit, and importing the agent has no side effects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

CHECK = """
import logging, os, sys
before = dict(os.environ)
import corolla.agent, corolla.agent.app, corolla.agent.cli, corolla.agent.control, corolla.agent.policy
import corolla.agent.sensors, corolla.agent.supervisor, corolla.agent.settings, corolla.agent.autostart
gui = sorted(m for m in ("pystray", "gi", "PIL", "Xlib", "pynvml") if m in sys.modules)
assert not gui, f"GUI/sensor libraries imported by the core: {gui}"
assert dict(os.environ) == before, "importing the agent changed the environment"
assert not logging.getLogger().handlers, "importing the agent configured logging"
assert not [m for m in sys.modules if m.startswith(("corolla.integrations",))]
"""


def test_core_has_no_gui_imports(tmp_path: Path) -> None:
    env = {**os.environ, "COROLLA_AGENT_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=50)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "home").exists()  # nothing written at import


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "corolla.agent.cli", "--help"], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0 and "--headless" in result.stdout
    for command in ("status", "share", "pause", "quit"):
        assert command in result.stdout

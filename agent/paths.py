"""Where the agent keeps its settings, logs, state and control socket.

Everything follows ``platformdirs`` unless ``COROLLA_AGENT_HOME`` is set, in which case every
directory lives under that one folder (portable installs and tests).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "corolla"
HOME_ENV = "COROLLA_AGENT_HOME"

# AF_UNIX paths are limited to 104-108 bytes depending on the OS.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class AgentPaths:
    """Directories and files the agent uses.

    Attributes:
        config_dir: Holds ``settings.json``.
        log_dir: Holds ``agent.log`` and ``server.log``.
        state_dir: Holds the server's status file.
        runtime_dir: Holds the control socket (POSIX) or its port file (Windows).
    """

    config_dir: Path
    log_dir: Path
    state_dir: Path
    runtime_dir: Path

    @classmethod
    def default(cls) -> AgentPaths:
        """Returns the paths from ``COROLLA_AGENT_HOME`` or the platform's conventions."""
        home = os.environ.get(HOME_ENV)
        if home:
            root = Path(home).expanduser()
            return cls(root / "config", root / "logs", root / "state", root / "run")
        runtime = Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False))
        state = Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))
        if sys.platform != "win32" and len(str(runtime / "agent.sock")) > _MAX_SOCKET_PATH:
            runtime = state
        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
            log_dir=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
            state_dir=state,
            runtime_dir=runtime,
        )

    @property
    def settings_file(self) -> Path:
        """The validated settings (JSON)."""
        return self.config_dir / "settings.json"

    @property
    def agent_log(self) -> Path:
        """The agent's own log."""
        return self.log_dir / "agent.log"

    @property
    def server_log(self) -> Path:
        """The supervised server's stdout and stderr."""
        return self.log_dir / "server.log"

    @property
    def status_file(self) -> Path:
        """The JSON file the server writes (``--status-file``)."""
        return self.state_dir / "server-status.json"

    @property
    def control_socket(self) -> Path:
        """The control socket (POSIX) or the file naming its port and token (Windows)."""
        return self.runtime_dir / ("control.json" if sys.platform == "win32" else "agent.sock")

    def ensure(self) -> None:
        """Creates the directories (private to the user where the OS allows)."""
        for directory in (self.config_dir, self.log_dir, self.state_dir, self.runtime_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

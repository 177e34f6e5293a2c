"""Start-at-login entries: XDG autostart (Linux), Run key (Windows), LaunchAgent (macOS).

Off by default; the agent only writes an entry when the user turns "Start at login" on, and
removes it when they turn it off.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import plistlib
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENTRY_NAME = "corolla-agent"
LAUNCH_AGENT_LABEL = "org.corolla.agent"
_RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


def default_command() -> list[str]:
    """The command that starts the tray agent with this Python."""
    return [sys.executable, "-m", "corolla.agent.cli"]


def desktop_entry(command: list[str]) -> str:
    """Renders an XDG autostart ``.desktop`` file.

    Args:
        command: The agent's argv.

    Returns:
        The file's text.
    """
    exec_line = " ".join(_desktop_quote(arg) for arg in command)
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=Corolla agent\n"
        "Comment=Share this computer's idle GPU with a Corolla swarm\n"
        f"Exec={exec_line}\n"
        "Terminal=false\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


def launch_agent_plist(command: list[str]) -> bytes:
    """Renders a macOS LaunchAgent plist that runs the agent at login.

    Args:
        command: The agent's argv.

    Returns:
        The plist bytes.
    """
    return plistlib.dumps(
        {"Label": LAUNCH_AGENT_LABEL, "ProgramArguments": command, "RunAtLoad": True, "KeepAlive": False}
    )


def entry_path(platform: str | None = None) -> Path | None:
    """The file that holds the entry, or None on Windows (registry) and unknown platforms."""
    platform = platform or sys.platform
    if platform.startswith("linux") or "bsd" in platform:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return config / "autostart" / f"{ENTRY_NAME}.desktop"
    if platform == "darwin":
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
    return None


def is_enabled() -> bool:
    """Whether a start-at-login entry exists for the agent."""
    if sys.platform == "win32":
        return _windows_get() is not None
    path = entry_path()
    return path is not None and path.exists()


def set_enabled(enabled: bool, command: list[str] | None = None) -> None:
    """Creates or removes the start-at-login entry.

    Args:
        enabled: Whether the agent should start at login.
        command: The agent's argv (default: :func:`default_command`).

    Raises:
        OSError: The entry could not be written or removed.
    """
    command = command or default_command()
    if sys.platform == "win32":
        _windows_set(subprocess_line(command) if enabled else None)
        return
    path = entry_path()
    if path is None:
        raise OSError(f"start at login is not supported on {sys.platform}")
    if not enabled:
        path.unlink(missing_ok=True)
        logger.info("start at login off (removed %s)", path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "darwin":
        path.write_bytes(launch_agent_plist(command))
    else:
        path.write_text(desktop_entry(command), encoding="utf-8")
    logger.info("start at login on (%s)", path)


def subprocess_line(command: list[str]) -> str:
    """Joins argv into one Windows command line."""
    import subprocess

    return subprocess.list2cmdline(command)


def _desktop_quote(arg: str) -> str:
    # The Desktop Entry spec's Exec quoting: double quotes, with \ " ` $ escaped.
    if arg and all(c.isalnum() or c in "/._-=:+," for c in arg):
        return arg
    escaped = "".join("\\" + c if c in '\\"`$' else c for c in arg).replace("%", "%%")
    return f'"{escaped}"'


def _windows_get() -> str | None:  # pragma: no cover - Windows only
    winreg: Any = importlib.import_module("winreg")

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _RUN_KEY) as key:
            value, _ = winreg.QueryValueEx(key, ENTRY_NAME)
            return str(value)
    except OSError:
        return None


def _windows_set(line: str | None) -> None:  # pragma: no cover - Windows only
    winreg: Any = importlib.import_module("winreg")

    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, _RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
        if line is None:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, ENTRY_NAME)
        else:
            winreg.SetValueEx(key, ENTRY_NAME, 0, winreg.REG_SZ, line)
    logger.info("start at login %s (HKCU Run key)", "off" if line is None else "on")


__all__ = [
    "default_command",
    "desktop_entry",
    "entry_path",
    "is_enabled",
    "launch_agent_plist",
    "set_enabled",
]

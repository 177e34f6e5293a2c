"""The agent's states, commands and the status snapshot shared by the tray, CLI and socket."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class AgentState(StrEnum):
    """What the agent is doing.

    STOPPED: sharing is off (the user's choice; also the first-run state).
    STARTING: sharing is on and the server is starting (or restarting after a crash).
    SHARING: the server is online and serving blocks.
    PAUSED_BUSY: sharing is on but the machine is in use (or snoozed), so no server runs.
    ERROR: sharing is on but the server keeps failing, or the settings are invalid.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    SHARING = "sharing"
    PAUSED_BUSY = "paused-busy"
    ERROR = "error"


class Command(StrEnum):
    """Everything the tray menu, the CLI and the control socket can ask of the app."""

    STATUS = "status"
    SHARE_ON = "share-on"
    SHARE_OFF = "share-off"
    TOGGLE_SHARE = "toggle-share"
    PAUSE_UNTIL_IDLE = "pause-until-idle"
    SNOOZE = "snooze"
    OPEN_LOGS = "open-logs"
    START_AT_LOGIN_ON = "start-at-login-on"
    START_AT_LOGIN_OFF = "start-at-login-off"
    QUIT = "quit"


STATE_LABELS = {
    AgentState.STOPPED: "Not sharing",
    AgentState.STARTING: "Starting…",
    AgentState.SHARING: "Sharing",
    AgentState.PAUSED_BUSY: "Paused",
    AgentState.ERROR: "Error",
}


@dataclass(frozen=True)
class Status:
    """A snapshot of the agent, safe to hand to any thread.

    Attributes:
        state: The current state.
        share_enabled: The "Share my GPU" toggle.
        reasons: Why the agent is paused or in error (user-facing phrases).
        pid: The server's pid while one runs.
        blocks: Blocks served, from the server's status file or the settings.
        tokens_processed: Tokens processed by this server since it started.
        tokens_served_today: Tokens this machine served to the swarm today (from the server's ledger).
        tokens_served_total: Tokens this machine served to the swarm in total.
        gpu: The GPU's name, or "no NVIDIA GPU".
        start_at_login: Whether the agent starts at login.
        log_dir: Where the logs are.
        quitting: True once quit was requested.
        agent_pid: The agent's own process id.
    """

    state: AgentState = AgentState.STOPPED
    share_enabled: bool = False
    reasons: tuple[str, ...] = ()
    pid: int | None = None
    blocks: str | None = None
    tokens_processed: int = 0
    tokens_served_today: int = 0
    tokens_served_total: int = 0
    gpu: str = ""
    start_at_login: bool = False
    log_dir: str = ""
    quitting: bool = False
    agent_pid: int = 0

    def tooltip(self) -> str:
        """A short multi-line text for the tray icon's tooltip."""
        lines = [f"Corolla: {STATE_LABELS[self.state]}"]
        if self.state in (AgentState.SHARING, AgentState.STARTING):
            lines.append(f"blocks {self.blocks or '?'} · {self.tokens_processed:,} tokens processed")
        if self.tokens_served_total:
            lines.append(
                f"you served {self.tokens_served_today:,} tokens today / {self.tokens_served_total:,} in total"
            )
        if self.reasons:
            lines.append("; ".join(self.reasons))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the control socket's status payload)."""
        data = asdict(self)
        data["state"] = str(self.state)
        data["reasons"] = list(self.reasons)
        return data


@dataclass(frozen=True)
class Reply:
    """The answer to one command: never an exception.

    Attributes:
        ok: Whether the command did what was asked.
        message: One user-facing line.
        status: The status right after the command.
    """

    ok: bool
    message: str
    status: Status

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (one control-socket response line)."""
        return {"ok": self.ok, "message": self.message, "status": self.status.to_dict()}

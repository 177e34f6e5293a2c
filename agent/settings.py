"""Validated agent settings, stored as JSON in the platformdirs config dir.

The settings also say how to start the server: :meth:`AgentSettings.server_argv` builds the
command line, and ``server_command`` can replace its program part (a different Python, a
wrapper, or a fake server in tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
_NAME_RE = re.compile(r"^[\w .,:@()'+-]{1,64}$")

Device = Literal["auto", "cuda", "cpu", "mps"]


class AgentSettings(BaseModel):
    """Everything the user can configure. Unknown keys in the file are ignored.

    Attributes:
        model: Hugging Face repo id or local path of the model whose blocks to serve.
        initial_peers: Multiaddrs of swarm peers to join (empty with ``new_swarm``: start one).
        new_swarm: Start a new swarm instead of joining ``initial_peers``.
        host: Address the server listens on (None: the server's default).
        num_blocks: Number of blocks to serve (None: the server decides).
        max_vram_gb: GiB the server may take for weights, cache and activations together (its
            ``--max-memory``), and of free GPU memory required before sharing starts (None: no cap).
        device: ``auto`` picks ``cuda`` when an NVIDIA GPU is present, else ``cpu``.
        idle_minutes: Minutes without keyboard/mouse input before sharing starts (0: always).
        start_at_login: Start the agent when the user logs in (off unless the user opts in).
        public_name: Name shown for this peer in the swarm.
        share_enabled: The "Share my GPU" toggle; False on first run.
        pause_for_apps: Process names that pause sharing while they run (case-insensitive).
        gpu_busy_percent: GPU utilisation (%) by others that counts as busy.
        resume_after_s: Seconds everything must stay quiet before sharing resumes after a pause.
        stop_grace_s: Seconds the server gets to leave the swarm after SIGTERM before it is killed.
        poll_interval_s: Seconds between sensor readings.
        server_command: Program part of the server command line (None: this Python's
            ``-m corolla.engine.apps.cli server``).
        extra_server_args: Extra flags appended to the server command line.
        swarm_key_file: Key file of a private swarm (``corolla swarm-key new``); None: a public swarm.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=512)
    initial_peers: list[str] = Field(default_factory=list)
    new_swarm: bool = False
    host: str | None = None
    num_blocks: int | None = Field(default=None, ge=1, le=10_000)
    max_vram_gb: float | None = Field(default=None, gt=0, le=4096)
    device: Device = "auto"
    idle_minutes: float = Field(default=5.0, ge=0, le=24 * 60)
    start_at_login: bool = False
    public_name: str | None = None
    share_enabled: bool = False
    pause_for_apps: list[str] = Field(
        default_factory=lambda: ["obs", "obs64.exe", "blender", "blender.exe", "resolve", "resolve.exe"]
    )
    gpu_busy_percent: float = Field(default=30.0, gt=0, le=100)
    resume_after_s: float = Field(default=30.0, ge=0, le=24 * 3600)
    stop_grace_s: float = Field(default=15.0, gt=0, le=600)
    poll_interval_s: float = Field(default=2.0, gt=0, le=60)
    server_command: list[str] | None = None
    extra_server_args: list[str] = Field(default_factory=list)
    swarm_key_file: str | None = Field(default=None, max_length=4096)

    @field_validator("initial_peers")
    @classmethod
    def _check_peers(cls, peers: list[str]) -> list[str]:
        for peer in peers:
            if not peer.startswith("/") or "/p2p/" not in peer or any(c.isspace() for c in peer):
                raise ValueError(f"{peer!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/Qm...")
        return peers

    @field_validator("public_name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME_RE.match(name):
            raise ValueError("public_name: 1-64 letters, digits, spaces or .,:@()'+-_")
        return name

    @field_validator("server_command")
    @classmethod
    def _check_command(cls, command: list[str] | None) -> list[str] | None:
        if command is not None and not command:
            raise ValueError("server_command must name a program (or be null for the default)")
        return command

    def server_argv(self, status_file: Path, device: str) -> list[str]:
        """Builds the server command line.

        Args:
            status_file: Where the server writes its JSON status (``--status-file``).
            device: The resolved device (never ``auto``).

        Returns:
            The full argv, program first.
        """
        program = self.server_command or [sys.executable, "-m", "corolla.engine.apps.cli", "server"]
        argv = [*program, self.model]
        if self.num_blocks is not None:
            argv += ["--num-blocks", str(self.num_blocks)]
        if self.new_swarm or not self.initial_peers:
            argv.append("--new-swarm")
        else:
            argv += ["--initial-peers", *self.initial_peers]
        if self.host:
            argv += ["--host", self.host]
        if self.public_name:
            argv += ["--public-name", self.public_name]
        if self.max_vram_gb is not None:
            argv += ["--max-memory", str(round(self.max_vram_gb * 2**30))]  # bytes
        if self.swarm_key_file:
            argv += ["--swarm-key", self.swarm_key_file]
        argv += ["--device", device, "--status-file", str(status_file), *self.extra_server_args]
        return argv


class SettingsStore:
    """Loads and saves :class:`AgentSettings` at one path (atomic writes).

    Args:
        path: The JSON file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[AgentSettings, str | None]:
        """Reads the settings; writes the defaults on first run.

        Returns:
            The settings and None, or defaults (with sharing off) and a message saying what is
            wrong with the file. The broken file is left for the user to fix.
        """
        if not self.path.exists():
            settings = AgentSettings()
            try:
                self.save(settings)
                logger.info("first run: wrote default settings to %s (sharing is off)", self.path)
            except OSError as e:
                logger.warning("could not write %s: %s", self.path, e)
            return settings, None
        try:
            return AgentSettings.model_validate(json.loads(self.path.read_text(encoding="utf-8"))), None
        except (OSError, ValueError, ValidationError) as e:
            message = f"{self.path} is invalid ({_short(e)}); fix it or delete it to get the defaults"
            logger.error("%s", message)
            return AgentSettings(), message

    def save(self, settings: AgentSettings) -> None:
        """Writes the settings atomically (temp file + rename).

        Args:
            settings: What to write.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(settings.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _short(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        return f"{where}: {first['msg']}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__

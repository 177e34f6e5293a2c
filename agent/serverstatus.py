"""Reads the JSON status file the server writes (``--status-file``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServerStats(BaseModel):
    """The server's self-report. Unknown fields are ignored; sizes are bounded.

    Attributes:
        blocks: The span served, e.g. ``"0:15"``.
        tokens_processed: Tokens run through our blocks since the server started.
        state: The server's own state, e.g. ``"online"``.
        tokens_served_today: Tokens this machine's servers processed for others today (the server's ledger).
        tokens_served_total: The same, over all time.
    """

    model_config = ConfigDict(extra="ignore")

    blocks: str | None = Field(default=None, max_length=64)
    tokens_processed: int = Field(default=0, ge=0)
    state: str = Field(default="unknown", max_length=32)
    tokens_served_today: int = Field(default=0, ge=0)
    tokens_served_total: int = Field(default=0, ge=0)


def read_stats(path: Path) -> ServerStats | None:
    """Reads the status file; None when it is missing, half-written or invalid."""
    try:
        if path.stat().st_size > 65536:
            return None
        return ServerStats.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError):
        return None

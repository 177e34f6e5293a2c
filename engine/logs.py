"""The one place that sets up logging (called by command-line entry points, never at import)."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(level: str | int | None = None) -> None:
    """Short user-facing INFO lines on stderr; ``COROLLA_LOG_LEVEL`` overrides the level."""
    level = level or os.environ.get("COROLLA_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.strip().upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("corolla")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("hivemind", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

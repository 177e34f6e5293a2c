"""Reports of servers caught lying, kept on this machine for ``corolla health`` to flag.

A client that convicts a server (its output disagreed with two independent replicas, or a published report
it re-checked on its own replica proved the lie) appends one JSON line to a local file: what *this
machine's* clients concluded. ``corolla health`` reads the same file and flags the servers it names.

Reports also travel: the client publishes the evidence (the inputs, the liar's signed output, the honest
output) to the DHT (``client/reporting.py``, ``dht/report_records.py``), and other clients re-check it
before they avoid anyone (``client/report_check.py``). Evidence over the size bound, or of a step the server
did not sign, stays in this file only.

The file is ``$COROLLA_REPORT_FILE``, else ``$XDG_CACHE_HOME/corolla/reports.jsonl`` (``~/.cache/...``).
Reading skips malformed lines and keeps at most :data:`MAX_REPORTS` of the newest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["MAX_REPORTS", "LiarReport", "default_report_file", "read_reports", "write_report"]

logger = logging.getLogger(__name__)

MAX_REPORTS = 1000
"""Newest reports read back; older lines are ignored."""


@dataclass(frozen=True)
class LiarReport:
    """A server this machine's client caught lying.

    Attributes:
        peer_id: The liar's full peer id.
        model: The model name (DHT prefix).
        start: First block of the checked hop.
        end: One past its last block.
        reason: What was seen (which replicas disagreed with it, by how much).
        time: Unix time of the catch.
    """

    peer_id: str
    model: str
    start: int
    end: int
    reason: str
    time: float


def default_report_file() -> Path:
    """``$COROLLA_REPORT_FILE``, else ``$XDG_CACHE_HOME/corolla/reports.jsonl`` (``~/.cache/corolla/...``)."""
    env = os.environ.get("COROLLA_REPORT_FILE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "corolla" / "reports.jsonl"


def write_report(report: LiarReport, path: str | Path | None = None) -> None:
    """Append ``report`` to the report file (best effort: a read-only home only logs a warning)."""
    file = Path(path) if path else default_report_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(report)) + "\n")
    except OSError as e:
        logger.warning("could not record the report on %s in %s: %s", report.peer_id[-6:], file, e)


def read_reports(path: str | Path | None = None, model: str | None = None) -> list[LiarReport]:
    """Reports in the file (of ``model`` only, if given), oldest first; [] when there is no file."""
    file = Path(path) if path else default_report_file()
    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()[-MAX_REPORTS:]
    except OSError:
        return []
    reports = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            data = json.loads(line)
            report = LiarReport(
                peer_id=str(data["peer_id"]),
                model=str(data["model"]),
                start=int(data["start"]),
                end=int(data["end"]),
                reason=str(data["reason"])[:500],
                time=float(data.get("time", 0.0)),
            )
            if model is None or report.model == model:
                reports.append(report)
    return reports

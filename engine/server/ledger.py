"""The contribution ledger: tokens this machine's servers processed, per client peer and per day.

Each server counts in memory (:meth:`Ledger.add`, called by the backend after every step or forward) and
folds what it counted into a JSON file in the user's data folder (:meth:`Ledger.save`, on each
announcement and on exit). Folding adds the tokens counted since the last save to what the file holds,
under an exclusive file lock, so several servers on one machine share one ledger without losing counts.
Two figures come out of it: :attr:`Ledger.served`, this server's own count since it started, goes into
its signed record (``tokens_served``, one figure per server in ``corolla health`` and the monitor), and
:meth:`Ledger.totals`, the whole machine's (every server sharing the file), goes into its status file
(for the tray's "you served N tokens").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
MAX_PEERS = 1000  # clients remembered by name; the smallest counts are folded away beyond that
MAX_DAYS = 400  # days of history kept


def default_ledger_path() -> Path:
    """``ledger.json`` in the platform's user data folder for Corolla (``COROLLA_DATA_DIR`` overrides it)."""
    base = os.environ.get("COROLLA_DATA_DIR")
    if base:
        return Path(base) / "ledger.json"
    from platformdirs import user_data_dir

    return Path(user_data_dir("corolla", appauthor=False)) / "ledger.json"


def today() -> str:
    """Today's date in UTC, as the ledger's day key."""
    return dt.datetime.now(dt.UTC).date().isoformat()


def empty() -> dict[str, Any]:
    """A ledger with nothing in it."""
    return {"version": LEDGER_VERSION, "total": 0, "days": {}, "peers": {}}


def parse(data: Any) -> dict[str, Any]:
    """A well-formed ledger from what a file held; malformed parts are dropped (the file is the user's)."""
    out = empty()
    if not isinstance(data, dict):
        return out
    total = data.get("total")
    out["total"] = total if type(total) is int and total >= 0 else 0
    for name in ("days", "peers"):
        part = data.get(name)
        if isinstance(part, dict):
            out[name] = {k: v for k, v in part.items() if isinstance(k, str) and type(v) is int and v >= 0}
    return out


def fold(ledger: dict[str, Any], peers: Counter[str], day: str) -> dict[str, Any]:
    """``ledger`` plus ``peers``' tokens counted on ``day`` (pure; bounded in peers and days)."""
    added = sum(peers.values())
    out = parse(ledger)
    out["total"] += added
    out["days"][day] = out["days"].get(day, 0) + added
    out["days"] = dict(sorted(out["days"].items())[-MAX_DAYS:])
    merged = Counter(out["peers"])
    merged.update(peers)
    out["peers"] = dict(merged.most_common(MAX_PEERS))
    return out


class Ledger:
    """Tokens processed per client peer, counted in memory and folded into a shared file on :meth:`save`."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_ledger_path()
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()  # tokens per peer not yet in the file
        self.served = 0  # tokens this server (this Ledger object) processed since it started; not in the file
        self._file = parse(self._read())  # what the file held at the last save

    def add(self, peer: str, tokens: int) -> None:
        """Count ``tokens`` processed for ``peer``."""
        with self._lock:
            self._pending[peer or "?"] += tokens
            self.served += tokens

    def totals(self) -> dict[str, int]:
        """``{"total": …, "today": …}``: tokens this machine's servers served, as of this server's last save
        plus what it counted since (other servers' counts show up once they saved and this one saved again).
        For this server's own count, see :attr:`served`."""
        with self._lock:
            pending = sum(self._pending.values())
            return {"total": self._file["total"] + pending, "today": self._file["days"].get(today(), 0) + pending}

    def save(self) -> None:
        """Fold the tokens counted since the last save into the file (never raises: logs a warning)."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        try:
            with self._locked():
                merged = fold(self._read(), pending, today())
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(merged))
                tmp.replace(self.path)
            self._file = merged
        except OSError as e:
            with self._lock:
                self._pending.update(pending)  # keep them for the next try
            logger.warning("could not save the ledger %s: %s", self.path, e.strerror or e)

    def _read(self) -> Any:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.path.read_text())
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

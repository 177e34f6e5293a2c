"""The monitor's view of the swarm: pure functions from DHT records to the JSON the page draws,
and the one long-lived reader that refreshes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from corolla.engine.apps.health import weights_label
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import format_blocks

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def server_entry(peer_id: str, record: ServerRecord) -> dict[str, Any]:
    """One row of the servers table. ``tokens_served`` is this server's own count since it started, shown when
    records carry it (None otherwise)."""
    tokens = getattr(record, "tokens_served", None)
    return {
        "peer_id": peer_id,
        "public_name": record.public_name,
        "start": record.start,
        "end": record.end,
        "state": record.state.name.lower(),
        "throughput": round(record.throughput, 2),
        "cache_tokens_left": record.cache_tokens_left,
        "version": record.corolla_version,
        "dtype": record.dtype,
        "quant": record.quant,
        "weights": weights_label(record.dtype, record.quant),
        "adapters": list(record.adapters),
        "tokens_served": tokens if isinstance(tokens, int) else None,
        "relayed": bool(getattr(record, "relayed", False)),
        "relay": getattr(record, "relay", None),
    }


def model_state(name: str, num_blocks: int, records: Mapping[int, Mapping[str, ServerRecord]]) -> dict[str, Any]:
    """Coverage of one model: servers per block (ONLINE only), missing blocks, and every server seen."""
    per_block = [0] * num_blocks
    servers: dict[str, dict[str, Any]] = {}
    for block, by_peer in records.items():
        for peer_id, record in by_peer.items():
            if record.state == ServerState.ONLINE and 0 <= block < num_blocks:
                per_block[block] += 1
            servers.setdefault(peer_id, server_entry(peer_id, record))
    missing = [i for i, n in enumerate(per_block) if n == 0]
    return {
        "name": name,
        "num_blocks": num_blocks,
        "servers_per_block": per_block,
        "missing_blocks": missing,
        "missing": format_blocks(missing),
        "healthy": not missing and num_blocks > 0,
        "servers": sorted(servers.values(), key=lambda s: (s["start"], s["end"], s["peer_id"])),
    }


def swarm_state(models: Mapping[str, dict[str, Any]], updated: float, refresh: float, error: str | None) -> dict:
    """The whole document served at ``/api/v1/state``."""
    return {
        "version": STATE_VERSION,
        "updated": updated,  # unix time of the last successful read (0: none yet)
        "refresh_seconds": refresh,
        "error": error,  # the last read's failure, if it failed
        "healthy": bool(models) and all(m["healthy"] for m in models.values()),
        "models": [models[name] for name in sorted(models)],
    }


class SwarmReader:
    """Reads every announced model's records every ``refresh`` seconds in a daemon thread.

    ``read_models`` and ``read_records`` are the DHT reads (``corolla.engine.dht.announce``'s, bound
    to one long-lived DHT peer); keeping them as arguments keeps this class free of the network.
    """

    def __init__(
        self,
        read_models: Callable[[], Mapping[str, int]],
        read_records: Callable[[str, range], Mapping[int, Mapping[str, ServerRecord]]],
        refresh: float,
    ) -> None:
        self._read_models = read_models
        self._read_records = read_records
        self.refresh = refresh
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, Any]] = {}
        self._updated = 0.0
        self._error: str | None = None
        self.reads = 0
        self.read_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corolla-monitor-reader", daemon=True)

    def start(self) -> None:
        """Start the reading thread (the first read happens at once)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading (waits for a read in progress, bounded)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def read_once(self) -> None:
        """Read every model now and replace the snapshot (a failed read keeps the last one, with its error)."""
        began = time.monotonic()
        try:
            models = {
                name: model_state(name, num_blocks, self._read_records(name, range(num_blocks)))
                for name, num_blocks in self._read_models().items()
            }
        except Exception as e:  # a read that fails is shown on the page; the reader keeps going
            logger.warning("reading the swarm failed: %s", e)
            with self._lock:
                self._error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            self._models = models
            self._updated = time.time()
            self._error = None
            self.reads += 1
            self.read_seconds = time.monotonic() - began

    def snapshot(self) -> dict[str, Any]:
        """The latest state document."""
        with self._lock:
            return swarm_state(dict(self._models), self._updated, self.refresh, self._error)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.read_once()
            self._stop.wait(max(0.0, self.refresh - (time.monotonic() - began)))

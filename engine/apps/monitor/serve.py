"""``corolla monitor``: one DHT peer for the life of the process, a reader thread, and the web page."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from corolla.engine.apps.web import before_serving, check_port_free, serve
from corolla.engine.config import check_limit
from corolla.engine.dht.announce import make_dht, read_models, read_records
from corolla.engine.dht.records import ServerRecord
from corolla.engine.dht.swarm_key import SwarmKeys
from corolla.engine.errors import CorollaError

logger = logging.getLogger(__name__)


def run_monitor(
    initial_peers: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    refresh: float = 5.0,
    swarm_keys: SwarmKeys | None = None,
) -> int:
    """Serve the swarm's health page at ``http://host:port/`` until SIGINT/SIGTERM. Returns an exit code."""
    initial_peers = before_serving("monitor", initial_peers)
    from corolla.engine.apps.monitor.app import create_monitor_app
    from corolla.engine.apps.monitor.state import SwarmReader

    try:
        check_limit("refresh", refresh)
    except ValueError as e:
        raise CorollaError(str(e)) from e
    check_port_free(host, port)
    dht = make_dht(initial_peers, "127.0.0.1", client_mode=True, swarm_keys=swarm_keys)
    timeout = max(10.0, 2 * refresh)

    def records(model: str, blocks: range) -> dict[int, dict[str, ServerRecord]]:
        return read_records(dht, model, list(blocks), timeout=timeout)

    reader = SwarmReader(lambda: read_models(dht, timeout=timeout), records, refresh)
    reader.start()
    try:

        def listening() -> None:
            logger.info("swarm monitor at http://%s:%d/ (reads the DHT every %.0f s)", host, port, refresh)

        serve(create_monitor_app(reader), host, port, listening)
    finally:
        reader.stop()
        dht.shutdown()
    return 0

"""The monitor's web app: the page, its JSON at ``/api/v1/state``, and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from corolla.engine.apps.monitor.page import PAGE
from corolla.engine.apps.monitor.state import SwarmReader
from corolla.engine.version import __version__


def render_metrics(state: dict[str, Any], reads: int, read_seconds: float) -> bytes:
    """Prometheus text for one state document (a fresh registry each time: models and peers come and go)."""
    registry = CollectorRegistry()
    blocks = Gauge("corolla_swarm_blocks", "Blocks of each model", ["model"], registry=registry)
    missing = Gauge("corolla_swarm_missing_blocks", "Blocks no ONLINE server hosts", ["model"], registry=registry)
    servers = Gauge("corolla_swarm_servers", "Servers by state", ["model", "state"], registry=registry)
    per_block = Gauge(
        "corolla_swarm_block_servers", "ONLINE servers of each block", ["model", "block"], registry=registry
    )
    throughput = Gauge(
        "corolla_swarm_server_throughput", "Announced tokens/s of each server", ["model", "peer"], registry=registry
    )
    cache = Gauge(
        "corolla_swarm_server_cache_tokens_left",
        "Free cache of each server, tokens",
        ["model", "peer"],
        registry=registry,
    )
    updated = Gauge("corolla_monitor_last_read_timestamp", "Unix time of the last good DHT read", registry=registry)
    read_count = Gauge("corolla_monitor_reads", "Good DHT reads since start", registry=registry)
    read_time = Gauge("corolla_monitor_read_seconds", "Seconds the last good read took", registry=registry)
    for model in state["models"]:
        name = model["name"]
        blocks.labels(name).set(model["num_blocks"])
        missing.labels(name).set(len(model["missing_blocks"]))
        for i, n in enumerate(model["servers_per_block"]):
            per_block.labels(name, str(i)).set(n)
        for s in ("online", "joining", "offline"):
            servers.labels(name, s).set(sum(1 for row in model["servers"] if row["state"] == s))
        for row in model["servers"]:
            throughput.labels(name, row["peer_id"]).set(row["throughput"])
            cache.labels(name, row["peer_id"]).set(row["cache_tokens_left"])
    updated.set(state["updated"])
    read_count.set(reads)
    read_time.set(read_seconds)
    return generate_latest(registry)


def create_monitor_app(reader: SwarmReader) -> FastAPI:
    """The app serving ``reader``'s snapshots (the reader is started and stopped by the caller)."""
    app = FastAPI(title="Corolla swarm monitor", version=__version__, docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/api/v1/state")
    async def state() -> dict[str, Any]:
        return reader.snapshot()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = render_metrics(reader.snapshot(), reader.reads, reader.read_seconds)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        snap = reader.snapshot()
        return {"status": "ok", "healthy": snap["healthy"], "updated": snap["updated"]}

    return app

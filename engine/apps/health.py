"""Swarm health: which servers cover which blocks of each model (``corolla health`` and a Python call)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from corolla.engine.dht.announce import make_dht, read_models, read_records
from corolla.engine.dht.records import ServerState
from corolla.engine.dht.swarm_key import SwarmKeys
from corolla.engine.errors import format_blocks
from corolla.engine.routing.reports import read_reports


@dataclass(frozen=True)
class ServerHealth:
    """One server as the swarm sees it."""

    peer_id: str
    public_name: str | None
    start: int
    end: int
    state: str
    throughput: float  # tokens/s per block
    cache_tokens_left: int
    version: str
    dtype: str
    quant: str = "none"  # weight quantization the server announced: none, int8 or nf4
    adapters: tuple[str, ...] = ()  # LoRA adapters it serves
    tokens_served: int = 0  # tokens this server processed for clients since it started (its record's own count)
    relayed: bool = False  # peers cannot dial it: clients reach it through a relay
    relay: str | None = None  # the relay's peer id, when relayed
    reported: str | None = None  # why this machine's clients caught it lying (the latest report), if they did


def weights_label(dtype: str, quant: str) -> str:
    """How a server holds its weights, e.g. ``float32`` or ``bfloat16+int8`` (quantized servers are not exact)."""
    return (dtype or "?") + ("" if quant in ("", "none") else f"+{quant}")


@dataclass
class ModelHealth:
    """Coverage of one model's blocks."""

    model: str
    num_blocks: int
    servers: list[ServerHealth] = field(default_factory=list)
    servers_per_block: list[int] = field(default_factory=list)

    @property
    def missing_blocks(self) -> list[int]:
        """Blocks no ONLINE server hosts."""
        return [i for i, n in enumerate(self.servers_per_block) if n == 0]

    @property
    def healthy(self) -> bool:
        """Every block has at least one ONLINE server."""
        return not self.missing_blocks

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``--json`` and web pages)."""
        data = asdict(self)
        data["missing_blocks"] = self.missing_blocks
        data["healthy"] = self.healthy
        return data


def model_health(dht: Any, model: str, num_blocks: int) -> ModelHealth:
    """Read one model's records from the DHT and summarise them (with this machine's reports of liars)."""
    records = read_records(dht, model, range(num_blocks))
    reported = {r.peer_id: f"lied about blocks {r.start}:{r.end}: {r.reason}" for r in read_reports(model=model)}
    servers: dict[str, ServerHealth] = {}
    per_block = [0] * num_blocks
    for block, by_peer in records.items():
        for peer_id, r in by_peer.items():
            if r.state == ServerState.ONLINE:
                per_block[block] += 1
            servers.setdefault(
                peer_id,
                ServerHealth(
                    peer_id=peer_id,
                    public_name=r.public_name,
                    start=r.start,
                    end=r.end,
                    state=r.state.name.lower(),
                    throughput=r.throughput,
                    cache_tokens_left=r.cache_tokens_left,
                    version=r.corolla_version,
                    dtype=r.dtype,
                    quant=r.quant,
                    adapters=tuple(r.adapters),
                    tokens_served=r.tokens_served,
                    relayed=r.relayed,
                    relay=r.relay,
                    reported=reported.get(peer_id),
                ),
            )
    ordered = sorted(servers.values(), key=lambda s: (s.start, s.end, s.peer_id))
    return ModelHealth(model, num_blocks, ordered, per_block)


def swarm_health(dht: Any, model: str | None = None, num_blocks: int | None = None) -> list[ModelHealth]:
    """Health of ``model`` (or of every model announced in the swarm)."""
    models = read_models(dht)
    if model is not None:
        count = num_blocks or models.get(model)
        if count is None:
            return [ModelHealth(model, 0)]
        models = {model: count}
    return [model_health(dht, name, count) for name, count in sorted(models.items())]


def format_table(reports: Sequence[ModelHealth]) -> str:
    """Human-readable report."""
    lines: list[str] = []
    for r in reports:
        status = "healthy" if r.healthy and r.num_blocks else "MISSING " + format_blocks(r.missing_blocks or [0])
        lines.append(f"{r.model}: {r.num_blocks} blocks, {len(r.servers)} servers, {status}")
        if r.num_blocks:
            lines.append("  servers per block: " + " ".join(str(n) for n in r.servers_per_block))
        lines.append(
            f"  {'peer':<10} {'name':<16} {'span':<9} {'state':<8} {'tok/s/blk':>9} {'cache tok':>10} {'served':>9} {'weights':<14} version"
        )
        for s in r.servers:
            lines.append(
                f"  …{s.peer_id[-8:]:<9} {(s.public_name or '-')[:16]:<16} {f'{s.start}:{s.end}':<9} {s.state:<8} "
                f"{s.throughput:>9.1f} {s.cache_tokens_left:>10} {s.tokens_served:>9} {weights_label(s.dtype, s.quant):<14} {s.version}"
                + (f"  adapters: {', '.join(s.adapters)}" if s.adapters else "")
                + (f"  relayed via …{(s.relay or '?')[-8:]}" if s.relayed else "")
                + ("  REPORTED" if s.reported else "")
            )
        for s in r.servers:
            if s.reported:
                lines.append(f"  REPORTED …{s.peer_id[-8:]} by a client on this machine: {s.reported}")
    if not reports:
        lines.append("no models are announced in this swarm")
    return "\n".join(lines)


def run_health(
    model: str | None,
    initial_peers: Sequence[str],
    as_json: bool,
    num_blocks: int | None,
    swarm_keys: SwarmKeys | None = None,
) -> int:
    """``corolla health``: print the report; exit code 1 if any block of any model has no server."""
    dht = make_dht(initial_peers, "127.0.0.1", client_mode=True, swarm_keys=swarm_keys)
    try:
        reports = swarm_health(dht, model, num_blocks)
    finally:
        dht.shutdown()
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
    else:
        sys.stdout.write(format_table(reports) + "\n")
    return 0 if reports and all(r.healthy and r.num_blocks for r in reports) else 1

"""Server life cycle: join the swarm, pick and load a span, serve it, keep announcing, leave cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from corolla.engine.config import PROTOCOL_VERSION, ServerConfig, parse_span
from corolla.engine.dht.announce import announce_span, make_dht, read_records, withdraw_span
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.models.checkpoint import Checkpoint, load_span, parse_dtype
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.handler import Handler
from corolla.engine.version import __version__

logger = logging.getLogger(__name__)


def first_unserved_span(coverage: list[int], num_blocks: int) -> tuple[int, int]:
    """The span of ``num_blocks`` that starts at the first block nobody serves (else the least-served window)."""
    total = len(coverage)
    num_blocks = max(1, min(num_blocks, total))
    for i, count in enumerate(coverage):
        if count == 0:
            start = min(i, total - num_blocks)
            return start, start + num_blocks
    sums = [sum(coverage[s : s + num_blocks]) for s in range(total - num_blocks + 1)]
    start = sums.index(min(sums))
    return start, start + num_blocks


class Server:
    """A Corolla server process: ``Server(cfg).run()`` blocks until SIGINT/SIGTERM."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.ckpt = Checkpoint(cfg.model, token=cfg.token)
        self.model_config = self.ckpt.config()
        self.dht_prefix = cfg.dht_prefix or self.ckpt.default_dht_prefix
        self.total_blocks = int(self.model_config.num_hidden_layers)
        self.dtype = parse_dtype(cfg.dtype, cfg.device)
        self._stop = asyncio.Event()
        # DHT calls block; they get their own threads so a dead DHT cannot stall exit (no waiting on them).
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="corolla-dht")

    def run(self) -> None:
        """Serve until asked to stop."""
        if self.cfg.num_threads > 0:
            torch.set_num_threads(self.cfg.num_threads)
        # Start the DHT (a forked process) before any signal handler is installed: a child that inherited
        # asyncio's handlers would ignore SIGTERM and could never be stopped.
        peers = () if self.cfg.new_swarm else self.cfg.initial_peers
        dht = make_dht(
            peers,
            self.cfg.host,
            self.cfg.port,
            nat_port_map=self.cfg.nat_port_map,
            announce_host=self.cfg.announce_host,
        )
        try:
            asyncio.run(self._main(dht))
        finally:
            self._io.shutdown(wait=False, cancel_futures=True)
            dht.shutdown()

    def _choose_span(self, dht: Any) -> tuple[int, int]:
        if self.cfg.blocks:
            return parse_span(self.cfg.blocks, self.total_blocks)
        records = read_records(dht, self.dht_prefix, range(self.total_blocks))
        coverage = [
            sum(1 for r in by_peer.values() if r.state != ServerState.OFFLINE) for _, by_peer in sorted(records.items())
        ]
        return first_unserved_span(coverage, self.cfg.num_blocks or self.total_blocks)

    def _record(self, backend: SpanBackend | None, state: ServerState, start: int, end: int) -> ServerRecord:
        return ServerRecord(
            state=state,
            start=start,
            end=end,
            throughput=float(self.cfg.extra.get("throughput", 0.0)),
            inference_rps=float(self.cfg.extra.get("inference_rps", 0.0)),
            cache_tokens_left=backend.cache_tokens_left() if backend else 0,
            public_name=self.cfg.public_name,
            corolla_version=__version__,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    async def _main(self, dht: Any) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        peer_id = dht.peer_id.to_base58()
        maddrs = [str(a) for a in dht.get_visible_maddrs()]
        if self.cfg.new_swarm:
            logger.info("new swarm: others join with --initial-peers %s", " ".join(maddrs))
        backend: SpanBackend | None = None
        start, end = await loop.run_in_executor(self._io, self._choose_span, dht)
        try:
            joining = self._record(None, ServerState.JOINING, start, end)
            await loop.run_in_executor(
                self._io, announce_span, dht, self.dht_prefix, peer_id, joining, self.cfg.record_ttl
            )
            logger.info("loading blocks %d:%d of %s (%s, %s)", start, end, self.cfg.model, self.cfg.device, self.dtype)
            span = await loop.run_in_executor(
                self._io, load_span, self.ckpt, self.model_config, start, end, self.dtype, self.cfg.device
            )
            backend = SpanBackend(span, self.model_config, self.cfg, self.dtype)
            info = {
                "version": PROTOCOL_VERSION,
                "corolla_version": __version__,
                "model": self.dht_prefix,
                "start": start,
                "end": end,
                "dtype": str(self.dtype).removeprefix("torch."),
                "hidden_size": backend.hidden_size,
                "max_length": self.cfg.max_length,
                "max_batch_size": self.cfg.max_batch_size,
                "public_name": self.cfg.public_name,
            }
            handler = Handler(backend, info, self.cfg.session_idle_timeout)
            p2p = await dht.replicate_p2p()
            await handler.register(p2p)
            logger.info(
                "serving blocks %d:%d of %s as %s at %s",
                start,
                end,
                self.dht_prefix,
                peer_id,
                " ".join(maddrs),
            )
            while not self._stop.is_set():
                record = self._record(backend, ServerState.ONLINE, start, end)
                await loop.run_in_executor(
                    self._io, announce_span, dht, self.dht_prefix, peer_id, record, self.cfg.record_ttl
                )
                self._write_status(backend, start, end, "online", maddrs)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._status_period())
        finally:
            logger.info("leaving the swarm: withdrawing blocks %d:%d", start, end)
            try:
                await loop.run_in_executor(
                    self._io,
                    withdraw_span,
                    dht,
                    self.dht_prefix,
                    peer_id,
                    self._record(None, ServerState.OFFLINE, start, end),
                )
            except Exception as e:  # leaving must not hang or crash on a broken DHT
                logger.warning("could not withdraw from the DHT: %s", e)
            if backend is not None:
                self._write_status(backend, start, end, "stopped", maddrs)
                backend.shutdown()

    def _status_period(self) -> float:
        return min(self.cfg.announce_period, 5.0) if self.cfg.status_file else self.cfg.announce_period

    def _write_status(self, backend: SpanBackend, start: int, end: int, state: str, maddrs: list[str]) -> None:
        if not self.cfg.status_file:
            return
        status = {
            "state": state,
            "model": self.dht_prefix,
            "blocks": f"{start}:{end}",
            "tokens_processed": backend.tokens_processed,
            "sessions": len(backend.sessions),
            "maddrs": maddrs,
            "peer_id": maddrs[0].rsplit("/p2p/", 1)[-1] if maddrs else None,
            "pid": os.getpid(),
            "time": time.time(),
        }
        path = Path(self.cfg.status_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(path)

"""Server life cycle: join the swarm, pick and load a span, serve it, keep announcing, move when the
swarm would clearly gain, and leave cleanly (withdrawing the span) on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P, P2PDaemonError

from corolla.engine import procs
from corolla.engine.config import PROTOCOL_VERSION, ServerConfig, parse_span
from corolla.engine.dht.announce import (
    announce_model,
    announce_span,
    make_dht,
    read_models,
    read_online_servers,
    read_records,
    withdraw_span,
)
from corolla.engine.dht.contribution import load_identity
from corolla.engine.dht.peers import tcp_endpoint
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.dht.swarm_key import load_keys
from corolla.engine.errors import CorollaError
from corolla.engine.hub import check_model_access, resolve_token
from corolla.engine.models.checkpoint import Checkpoint, load_span, parse_dtype
from corolla.engine.models.gguf import cache_root
from corolla.engine.models.lora import attach_adapters, read_adapter
from corolla.engine.models.quant import check_quant, tensor_bytes
from corolla.engine.routing.spans import RemoteSpan, spans_from_records
from corolla.engine.server.backend import SpanBackend
from corolla.engine.server.block_selection import choose_best_blocks, should_choose_other_blocks
from corolla.engine.server.contributors import ContributorBook
from corolla.engine.server.dialback import DialBack, check_reachability
from corolla.engine.server.handler import Handler
from corolla.engine.server.ledger import Ledger
from corolla.engine.server.memory import server_memory_plan
from corolla.engine.server.reachability import (
    ALL_INTERFACES,
    LOOPBACK,
    Reachability,
    announce_maddrs,
    circuits_to_announce,
    free_port,
    interface_addresses,
    is_circuit,
    listen_host,
    peer_ids,
    reach_line,
    reachable_line,
    relay_daemon_args,
    relayed_line,
    relays_in,
    switch_line,
    unannounced,
)
from corolla.engine.server.throughput import Speed, block_speed
from corolla.engine.version import __version__
from corolla.engine.wire.membership import MembershipGate

logger = logging.getLogger(__name__)


class Server:
    """A Corolla server process: ``Server(cfg).run()`` blocks until SIGINT/SIGTERM."""

    def __init__(self, cfg: ServerConfig) -> None:
        if cfg.announce_host and not cfg.port:
            raise CorollaError("--announce-host needs a fixed --port (the one forwarded to this machine)")
        # Where to listen, resolved once: no --host means all interfaces when joining peers elsewhere.
        host = listen_host(cfg.host, cfg.initial_peers, cfg.new_swarm)
        port = free_port() if host == ALL_INTERFACES and not cfg.port else cfg.port  # announced before binding
        self.cfg = cfg = dataclasses.replace(cfg, host=host, port=port)
        # The token: --token-file or COROLLA_TOKEN (cfg.token), else HF_TOKEN, else `hf auth login`'s.
        token = resolve_token(cfg.token)
        self.ckpt = Checkpoint(cfg.model, token=token)
        if not self.ckpt.is_local:
            check_model_access(cfg.model, token)  # unknown repo, gated, offline: a clear message, no traceback
        self.model_config = self.ckpt.config()
        self.dht_prefix = cfg.dht_prefix or self.ckpt.default_dht_prefix
        self.total_blocks = int(self.model_config.num_hidden_layers)
        try:
            self.dtype = parse_dtype(cfg.dtype, cfg.device)
            self.quant = check_quant(cfg.quant)
        except ValueError as e:
            raise CorollaError(str(e)) from e
        # Weights, cache and activations under --max-memory; the cache budget gets what the blocks leave.
        self.memory = server_memory_plan(self.model_config, cfg, self.dtype, self.quant, self.ckpt.weight_format())
        self.cfg = cfg = dataclasses.replace(cfg, cache_bytes=self.memory.cache_bytes)
        logger.info("memory: %s", self.memory.describe())
        self.dtype = parse_dtype(cfg.dtype, cfg.device)
        self.adapters = [read_adapter(path) for path in cfg.adapters]  # bad folders fail here, before joining
        self.speed = Speed(0.0, 0.0)
        self.num_blocks = 0
        # The peer id, and the key that signs this server's records (kept in --identity-file if given).
        self.identity = load_identity(cfg.identity_file, create=True) if cfg.identity_file else PeerIdentity.generate()
        self.swarm_keys = load_keys(cfg.swarm_key_file)  # None: a public swarm
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self.reachability: Reachability | None = None  # what peers found dialling back (None: not checked)
        self._announced: list[str] = []  # the addresses the running p2p daemon announces
        self.relayed = False  # peers cannot dial this server: it serves through relays
        self.relays: list[str] = []  # peer ids of the relays a relayed server is reached through now
        # DHT calls block; they get their own threads so a dead DHT cannot stall exit (no waiting on them).
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="corolla-dht")

    def run(self) -> None:
        """Serve until asked to stop."""
        if self.cfg.parent_pid:
            procs.exit_with_owner(self.cfg.parent_pid, grace=30.0)  # SIGTERM: leave the swarm, then exit
        if self.cfg.num_threads > 0:
            torch.set_num_threads(self.cfg.num_threads)
        # Start the DHT (a forked process) before any signal handler is installed: a child that inherited
        # asyncio's handlers would ignore SIGTERM and could never be stopped.
        peers = () if self.cfg.new_swarm else self.cfg.initial_peers
        host = self.cfg.host or LOOPBACK  # resolved in __init__
        dht = self._start_dht(peers, host)
        if host != LOOPBACK and peer_ids(peers):
            # Can peers dial us? Ask them before anything is announced; if not, serve through relays.
            try:
                self.reachability = asyncio.run(self._check_reachability(dht))
            except Exception as e:  # a failed check must not stop the server: it serves directly as before
                logger.warning("could not check reachability: %s", e or type(e).__name__)
            if self.reachability is not None and self.reachability.behind_nat:
                logger.info("peers could not dial this server back: restarting its p2p daemon to serve through a relay")
                dht.shutdown()
                self.relayed = True
                dht = self._start_relayed_dht(peers, host)
            elif not self.cfg.announce_host and (unseen := unannounced(self.reachability, self._announced)):
                # Nothing is announced yet: a restart costs no session, and clients get an address they can dial.
                logger.info("peers reached this server at %s, which it did not announce: restarting its p2p daemon to announce it", " ".join(unseen))  # fmt: skip
                dht.shutdown()
                reachable = self.reachability.reachable if self.reachability else ()
                dht = self._start_dht(peers, host, reachable=reachable)
        try:
            while asyncio.run(self._main(dht)):  # a re-check found the network changed: serve the other way
                dht.shutdown()
                if self.relayed:
                    dht = self._start_relayed_dht(peers, host)
                else:
                    dht = self._start_dht(
                        peers, host, reachable=self.reachability.reachable if self.reachability else ()
                    )
        finally:
            self._io.shutdown(wait=False, cancel_futures=True)
            dht.shutdown()

    def _start_dht(self, peers: Any, host: str, relays: list[str] | None = None, reachable: Sequence[str] = ()) -> Any:
        """Start this server's DHT peer and p2p daemon (through ``relays`` if peers cannot dial it).

        ``reachable``: addresses where peers dialled it back (a forwarded port's), announced first.
        """
        announce = announce_maddrs(
            host, self.cfg.port, interface_addresses(), self.cfg.announce_host, self.cfg.announce_port
        )
        if not self.cfg.announce_host:
            announce = [*reachable, *(maddr for maddr in announce if maddr not in reachable)]
        self._announced = [] if relays else announce
        with self.identity.identity_file() as identity_path:  # removed once the daemon has read it
            dht = make_dht(
                peers,
                host,
                self.cfg.port,
                nat_port_map=self.cfg.nat_port_map,
                announce_maddrs=() if relays else announce,  # never announce addresses nobody can dial
                identity_path=identity_path,
                swarm_keys=self.swarm_keys,
                relays=relays or (),
                daemon_args=relay_daemon_args(offer=not self.cfg.no_relay and not relays),
            )
        if dht.peer_id.to_base58() != self.identity.peer_id:  # its records would carry no valid signature
            dht.shutdown()
            raise CorollaError(
                f"the p2p daemon runs as {dht.peer_id}, not as this server's key {self.identity.peer_id}"
            )
        return dht

    def _start_relayed_dht(self, peers: Any, host: str, attempts: int = 3) -> Any:
        """The DHT again, behind relays; the peers may still hold the old daemon's connection: a few tries."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_dht(peers, host, relays=[p for p in peers if "/p2p/" in p])
            except (RuntimeError, P2PDaemonError) as e:  # hivemind's bootstrap failure is a RuntimeError
                if attempt == attempts:
                    raise
                logger.info("joining through relays failed (%s); trying again", e)
                time.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    async def _check_reachability(self, dht: Any) -> Reachability:
        """Ask the initial peers to dial this server's port back (a p2p replica of its own, closed after)."""
        p2p = await P2P.replicate(dht.run_coroutine(_daemon_listen_maddr))
        try:
            return await self._ask_dial_back(p2p)
        finally:
            await p2p.shutdown()

    async def _ask_dial_back(self, p2p: Any) -> Reachability:
        ports = [self.cfg.port] + ([self.cfg.announce_port] if self.cfg.announce_port else [])
        return await check_reachability(p2p, peer_ids(self.cfg.initial_peers), ports)

    def _visible_maddrs(self, dht: Any) -> list[str]:
        """This server's addresses as its daemon says them now (a relayed server's: its circuits)."""
        maddrs = [str(a) for a in dht.get_visible_maddrs(latest=True)]
        return [m for m in maddrs if is_circuit(m)] if self.relayed else maddrs

    async def _wait_for_circuits(self, dht: Any, timeout: float = 30.0) -> list[str]:
        """A relayed server's circuit addresses, once a relay took it (empty after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            circuits = await self._run_io(self._visible_maddrs, dht)
            if circuits or time.monotonic() >= deadline:
                return list(circuits)
            await asyncio.sleep(0.5)

    # ---- placement --------------------------------------------------------------------------
    @property
    def throughput(self) -> float:
        """Tokens/s this server pushes through its whole span (compute-bound estimate)."""
        if self.cfg.throughput is not None:
            return self.cfg.throughput
        return self.speed.forward_rps / max(1, self.num_blocks)

    def _swarm_spans(self, dht: Any) -> dict[str, RemoteSpan]:
        records = read_records(dht, self.dht_prefix, range(self.total_blocks))
        return spans_from_records(
            records, num_blocks=self.total_blocks, states=(ServerState.JOINING, ServerState.ONLINE)
        )

    def _choose_span(self, dht: Any, peer_id: str) -> tuple[int, int]:
        if self.cfg.blocks:
            return parse_span(self.cfg.blocks, self.total_blocks)
        spans = self._swarm_spans(dht)
        spans.pop(peer_id, None)
        start = choose_best_blocks(self.num_blocks, spans, self.total_blocks, self.throughput)
        return start, start + self.num_blocks

    def _should_move(self, dht: Any, peer_id: str) -> bool:
        spans = self._swarm_spans(dht)
        if peer_id not in spans:
            return False
        return should_choose_other_blocks(peer_id, spans, self.total_blocks, self.cfg.balance_quality)

    def _record(self, backend: SpanBackend | None, state: ServerState, start: int, end: int) -> ServerRecord:
        return ServerRecord(
            state=state,
            start=start,
            end=end,
            throughput=self.throughput,
            inference_rps=self.speed.inference_rps,
            cache_tokens_left=backend.cache_tokens_left() if backend else 0,
            public_name=self.cfg.public_name,
            corolla_version=__version__,
            dtype=str(self.dtype).removeprefix("torch."),
            quant=self.quant,
            tokens_served=self.ledger.served,  # this server's own count; the machine's totals go to the status file
            adapters=tuple(adapter.name for adapter in self.adapters),
            relayed=self.relayed,
            relay=self.relays[0] if self.relays else None,
        )

    # ---- main loop --------------------------------------------------------------------------
    async def _run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _main(self, dht: Any) -> bool:
        """Serve through ``dht`` until stopped (False) or until a re-check finds the network changed (True)."""
        self._stop = asyncio.Event()  # bound to this run's loop
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_cancellations)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        peer_id = dht.peer_id.to_base58()
        p2p = await dht.replicate_p2p()
        await DialBack.register(p2p)  # every server answers other servers' reachability checks
        if self.relayed:
            maddrs = await self._wait_for_circuits(dht)
            self.relays = relays_in(maddrs)
            logger.info("%s", relayed_line(maddrs))
        else:
            maddrs = [str(a) for a in dht.get_visible_maddrs()]
            announced = [m.split("/p2p/")[0] for m in maddrs]
            port = self.cfg.port or next((e[1] for m in maddrs if (e := tcp_endpoint(m))), 0)
            found = self.reachability
            line = (
                reachable_line(found)
                if found and found.reachable
                else reach_line(self.cfg.host or LOOPBACK, port, announced)
            )
            logger.info("%s", line)
        if self.cfg.new_swarm:
            logger.info("new swarm: others join with --initial-peers %s", " ".join(maddrs))
        else:
            await self._run_io(read_models, dht)  # PrivateSwarmError if the swarm is private and we lack its key
        if self.cfg.throughput is None:
            self.speed = await self._run_io(
                block_speed, self.model_config, self.cfg.device, self.dtype, cache_root() / "throughput", self.quant
            )
        self.num_blocks = self.memory.num_blocks
        handler = await Handler.create(
            p2p,
            self.cfg,
            gate=MembershipGate(self.swarm_keys),
            contributors=ContributorBook(lambda: read_online_servers(dht)),
            identity=self.identity,
        )
        start, end = await self._run_io(self._choose_span, dht, peer_id)
        self.num_blocks = end - start
        while True:
            moved_to = await self._serve_span(dht, handler, p2p, peer_id, maddrs, start, end)
            if moved_to is None:
                return not self._stop.is_set()
            start, end = moved_to

    async def _serve_span(
        self, dht: Any, handler: Handler, p2p: Any, peer_id: str, maddrs: list[str], start: int, end: int
    ) -> tuple[int, int] | None:
        """Load and serve ``start:end`` until stopped or the network changed (None), or moving pays off (the new span)."""
        backend: SpanBackend | None = None
        leaving = "moving"
        try:
            joining = self._record(None, ServerState.JOINING, start, end)
            await self._run_io(announce_span, dht, self.dht_prefix, self.identity, joining, self.cfg.record_ttl)
            logger.info("loading blocks %d:%d of %s (%s, %s)", start, end, self.cfg.model, self.cfg.device, self.dtype)
            span = await self._run_io(
                load_span, self.ckpt, self.model_config, start, end, self.dtype, self.cfg.device, self.quant
            )
            attach_adapters(span, self.adapters)
            backend = SpanBackend(span, self.model_config, self.cfg, self.dtype, ledger=self.ledger)
            handler.serve(backend, self._info(start, end, backend))
            logger.info(
                "serving blocks %d:%d of %s as %s at %s", start, end, self.dht_prefix, peer_id, " ".join(maddrs)
            )
            next_check = time.monotonic() + self._rebalance_delay()
            next_reach = time.monotonic() + self.cfg.reachability_period
            while not self._stop.is_set():
                if self.relayed:
                    await self._follow_relays(dht, p2p, maddrs)
                if self.reachability is not None and time.monotonic() >= next_reach:
                    next_reach = time.monotonic() + self.cfg.reachability_period
                    if await self._recheck_reachability(p2p):
                        leaving = "reconnecting"
                        return None
                await self._run_io(self.ledger.save)
                record = self._record(backend, ServerState.ONLINE, start, end)
                await self._run_io(announce_span, dht, self.dht_prefix, self.identity, record, self.cfg.record_ttl)
                await self._run_io(
                    announce_model, dht, self.dht_prefix, self.identity, self.total_blocks, self.cfg.record_ttl
                )
                self._write_status(backend, start, end, "online", maddrs, peer_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._status_period())
                if not self.cfg.blocks and time.monotonic() >= next_check and not self._stop.is_set():
                    next_check = time.monotonic() + self._rebalance_delay()
                    if await self._run_io(self._should_move, dht, peer_id):
                        new = await self._run_io(self._choose_span, dht, peer_id)
                        if new != (start, end):
                            logger.info(
                                "moving from blocks %d:%d to %d:%d: the swarm needs them more", start, end, *new
                            )
                            return tuple(new)  # type: ignore[return-value]
            return None
        finally:
            handler.stop_serving()
            offline = self._record(None, ServerState.OFFLINE, start, end)
            logger.info("withdrawing blocks %d:%d", start, end)
            try:
                await self._run_io(withdraw_span, dht, self.dht_prefix, self.identity, offline, self.cfg.record_ttl)
            except Exception as e:  # leaving must not hang or crash on a broken DHT
                logger.warning("could not withdraw from the DHT: %s", e or type(e).__name__)
            await self._run_io(self.ledger.save)
            if backend is not None:
                self._write_status(backend, start, end, "stopped" if self._stop.is_set() else leaving, maddrs, peer_id)
                backend.shutdown()

    async def _follow_relays(self, dht: Any, p2p: Any, maddrs: list[str]) -> None:
        """A relayed server: take the circuits its daemon has now (another relay once one dies) and say so."""
        now = await self._run_io(self._visible_maddrs, dht)
        if not now and maddrs:  # none listed for a moment: keep those through relays still connected
            now = circuits_to_announce(now, maddrs, [info.peer_id.to_base58() for info in await p2p.list_peers()])
        if relays_in(now) != self.relays:
            self.relays = relays_in(now)
            maddrs[:] = now
            logger.info("%s", relayed_line(now))

    async def _recheck_reachability(self, p2p: Any) -> bool:
        """Ask peers again (the network may have changed). True: it did, the other way round (behind a NAT
        now, or dialable now); the caller then restarts the p2p daemon to serve that way."""
        try:
            found = await self._ask_dial_back(p2p)
        except Exception as e:  # a failed re-check changes nothing
            logger.debug("reachability re-check failed: %s", e)
            return False
        if not found.known:
            return False
        self.reachability = found
        if found.behind_nat == self.relayed:
            return False
        logger.warning("%s", switch_line(found))
        self.relayed, self.relays = found.behind_nat, []
        return True

    def _rebalance_delay(self) -> float:
        return self.cfg.rebalance_period * random.uniform(0.75, 1.25)

    def _status_period(self) -> float:
        period = self.cfg.announce_period
        if self.cfg.status_file:
            period = min(period, 5.0)
        if not self.cfg.blocks:
            period = min(period, self.cfg.rebalance_period)
        return period

    def _info(self, start: int, end: int, backend: SpanBackend) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "corolla_version": __version__,
            "model": self.dht_prefix,
            "start": start,
            "end": end,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant": self.quant,
            "hidden_size": backend.hidden_size,
            "max_length": self.cfg.max_length,
            "max_batch_size": self.cfg.max_batch_size,
            "public_name": self.cfg.public_name,
            "throughput": self.throughput,
            "inference_rps": self.speed.inference_rps,
            "forwarding": True,  # takes pushed inputs and pushes outputs to next hops (Step.from_peer, next_peer)
        }

    def _write_status(
        self, backend: SpanBackend, start: int, end: int, state: str, maddrs: list[str], peer_id: str
    ) -> None:
        if not self.cfg.status_file:
            return
        status = {
            "state": state,
            "model": self.dht_prefix,
            "blocks": f"{start}:{end}",
            "tokens_processed": backend.tokens_processed,
            "tokens_served_today": self.ledger.totals()["today"],
            "tokens_served_total": self.ledger.totals()["total"],
            "sessions": len(backend.sessions),
            **backend.prefix_counters(),
            "maddrs": maddrs,
            "peer_id": peer_id,
            "relayed": self.relayed,
            "relays": list(self.relays),
            "pid": os.getpid(),
            "memory": {**dataclasses.asdict(self.memory), "weights_loaded": tensor_bytes(backend.span.layers)},
            "time": time.time(),
        }
        path = Path(self.cfg.status_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(path)


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's error handler: a stream handler cancelled as the loop ends (the p2p daemon restarting) is no error."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _daemon_listen_maddr(dht: Any, node: Any) -> Any:
    """Where this DHT's p2p daemon takes control connections (run inside the DHT process)."""
    return node.p2p.daemon_listen_maddr

"""Every DHT read and write Corolla does, in one place.

The coroutines run inside hivemind's DHT process (``DHT.run_coroutine``), so they are module-level
functions bound with ``functools.partial`` and return plain picklable data.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time

from corolla.engine.dht.owned import OwnedDHT
from corolla.engine.dht.peers import check_initial_peers, unreachable_error
from corolla.engine.dht.records import ServerRecord, ServerState, block_key, count_models
from corolla.engine.dht.report_records import (
    MAX_REPORT_TTL,
    PublishedReport,
    ReportValidator,
    open_report,
    reports_key,
    seal_report,
)
from corolla.engine.dht.signing import PeerIdentity, SignedRecordValidator, key_id, open_envelope
from corolla.engine.dht.swarm_key import SwarmKeys, SwarmKeyValidator, foreign_records_seen, private_swarm_error

logger = logging.getLogger(__name__)


async def _store(
    dht: hivemind.DHT, node: DHTNode, keys: list[str], subkey: str, values: list[dict[str, Any]], expiration: float
) -> int:
    stored = await node.store_many(keys, values, expiration, subkeys=[subkey] * len(keys), await_all_replicas=False)
    return sum(bool(ok) for ok in stored.values())


async def _read(dht: hivemind.DHT, node: DHTNode, keys: list[str], latest: bool) -> dict[str, dict[str, Any]]:
    # hivemind answers a plain get from any unexpired value it holds, its local cache included, so a
    # node would not see servers that joined (or withdrew) since its first read until that value
    # expires. An infinite sufficient expiration makes it ask the peers that store the key and merge
    # the newest entry of every subkey (what ``DHTNode.get(latest=True)`` does for one key).
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    now = get_dht_time()
    out: dict[str, dict[str, Any]] = {}
    for key, item in found.items():
        if item is None or not hasattr(item.value, "items"):
            continue
        entries: dict[str, Any] = {}
        for subkey, entry in item.value.items():
            if entry.expiration_time >= now and isinstance(subkey, str):
                entries[subkey] = (entry.value, entry.expiration_time)
        out[key] = entries
    return out


async def _read_opened(
    dht: hivemind.DHT, node: DHTNode, keys: list[str], latest: bool
) -> dict[str, dict[str, tuple[dict[str, Any], float]]]:
    # Opened here, in the DHT's process, whose record validator has just checked these very signatures as
    # they came in (each is checked once per process, see signing.py): the caller gets plain values.
    raw = await _read(dht, node, keys, latest)
    out: dict[str, dict[str, tuple[dict[str, Any], float]]] = {}
    for key, entries in raw.items():
        kid = key_id(key)
        opened = {peer: (open_envelope(kid, peer, value, exp), exp) for peer, (value, exp) in entries.items()}
        out[key] = {peer: (value, exp) for peer, (value, exp) in opened.items() if value is not None}
    return out


def announce_span(
    dht: hivemind.DHT, model: str, identity: PeerIdentity, record: ServerRecord, ttl: float, timeout: float = 30.0
) -> int:
    """Announce ``record``, signed by ``identity``, under every block of its span; returns how many were stored."""
    keys = [block_key(model, i) for i in range(record.start, record.end)]
    expiration = get_dht_time() + ttl
    values = [identity.seal(key, record.to_dict(), expiration) for key in keys]
    coro = functools.partial(_store, keys=keys, subkey=identity.peer_id, values=values, expiration=expiration)
    stored: int = dht.run_coroutine(coro, return_future=True).result(timeout=timeout)
    return stored


def withdraw_span(
    dht: hivemind.DHT,
    model: str,
    identity: PeerIdentity,
    record: ServerRecord,
    linger: float = 10.0,
    timeout: float = 5.0,
) -> None:
    """Replace a server's records with OFFLINE ones that expire soon (the DHT cannot delete)."""
    offline = record.model_copy(update={"state": ServerState.OFFLINE, "cache_tokens_left": 0})
    announce_span(dht, model, identity, offline, linger, timeout)


def read_records(
    dht: hivemind.DHT, model: str, blocks: Sequence[int], timeout: float = 30.0, *, latest: bool = True
) -> dict[int, dict[str, ServerRecord]]:
    """Valid, unexpired server records of each block: ``{block: {peer_id: record}}``.

    With ``latest`` (the default: every caller decides something by who is online) the values come
    from the peers storing them, not from this node's cache. Malformed values (from a buggy or
    hostile peer) are skipped, never raised, and so is every value its peer id did not sign for this
    block and expiration (see ``signing.py``; checked in the DHT's process, which holds the signatures
    its validator checked as they arrived).
    """
    keys = [block_key(model, i) for i in blocks]
    future = dht.run_coroutine(functools.partial(_read_opened, keys=keys, latest=latest), return_future=True)
    raw: dict[str, dict[str, Any]] = future.result(timeout=timeout)
    out: dict[int, dict[str, ServerRecord]] = {i: {} for i in blocks}
    for i, key in zip(blocks, keys, strict=True):
        for peer_id, (value, _) in raw.get(key, {}).items():
            record = ServerRecord.from_dht(value)
            if record is not None and record.start <= i < record.end:
                out[i][peer_id] = record
    if not any(out.values()):
        check_not_private(dht, timeout)
    return out


async def _foreign_seen(dht: hivemind.DHT, node: DHTNode) -> tuple[int, bool] | None:
    return foreign_records_seen(node.protocol.record_validator)


def check_not_private(dht: hivemind.DHT, timeout: float = 30.0) -> None:
    """Raise PrivateSwarmError if this peer found records sealed with a swarm key it does not hold.

    Called when a read found nothing: "no servers" would mislead a peer that is simply not a member.
    """
    seen = dht.run_coroutine(_foreign_seen, return_future=True).result(timeout=timeout)
    if seen is not None and seen[0] > 0:
        raise private_swarm_error(seen[1])


MODELS_KEY = "_corolla.models"


def announce_model(
    dht: hivemind.DHT, model: str, identity: PeerIdentity, num_blocks: int, ttl: float, timeout: float = 30.0
) -> None:
    """List ``model`` (and its number of blocks) under the swarm's model index, signed, for `corolla health`."""
    expiration = get_dht_time() + ttl
    value = identity.seal(MODELS_KEY, {"model": model, "num_blocks": num_blocks}, expiration)
    coro = functools.partial(_store, keys=[MODELS_KEY], subkey=identity.peer_id, values=[value], expiration=expiration)
    dht.run_coroutine(coro, return_future=True).result(timeout=timeout)


def read_models(dht: hivemind.DHT, timeout: float = 30.0, *, latest: bool = True) -> dict[str, int]:
    """Models announced in the swarm: ``{name: num_blocks}`` (entries their server did not sign are skipped)."""
    future = dht.run_coroutine(functools.partial(_read, keys=[MODELS_KEY], latest=latest), return_future=True)
    raw: dict[str, dict[str, Any]] = future.result(timeout=timeout)
    index_id = key_id(MODELS_KEY)
    entries = [
        open_envelope(index_id, peer_id, value, exp) for peer_id, (value, exp) in raw.get(MODELS_KEY, {}).items()
    ]
    models = count_models(entry for entry in entries if entry is not None)
    if not models:
        check_not_private(dht, timeout)
    return models


def read_online_servers(dht: hivemind.DHT, timeout: float = 30.0) -> set[str]:
    """Peer ids with a signed, unexpired entry in the model index: servers that serve now (any model)."""
    future = dht.run_coroutine(functools.partial(_read, keys=[MODELS_KEY], latest=True), return_future=True)
    raw: dict[str, dict[str, Any]] = future.result(timeout=timeout)
    index_id = key_id(MODELS_KEY)
    return {
        peer_id
        for peer_id, (value, exp) in raw.get(MODELS_KEY, {}).items()
        if open_envelope(index_id, peer_id, value, exp) is not None
    }


def publish_report(
    dht: hivemind.DHT,
    identity: PeerIdentity,
    report: PublishedReport,
    ttl: float = MAX_REPORT_TTL,
    timeout: float = 30.0,
) -> bool:
    """Store ``report``, signed by ``identity`` (its reporter), under its model's reports key; whether it was stored.

    Raises:
        ReportTooLarge: the evidence is over the size bound (the caller keeps it locally only).
    """
    key = reports_key(report.model)
    expiration = get_dht_time() + min(ttl, MAX_REPORT_TTL)
    value = seal_report(identity, report, expiration)
    coro = functools.partial(_store, keys=[key], subkey=report.subkey, values=[value], expiration=expiration)
    stored: int = dht.run_coroutine(coro, return_future=True).result(timeout=timeout)
    return stored > 0


def read_published_reports(dht: hivemind.DHT, model: str, timeout: float = 30.0) -> list[PublishedReport]:
    """Valid, unexpired liar reports of ``model`` from the peers storing them (unsigned or malformed: skipped)."""
    key = reports_key(model)
    future = dht.run_coroutine(functools.partial(_read, keys=[key], latest=True), return_future=True)
    raw: dict[str, dict[str, Any]] = future.result(timeout=timeout)
    reports = []
    for subkey, (envelope, expiration) in raw.get(key, {}).items():
        report = open_report(key_id(key), subkey, envelope, expiration)
        if report is not None and report.model == model:
            reports.append(report)
    return reports


def make_dht(
    initial_peers: Sequence[str],
    host: str,
    port: int = 0,
    *,
    client_mode: bool = False,
    nat_port_map: bool = False,
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    swarm_keys: SwarmKeys | None = None,
    relays: Sequence[str] = (),
    daemon_args: dict[str, Any] | None = None,
) -> hivemind.DHT:
    """Start a hivemind DHT peer on ``host`` (loopback by default; no UPnP unless asked).

    Every peer refuses to store or believe a record under a peer id that its owner did not sign. A peer
    that announces records (a server) runs under the key in ``identity_path`` (see
    :meth:`PeerIdentity.identity_file`), read once when the daemon starts. With ``swarm_keys`` it is a member
    of a private swarm: its values are sealed with the key and values not sealed with one of the keys are
    dropped (see ``swarm_key.py``). Its process and p2p daemon
    exit when this process dies, by any signal (see :class:`OwnedDHT`).

    With ``relays`` (full multiaddrs of peers that relay) it is a peer others cannot dial: its daemon
    holds a slot at those relays and announces the relay circuit addresses, not its own. ``daemon_args``
    are extra p2pd flags (the relay service's, see ``reachability.relay_daemon_args``).
    """
    check_initial_peers(initial_peers)  # before the daemon starts: its own error names no address
    validators = [SignedRecordValidator(), ReportValidator(), SwarmKeyValidator(swarm_keys)]
    kwargs: dict[str, Any] = {"record_validators": validators}
    if announce_maddrs:  # what peers are told to dial, instead of where the daemon listens
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path:
        kwargs.update(identity_path=identity_path, check_if_identity_free=False)  # a fresh key: nobody has it
    daemon = dict(daemon_args or {})
    if client_mode:
        daemon.setdefault("relayService", 0)  # a client relays nobody
    if relays:  # not dialable: reserve slots at these relays now (static relays: no 3-minute discovery delay)
        kwargs.update(use_auto_relay=True, force_reachability="private", trusted_relays=list(relays))
        daemon["relayDiscovery"] = 0
    try:
        return OwnedDHT(
            initial_peers=list(initial_peers),
            start=True,
            client_mode=client_mode,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            nat_port_map=nat_port_map,
            num_workers=4,
            daemon_args=daemon,
            **kwargs,
        )
    except P2PDaemonError as e:
        if initial_peers and "bootstrap" in str(e):  # hivemind's only sign: "failed to connect to bootstrap peers"
            raise unreachable_error(initial_peers, e) from e
        raise

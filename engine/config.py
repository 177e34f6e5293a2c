"""One frozen config object per role. Every field: a unit and a meaning; env overrides: ``COROLLA_<FIELD>``."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

PROTOCOL_VERSION = 1


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def is_size_field(name: str) -> bool:
    """Config fields measured in bytes (they accept human sizes such as ``1GB``)."""
    return name.endswith("_bytes") or name == "max_memory"


def parse_size(text: str | int) -> int:
    """Bytes from a human size: ``"1GB"`` (10**9), ``"512MiB"`` (2**29), ``"1.5 GiB"``, ``"1048576"``.

    Raises:
        ValueError: not a size (the message shows the accepted forms).
    """
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"not a size: {text!r} (write bytes, or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. 1GB)"
        )
    return round(float(m.group(1)) * _SIZE_UNITS[unit])


def format_size(num_bytes: int) -> str:
    """The shortest exact human form of a byte count: ``format_size(2**29) == "512MiB"``, ``format_size(24 * 10**9)
    == "24GB"``."""
    for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "KB"):  # the largest unit that divides it
        factor = _SIZE_UNITS[unit.lower()]
        if num_bytes and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return str(num_bytes)


@dataclass(frozen=True)
class Limit:
    """The range a numeric option may take: ``low`` (included unless ``open_low``) up to ``high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def problem(self, value: float) -> str | None:
        """``must be at least 1 (got -5)`` if ``value`` is outside the range, else None."""
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and value > self.high
        return f"must be {self.describe()} (got {value:g})" if too_low or too_high else None

    def describe(self) -> str:
        """``at least 1``, ``more than 0`` or ``from 1 to 65535``."""
        if self.low is not None and self.high is not None:
            return f"from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{'more than' if self.open_low else 'at least'} {self.low:g}"
        return f"at most {self.high:g}"


_COUNT = Limit(1)  # a positive count (tokens, sessions, messages)
_SECONDS = Limit(0, open_low=True)  # a positive duration
_NON_NEGATIVE = Limit(0)
_PORT = Limit(0, 65535)  # 0: any free port
# Every bound of a numeric option, by name: config fields of ClientConfig and ServerConfig, the API's
# settings and the options of `corolla demo`, `api` and `monitor` (the CLI checks values against these).
LIMITS: dict[str, Limit] = {
    # ClientConfig
    "connect_timeout": _SECONDS,
    "step_timeout": _SECONDS,
    "stall_timeout": _SECONDS,
    "request_timeout": _SECONDS,
    "max_retries": _NON_NEGATIVE,
    "min_backoff": _NON_NEGATIVE,
    "max_backoff": _NON_NEGATIVE,
    "update_period": _NON_NEGATIVE,  # 0: every new route re-reads the swarm
    "max_chunk_bytes": _COUNT,
    "probe_per_group": _COUNT,
    "num_threads": _NON_NEGATIVE,
    "verify_rate": Limit(0, 1),
    "verify_first_steps": _NON_NEGATIVE,
    "audit_every": _NON_NEGATIVE,
    "liar_ban": _NON_NEGATIVE,
    "report_refresh": Limit(0, 20),  # reports must travel within a minute: at most 20 s between reads
    "report_checks": _NON_NEGATIVE,
    "micro_batch_size": _COUNT,
    "batch_window": _NON_NEGATIVE,
    # ServerConfig
    "num_blocks": _COUNT,
    "port": _PORT,
    "announce_port": Limit(1, 65535),
    "max_memory": _COUNT,
    "cache_bytes": _NON_NEGATIVE,
    "max_length": _COUNT,
    "max_batch_size": _COUNT,
    "max_sessions": _COUNT,
    "max_chunk_tokens": _COUNT,
    "max_message_bytes": _COUNT,
    "max_forward_parts": _COUNT,
    "forward_timeout": _SECONDS,
    "max_sessions_per_peer": _COUNT,
    "max_sessions_per_group": _COUNT,
    "session_max_lifetime": _SECONDS,
    "session_reclaim_idle": _NON_NEGATIVE,
    "max_streams_per_peer": _COUNT,
    "max_streams_per_group": _COUNT,
    "max_streams": _COUNT,
    "max_tokens_in_flight": _COUNT,
    "max_tokens_in_flight_per_peer": _COUNT,
    "max_tokens_in_flight_per_group": _COUNT,
    "compute_chunk_tokens": _COUNT,
    "prefix_block_tokens": _COUNT,
    "prefix_cache_tokens": _NON_NEGATIVE,
    "batch_rows": _COUNT,
    "announce_period": _SECONDS,
    "record_ttl": _SECONDS,
    "session_idle_timeout": _SECONDS,
    "push_timeout": _SECONDS,
    "throughput": Limit(0, open_low=True),
    "rebalance_period": _SECONDS,
    "reachability_period": _SECONDS,
    "balance_quality": Limit(0, 1, open_low=True),
    "parent_pid": _COUNT,
    # `corolla api` (ApiSettings), `corolla monitor` and `corolla demo`
    "default_max_tokens": _COUNT,
    "max_workers": _COUNT,
    "max_queue": _NON_NEGATIVE,
    "max_body_bytes": Limit(1024),  # at least a small chat request
    "web_port": Limit(1, 65535),
    "refresh": _SECONDS,
    "max_new_tokens": _COUNT,
    "servers": _COUNT,
}


def check_limit(name: str, value: float | None) -> None:
    """ValueError if ``value`` is outside the bounds of option ``name`` (None and unbounded names pass)."""
    limit = LIMITS.get(name)
    if limit is None or value is None or isinstance(value, bool):
        return
    problem = limit.problem(value)
    if problem:
        raise ValueError(f"{name} {problem}")


def check_limits(config: Any) -> None:
    """Check every bounded numeric field of a config dataclass (its ``__post_init__`` calls this)."""
    for f in fields(config):
        check_limit(f.name, getattr(config, f.name))


def _coerce(value: str, annotation: Any, name: str = "") -> Any:
    if is_size_field(name):
        return parse_size(value)
    text = str(annotation)
    if "bool" in text:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if "int" in text and "float" not in text:
        return int(value)
    if "float" in text:
        return float(value)
    if "tuple" in text or "Sequence" in text:
        return tuple(part for part in value.replace(",", " ").split() if part)
    return value


def from_env(cls: type[T], **overrides: Any) -> T:
    """Build a config: defaults, then ``COROLLA_<FIELD>`` environment variables, then ``overrides``."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        env = os.environ.get(f"COROLLA_{f.name.upper()}")
        if env is not None:
            try:
                values[f.name] = _coerce(env, f.type, f.name)
            except ValueError as e:
                raise ValueError(f"COROLLA_{f.name.upper()}: {e}") from e
    unknown = set(overrides) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in values.items():
        if is_size_field(name) and isinstance(value, str):
            values[name] = parse_size(value)
    if "initial_peers" in values and isinstance(values["initial_peers"], str):
        values["initial_peers"] = (values["initial_peers"],)
    if "initial_peers" in values:
        values["initial_peers"] = tuple(values["initial_peers"])
    return cls(**values)


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a client: how it finds the swarm and how long it waits for servers."""

    initial_peers: tuple[str, ...] = ()  # multiaddrs of any swarm peers to join through
    dht_prefix: str | None = None  # name the servers announce the model under (default: from the model)
    host: str = "127.0.0.1"  # address the client's own p2p daemon listens on
    connect_timeout: float = 10.0  # seconds to open a stream to a server
    step_timeout: float = 30.0  # seconds a server may take for one inference step before it counts as failed
    stall_timeout: float = 1.5  # seconds: a one-token step slower than max(this, 5x the server's usual) is a stall
    request_timeout: float = 60.0  # seconds for a stateless forward or an info call
    max_retries: int = 8  # route re-plans allowed within one call before giving up
    min_backoff: float = 0.5  # seconds of the first ban of a failed server (doubles on repeats)
    max_backoff: float = 60.0  # seconds: cap of a ban
    probe_per_group: int = 2  # new servers of one address group (IPv4 /24, IPv6 /48) probed at once for a route
    update_period: float = 30.0  # seconds between route refreshes from the DHT (0: before every new route)
    max_chunk_bytes: int = 2 * 1024 * 1024  # bytes of hidden states per message (peers cap messages at 4 MiB)
    wire_dtype: str = "auto"  # dtype activations travel in: auto (the model's), or bfloat16/float16 to halve fp32
    nat_port_map: bool = False  # ask the LAN gateway (UPnP/NAT-PMP) to map a port; volunteers at home may want it
    num_threads: int = 0  # torch CPU threads for embeddings and LM head (0: torch's default)
    require_exact: bool = False  # route only through servers whose blocks are not quantized (no --quant)
    swarm_key_file: str | None = None  # key file of a private swarm (`corolla swarm-key new`); None: public swarm
    contributor_key_file: str | None = None  # your server's --identity-file: be served first as a contributor
    verify_rate: float = 0.05  # chance a hop's unaudited steps are audited after a step; 0 turns audits off
    verify_first_steps: int = 2  # audits a new server gets after each of its first steps, before the schedule
    audit_every: int = 32  # steps a hop's outputs stay unaudited at most (0: no bound); generations end audited
    liar_ban: float = 3600.0  # seconds this client avoids a server it caught lying
    report_file: str | None = None  # where caught liars are recorded for `corolla health` (None: ~/.cache/corolla)
    publish_reports: bool = True  # publish caught liars, with the evidence to re-check them, in the swarm's DHT
    report_refresh: float = 15.0  # seconds between reads of the swarm's liar reports (0: never read them)
    report_checks: int = 6  # reports re-checked per minute at most (each costs one stateless forward)
    active_adapter: str | None = None  # LoRA adapter (by name) the servers apply; routes use only servers with it
    micro_batch_size: int = 8  # sequences per training call: larger batches are split, each part retried on its own
    forwarding: bool = True  # servers send each hop's output straight to the next hop: one round trip per step
    # seconds a decode step waits for this client's other sessions on its route to send theirs in one message
    # (client/step_batch.py); 0: every session steps on its own
    batch_window: float = 0.005

    def __post_init__(self) -> None:
        check_limits(self)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a server: what it hosts, how it announces itself, how much it accepts."""

    model: str = ""  # local checkpoint folder or Hub repo id
    blocks: str | None = None  # span "START:END" (end-exclusive) to serve; None: choose automatically
    num_blocks: int | None = None  # with no --blocks: how many blocks to serve
    initial_peers: tuple[str, ...] = ()  # multiaddrs of swarm peers to join through
    new_swarm: bool = False  # start a new swarm instead of joining one
    dht_prefix: str | None = None  # name to announce the model under (default: from the model)
    host: str | None = None  # address to listen on (none: 0.0.0.0 if a peer is on another machine, else 127.0.0.1)
    port: int = 0  # TCP port to listen on (0: any free port)
    announce_host: str | None = None  # public address to announce, if different from --host
    announce_port: int | None = None  # TCP port to announce with --announce-host, if not --port (a forwarded port)
    device: str = "cpu"  # torch device for the blocks: cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # float32, float16, bfloat16, or auto (bfloat16/float16 on GPU, float32 on CPU)
    quant: str = "none"  # none, int8 or nf4: store block weights quantized (about 1/4 or 1/7 of float32's memory)
    max_memory: int | None = None  # bytes weights, cache and activations may take together (e.g. 6GB); None: no cap
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    cache_bytes: int = 512 * 1024 * 1024  # bytes of attention cache all sessions share (with --max-memory: the least)
    max_length: int = 8192  # tokens a session may hold at most
    max_batch_size: int = 8  # sequences per session or forward request
    max_sessions: int = 64  # open inference sessions at once
    max_chunk_tokens: int = 8192  # tokens per message (batch x length)
    max_message_bytes: int = 4 * 1024 * 1024  # bytes of one message from a peer (checked from its header, unread)
    max_forward_parts: int = 1024  # messages one stateless forward may be split into
    forward_timeout: float = 300.0  # seconds a stateless forward may take from its first message to its answer
    max_sessions_per_peer: int = 8  # open inference sessions one client peer may hold at once
    max_sessions_per_group: int = 16  # open sessions all peers of one address group (IPv4 /24, IPv6 /48) may hold
    session_max_lifetime: float = 6 * 3600.0  # seconds a session may stay open in all, however busy
    session_reclaim_idle: float = 15.0  # seconds without a step adding tokens before a session yields if full
    max_streams_per_peer: int = 16  # streams (sessions and forwards) one client peer may have open at once
    max_streams_per_group: int = 32  # streams all peers of one address group may have open at once
    max_streams: int = 128  # streams all peers may have open at once
    max_tokens_in_flight: int = 65536  # tokens (batch x length) received and not yet answered, all peers together
    max_tokens_in_flight_per_peer: int = 16384  # tokens received and not yet answered, per client peer
    max_tokens_in_flight_per_group: int = 32768  # tokens received and not yet answered, per address group
    compute_chunk_tokens: int = 512  # tokens per compute job of a long stateless forward (steps run between chunks)
    prefix_block_tokens: int = 128  # prompts run as jobs of this many positions, and prefixes are shared in such blocks
    prefix_cache_tokens: int = 4096  # prompt positions kept to share with later sessions (in the cache budget); 0: off
    batch_rows: int = 32  # sequences one batched decode step may run for several sessions together (1: no batching)
    announce_period: float = 30.0  # seconds between re-announcements on the DHT
    record_ttl: float = 90.0  # seconds an announcement stays valid if not refreshed
    session_idle_timeout: float = 600.0  # seconds a session may stay idle before its cache is freed
    push_timeout: float = 5.0  # seconds to open a stream to a session's next hop and send it one output
    public_name: str | None = None  # a name shown in `corolla health` (e.g. your nickname)
    throughput: float | None = None  # tokens/s to announce instead of measuring this machine's speed
    rebalance_period: float = 150.0  # seconds between checks whether moving to other blocks helps the swarm
    balance_quality: float = 0.75  # move only if the weakest block would be below this fraction of where we are
    token: str | None = dataclasses.field(default=None, repr=False)  # Hugging Face token for gated repos
    nat_port_map: bool = False  # ask the LAN gateway (UPnP/NAT-PMP) to map a port
    no_relay: bool = False  # never relay for servers others cannot dial (by default a reachable server relays, bounded)
    reachability_period: float = 600.0  # seconds between checks that peers can still dial this server back
    status_file: str | None = None  # path of a JSON file the server keeps updated (used by the tray agent)
    swarm_key_file: str | None = None  # key file of a private swarm (`corolla swarm-key new`); None: public swarm
    identity_file: str | None = None  # file keeping this server's key (made if missing): a stable peer id
    adapters: tuple[str, ...] = ()  # PEFT LoRA adapter folders to serve with the blocks (clients pick one by name)
    parent_pid: int | None = None  # leave the swarm and exit when the process with this id ends (the tray agent's)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_limits(self)


def parse_span(text: str, total: int | None = None) -> tuple[int, int]:
    """Parse ``"START:END"`` (end-exclusive) into a checked span."""
    try:
        start_s, end_s = text.split(":")
        start, end = int(start_s), int(end_s)
    except ValueError as e:
        raise ValueError(f"blocks must look like START:END, e.g. 0:15 (got {text!r})") from e
    if start < 0 or end <= start or (total is not None and end > total):
        limit = f" within 0:{total}" if total is not None else ""
        raise ValueError(f"blocks {text!r} is not a non-empty span{limit}")
    return start, end


def as_tuple(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """Normalise a peers argument to a tuple of strings."""
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    return tuple(values)

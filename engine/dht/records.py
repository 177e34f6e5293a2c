"""Versioned records that servers announce on the DHT, one per (block, server).

Keys are ``"{model}.{block}"`` and subkeys are the server's peer id, so a client reads the servers of
every block with one ``get`` per block. Values are plain dicts (msgpack-friendly); decoding ignores
fields it does not know, so newer servers can add fields without breaking older clients.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECORD_VERSION = 1


class ServerState(enum.IntEnum):
    """Life cycle of a server as seen by the swarm."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerRecord(BaseModel):
    """What one server says about itself in the DHT (the same value under each block it hosts)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = RECORD_VERSION
    state: ServerState
    start: int = Field(ge=0, description="first block served")
    end: int = Field(gt=0, description="one past the last block served")
    throughput: float = Field(default=0.0, ge=0.0, description="tokens/s the server pushes through its span")
    inference_rps: float = Field(default=0.0, ge=0.0, description="single-token steps/s per block")
    cache_tokens_left: int = Field(default=0, ge=0, description="free attention-cache room, in tokens")
    public_name: str | None = Field(default=None, max_length=64)
    corolla_version: str = Field(default="", max_length=32)
    dtype: str = Field(default="", max_length=16)
    quant: str = Field(default="none", max_length=16, description="weight quantization: none, int8 or nf4")
    tokens_served: int = Field(
        default=0,
        ge=0,
        description="tokens this server processed for clients since it started (not its machine's total)",
    )
    relayed: bool = Field(default=False, description="peers cannot dial this server: clients reach it through a relay")
    relay: str | None = Field(default=None, max_length=64, description="peer id of the relay it is reached through")
    adapters: tuple[Annotated[str, Field(max_length=128)], ...] = Field(default=(), max_length=32)

    @model_validator(mode="after")
    def _span_is_ordered(self) -> ServerRecord:
        if self.end <= self.start:
            raise ValueError(f"empty span {self.start}:{self.end}")
        return self

    @property
    def length(self) -> int:
        """Number of blocks in the span."""
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        """Encode for the DHT (plain types only)."""
        data = self.model_dump(mode="python")
        data["state"] = int(self.state)
        data["adapters"] = list(self.adapters)  # msgpack reads sequences back as lists
        return data

    @classmethod
    def from_dht(cls, value: Any) -> ServerRecord | None:
        """Decode a value read from the DHT; ``None`` if it is not a valid record (never raises)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls.model_validate(value)
        except ValidationError:
            return None


def block_key(model: str, block: int) -> str:
    """DHT key under which the servers of one block announce themselves."""
    return f"{model}.{block}"


MAX_BLOCKS = 100_000  # more blocks than any model has: a larger count is junk


def count_models(entries: Iterable[Any]) -> dict[str, int]:
    """Models of the swarm's index from its servers' entries (``{"model": name, "num_blocks": n}``).

    Each entry is one server's vote; when servers disagree on a model's size, most votes win and a tie
    goes to the smaller count. Malformed entries are skipped.
    """
    votes: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name, count = entry.get("model"), entry.get("num_blocks")
        if isinstance(name, str) and 0 < len(name) <= 256 and type(count) is int and 0 < count < MAX_BLOCKS:
            votes[name][count] += 1
    return {name: min(counter, key=lambda n: (-counter[n], n)) for name, counter in votes.items()}

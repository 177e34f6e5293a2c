"""Prompt prefixes shared across sessions: keys/values of whole blocks of positions, found by a hash of their inputs.

A server only sees hidden states, never tokens, so a block of ``block_tokens`` positions is named by a chain
hash: the previous block's name, the exact bytes (and dtype, shape) of the hidden states this span received for
the block, and the offsets inside the block where a client's message began. The first name in the chain covers
everything else that changes the block's outputs: the blocks run (start, end), the LoRA adapter, the server's
dtype, the batch size. Two sessions therefore share a block only when everything the span computed it from is
identical, so a copied block equals a recomputed one bit for bit (the server runs every prompt in the same
block-aligned jobs: the message offsets are in the name because they change those jobs).

Entries hold memory of the server's :class:`~corolla.engine.server.kv_cache.CacheBudget`; they are evicted least
recently used first, whenever a session needs the room, and never while a step is copying them (pinned).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from corolla.engine.server.kv_cache import CacheBudget

KEY_VERSION = b"corolla/prefix-block/v1\x00"


def first_key(start: int, end: int, adapter: str | None, dtype: torch.dtype, batch: int, block_tokens: int) -> bytes:
    """The name every chain starts from: what besides the inputs changes a span's keys, values and outputs."""
    text = f"{start}:{end}|{adapter!r}|{dtype}|{batch}|{block_tokens}"
    return hashlib.sha256(KEY_VERSION + text.encode()).digest()


def block_key(previous: bytes, parts: list[torch.Tensor], cuts: list[int]) -> bytes:
    """The name of a block: ``previous``'s name, where its messages began (``cuts``) and its inputs' exact bytes.

    Args:
        previous: the name of the block before it (or :func:`first_key`).
        parts: the block's received hidden states [batch, n, hidden] on the CPU, in order (one per message).
        cuts: offsets inside the block where a message began (0 excluded).
    """
    h = hashlib.sha256(previous)
    h.update(repr(cuts).encode())
    for part in parts:
        h.update(f"{part.dtype}{tuple(part.shape)}".encode())
        h.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


@dataclass
class PrefixTrail:
    """Where one session's prompt stands in the chain of block names; changed only through its methods."""

    key: bytes  # the name of the blocks before ``pos``
    block_tokens: int  # positions per block
    pos: int = 0  # first position of the block being received
    parts: list[torch.Tensor] = field(default_factory=list)  # its inputs received so far (as sent, on the CPU)
    outputs: list[torch.Tensor] = field(default_factory=list)  # the span's outputs for them
    cuts: list[int] = field(default_factory=list)  # offsets inside the block where a step began

    def end(self) -> int:
        """One past the last position received."""
        return self.pos + sum(p.shape[1] for p in self.parts)

    def receive(self, at: int, inputs: torch.Tensor) -> bytes | None:
        """Note ``inputs`` [batch, n, hidden] as received for positions ``at..at+n-1`` (inside the current block,
        from :meth:`end` on); the block's name if they complete it."""
        if at != self.end() or at + inputs.shape[1] > self.pos + self.block_tokens:
            raise ValueError(f"positions {at}+{inputs.shape[1]} do not continue block {self.pos} of the trail")
        if at > self.pos:  # a step began inside the block: where is part of the block's name
            self.cuts.append(at - self.pos)
        self.parts.append(inputs)
        if at + inputs.shape[1] < self.pos + self.block_tokens:
            return None
        return block_key(self.key, self.parts, self.cuts)

    def computed(self, name: bytes | None, outputs: list[torch.Tensor]) -> None:
        """The outputs of the positions last received; ``name`` (from :meth:`receive`): the block is complete and
        the chain moves on to the next one."""
        if name is None:
            self.outputs.extend(outputs)
            return
        self.key, self.pos = name, self.pos + self.block_tokens
        self.parts, self.outputs, self.cuts = [], [], []


@dataclass
class PrefixBlock:
    """One block of positions of a span: every block's keys/values [batch, heads, n, dim] and the span's outputs."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    outputs: torch.Tensor  # [batch, n, hidden]
    nbytes: int = 0
    pins: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        tensors = (*self.keys, *self.values, self.outputs)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """Blocks of prompt prefixes, within ``capacity`` bytes and the server's shared cache budget (thread-safe)."""

    def __init__(self, budget: CacheBudget, capacity: int) -> None:
        """Keep at most ``capacity`` bytes of blocks, each also reserved in ``budget`` (which sessions share)."""
        self.budget = budget
        self.capacity = capacity
        self.used = 0
        self.evictions = 0
        self._blocks: OrderedDict[bytes, PrefixBlock] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def take(self, key: bytes) -> PrefixBlock | None:
        """The block named ``key``, pinned until :meth:`give_back` (so it is not evicted while copied), or None."""
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                block.pins += 1
                self._blocks.move_to_end(key)
            return block

    def give_back(self, block: PrefixBlock) -> None:
        """Unpin a block returned by :meth:`take`."""
        with self._lock:
            block.pins = max(0, block.pins - 1)

    def put(self, key: bytes, block: PrefixBlock) -> bool:
        """Keep ``block`` under ``key`` if room can be made by evicting unpinned blocks; False if not kept."""
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return True
            if block.nbytes > self.capacity:
                return False
            while self.used + block.nbytes > self.capacity or block.nbytes > self.budget.free:
                if not self._evict_one():
                    return False
            self.budget.reserve(block.nbytes, "a prefix-cache block")
            self.used += block.nbytes
            self._blocks[key] = block
            return True

    def make_room(self, nbytes: int) -> None:
        """Evict unpinned blocks, least recently used first, until the budget has ``nbytes`` free or none is left."""
        with self._lock:
            while self.budget.free < nbytes and self._evict_one():
                pass

    def clear(self) -> None:
        """Drop every unpinned block."""
        with self._lock:
            while self._evict_one():
                pass

    def _evict_one(self) -> bool:
        """Drop the least recently used unpinned block (lock held); False if every block is pinned."""
        victim = next((k for k, b in self._blocks.items() if b.pins == 0), None)
        if victim is None:
            return False
        block = self._blocks.pop(victim)
        self.used -= block.nbytes
        self.budget.release(block.nbytes)
        self.evictions += 1
        return True

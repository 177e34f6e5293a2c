"""The training RPCs' wire format: a header naming the shapes, then flat tensor pieces in a fixed order.

A training call carries several tensors whose shapes follow from the header alone (batch, length,
prompt length, blocks), so a server checks every size against its limits *before* it reads a byte of
them. Tensors travel flattened and cut into pieces of bounded size, in the order :func:`layout` gives.

- forward (``RPC_TRAIN_FORWARD``): hidden states [batch, length, hidden], then deep prompts
  [blocks, batch, pre, hidden] when ``pre > 0``; answer: outputs [batch, length, hidden].
- backward (``RPC_BACKWARD``): hidden states (the span's inputs), gradients of the span's outputs
  (same shape), then deep prompts; answer: gradients of the inputs, then of the deep prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from hivemind.proto import runtime_pb2
from pydantic import Field

from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.errors import ProtocolError
from corolla.engine.wire.messages import _Message
from corolla.engine.wire.tensors import deserialize, serialize, units_per_part

RPC_TRAIN_FORWARD = "CorollaServer.rpc_train_forward"
RPC_BACKWARD = "CorollaServer.rpc_backward"

Kind = Literal["forward", "backward"]


class TrainRequest(_Message):
    """Header of a training forward or backward through blocks start..end-1."""

    version: int = PROTOCOL_VERSION
    kind: Kind
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    batch: int = Field(gt=0)
    length: int = Field(gt=0)
    pre: int = Field(default=0, ge=0)  # deep prompt positions per block (0: no deep prompts)
    adapter: str | None = Field(default=None, max_length=128)
    proof: str | None = Field(default=None, max_length=256)  # membership of a private swarm (wire/membership.py)


def request_shapes(req: TrainRequest, hidden_size: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors a request carries, in order."""
    hidden = (req.batch, req.length, hidden_size)
    shapes: list[tuple[int, ...]] = [hidden] if req.kind == "forward" else [hidden, hidden]
    if req.pre:
        shapes.append((req.end - req.start, req.batch, req.pre, hidden_size))
    return shapes


def answer_shapes(req: TrainRequest, hidden_size: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors the answer carries, in order."""
    hidden = (req.batch, req.length, hidden_size)
    if req.kind == "forward" or not req.pre:
        return [hidden]
    return [hidden, (req.end - req.start, req.batch, req.pre, hidden_size)]


def pieces(tensors: Sequence[torch.Tensor], max_bytes: int) -> Iterator[runtime_pb2.Tensor]:
    """The tensors flattened and cut into serialized pieces of at most ``max_bytes`` each."""
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        step = units_per_part(max_bytes, flat.element_size())
        for i in range(0, flat.numel(), step):
            yield serialize(flat[i : i + step])


class Assembler:
    """Collects flat pieces into tensors of known shapes; refuses anything beyond them."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = list(shapes)
        self.expected = sum(math.prod(s) for s in shapes)
        self.received = 0
        self._parts: list[torch.Tensor] = []

    def add(self, proto: runtime_pb2.Tensor) -> int:
        """Take one piece (checked); returns its number of elements."""
        piece = deserialize(proto)
        if piece.ndim != 1:
            raise ProtocolError(f"training tensors travel flattened; got a piece of shape {list(piece.shape)}")
        if self._parts and piece.dtype != self._parts[0].dtype:
            raise ProtocolError("every piece of a training call must have one dtype")
        if self.received + piece.numel() > self.expected:
            raise ProtocolError(f"more than the {self.expected} values the header announced")
        self.received += piece.numel()
        self._parts.append(piece)
        return int(piece.numel())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors, once every value arrived."""
        if self.received != self.expected:
            raise ProtocolError(f"got {self.received} values, the header announced {self.expected}")
        flat = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts = []
        out, at = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[at : at + n].view(shape))
            at += n
        return out

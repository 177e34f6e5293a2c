"""Tensor (de)serialization for the wire, with every field a peer sends checked before use."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from corolla.engine.errors import ProtocolError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_DIMS = 4
ANSWER_PART_BYTES = 2 * 1024 * 1024  # tensor bytes per answer message (peers cap messages at 4 MiB by default)


def units_per_part(max_bytes: int, unit_bytes: int) -> int:
    """How many units of ``unit_bytes`` one message of at most ``max_bytes`` carries (at least one)."""
    return max(1, max_bytes // max(1, unit_bytes))


def length_parts(hidden: torch.Tensor, max_bytes: int) -> Iterator[torch.Tensor]:
    """[batch, length, hidden] states cut along length into parts of at most ``max_bytes`` (one position at least)."""
    step = units_per_part(max_bytes, hidden.shape[0] * hidden.shape[2] * hidden.element_size())
    for i in range(0, hidden.shape[1], step):
        yield hidden[:, i : i + step]


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (float32, float16 or bfloat16)."""
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise ProtocolError(f"dtype {dtype} cannot be sent; use float32, float16 or bfloat16")


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Encode a float tensor (raw little-endian bytes; bfloat16 travels as its 16-bit pattern)."""
    name = dtype_name(tensor.dtype)
    t = tensor.detach().contiguous().cpu()
    raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return runtime_pb2.Tensor(buffer=raw, size=list(t.shape), dtype=name)


def deserialize(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode a tensor sent by a peer, raising ProtocolError for anything malformed."""
    if proto.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {proto.dtype!r}; send float32, float16 or bfloat16")
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise ProtocolError("compressed tensors are not supported; send them uncompressed")
    shape = [int(s) for s in proto.size]
    if not 1 <= len(shape) <= MAX_DIMS or any(s <= 0 for s in shape):
        raise ProtocolError(f"bad tensor shape {shape}")
    dtype = WIRE_DTYPES[proto.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor of {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    if len(proto.buffer) != expected:
        raise ProtocolError(f"tensor buffer has {len(proto.buffer)} bytes, shape {shape} needs {expected}")
    if dtype == torch.bfloat16:
        arr = np.frombuffer(proto.buffer, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = np.float32 if dtype == torch.float32 else np.float16
    return torch.from_numpy(np.frombuffer(proto.buffer, dtype=np_dtype).copy()).reshape(shape)

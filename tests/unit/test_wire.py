"""Wire format: tensors and message metadata round-trip, and malformed peer input raises ProtocolError."""

from __future__ import annotations

import math
from types import SimpleNamespace

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.errors import ProtocolError
from corolla.engine.wire.messages import (
    MAX_METADATA_BYTES,
    Close,
    ForwardRequest,
    OpenSession,
    Step,
    StepResult,
    decode_inference_message,
)
from corolla.engine.wire.tensors import MAX_DIMS, MAX_TENSOR_BYTES, deserialize, dtype_name, serialize

# ---- tensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 16), (1, 2, 3, 4)])
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    proto = serialize(tensor)
    assert proto.dtype == dtype_name(dtype)
    assert list(proto.size) == list(shape)
    assert len(proto.buffer) == math.prod(shape) * tensor.element_size()
    # Through real protobuf bytes, as a peer would receive it.
    received = runtime_pb2.Tensor.FromString(proto.SerializeToString())
    back = deserialize(received)
    assert back.dtype == dtype
    assert back.shape == tensor.shape
    assert torch.equal(
        back.view(torch.int16) if dtype != torch.float32 else back,
        tensor.view(torch.int16) if dtype != torch.float32 else tensor,
    )


def test_round_trip_keeps_special_values_and_non_contiguous_input() -> None:
    tensor = torch.tensor([[1.0, float("inf")], [-0.0, float("nan")]], dtype=torch.bfloat16).t()  # not contiguous
    back = deserialize(serialize(tensor))
    assert back.is_contiguous()
    assert torch.equal(back.view(torch.int16), tensor.contiguous().view(torch.int16))


def test_deserialized_tensor_owns_writable_memory() -> None:
    back = deserialize(serialize(torch.zeros(2, 3)))
    back += 1  # would fail (or warn) on a read-only numpy buffer
    assert torch.equal(back, torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.int8, torch.bool])
def test_unsendable_dtype_raises(dtype: torch.dtype) -> None:
    with pytest.raises(ProtocolError):
        serialize(torch.zeros(2, dtype=dtype))


def good_proto(**changes: object) -> runtime_pb2.Tensor:
    fields: dict[str, object] = {"buffer": b"\0" * 24, "size": [2, 3], "dtype": "float32"}
    fields.update(changes)
    return runtime_pb2.Tensor(**fields)


def test_good_proto_is_accepted() -> None:
    assert deserialize(good_proto()).shape == (2, 3)


@pytest.mark.parametrize("dtype", ["float64", "int64", "", "FLOAT32", "torch.float32", "float32 "])
def test_bad_dtype_string_raises(dtype: str) -> None:
    with pytest.raises(ProtocolError):
        deserialize(good_proto(dtype=dtype))


@pytest.mark.parametrize("nbytes", [0, 23, 25, 48])
def test_buffer_shape_mismatch_raises(nbytes: int) -> None:
    with pytest.raises(ProtocolError):
        deserialize(good_proto(buffer=b"\0" * nbytes))


@pytest.mark.parametrize("size", [[], [0], [2, 0], [0, 0, 0], [1] * (MAX_DIMS + 1)])
def test_bad_shapes_raise(size: list[int]) -> None:
    with pytest.raises(ProtocolError, match="shape"):
        deserialize(good_proto(size=size, buffer=b"\0" * 4))


@pytest.mark.parametrize("size", [[-1, 3], [3, -2], [-1, -3]])
def test_negative_dims_raise(size: list[int]) -> None:
    # The protobuf field is uint32, so a real message cannot carry them; the check must not rely on that.
    fake = SimpleNamespace(buffer=b"\0" * 12, size=size, dtype="float32", compression=runtime_pb2.CompressionType.NONE)
    with pytest.raises(ProtocolError, match="shape"):
        deserialize(fake)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        runtime_pb2.Tensor(size=size)


def test_too_large_tensor_raises_before_reading_the_buffer() -> None:
    elements = MAX_TENSOR_BYTES // 4 + 1
    with pytest.raises(ProtocolError, match="exceeds"):
        deserialize(good_proto(size=[elements], buffer=b""))
    with pytest.raises(ProtocolError, match="exceeds"):
        deserialize(good_proto(size=[2**32 - 1, 2**32 - 1, 2**32 - 1], buffer=b""))  # no allocation of the claimed size


def test_compressed_tensor_raises() -> None:
    with pytest.raises(ProtocolError):
        deserialize(good_proto(compression=runtime_pb2.CompressionType.FLOAT16))


# ---- messages -----------------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    open_ = OpenSession(session_id="s1", start=2, end=5, max_length=64, batch_size=2)
    assert OpenSession.decode(open_.encode()) == open_
    assert open_.version == PROTOCOL_VERSION
    step = Step(session_id="s1", position=7, step_id=3)
    assert Step.decode(step.encode()) == step
    result = StepResult(ok=False, step_id=3, position=7, error="boom", error_type="ProtocolError")
    assert StepResult.decode(result.encode()) == result
    forward = ForwardRequest(start=0, end=3)
    assert ForwardRequest.decode(forward.encode()) == forward


def test_unknown_fields_are_ignored() -> None:
    raw = msgpack.packb({"session_id": "s", "position": 1, "step_id": 0, "future_field": [1, 2]})
    assert Step.decode(raw) == Step(session_id="s", position=1, step_id=0)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        b"\xff\xfe garbage \x00",
        bytes(range(256)),
    ],
)
def test_garbage_bytes_raise(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Step.decode(raw)
    with pytest.raises(ProtocolError):
        decode_inference_message(raw)


@pytest.mark.parametrize("value", [[1, 2], 5, "step", None, b"bytes"])
def test_non_map_metadata_raises(value: object) -> None:
    with pytest.raises(ProtocolError):
        Step.decode(msgpack.packb(value))


def test_non_string_map_keys_raise() -> None:
    with pytest.raises(ProtocolError):
        Step.decode(msgpack.packb({1: "x"}))


@pytest.mark.parametrize(
    "data",
    [
        {"session_id": "s", "position": 0},  # missing step_id
        {"position": 0, "step_id": 0},  # missing session_id
        {"session_id": "s", "position": "zero", "step_id": 0},
        {"session_id": "s", "position": -1, "step_id": 0},
        {"session_id": "", "position": 0, "step_id": 0},
        {"session_id": "s" * 65, "position": 0, "step_id": 0},
        {"session_id": ["s"], "position": 0, "step_id": 0},
        {"session_id": "s", "position": 0, "step_id": 0, "kind": "open"},
    ],
)
def test_invalid_fields_raise(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        Step.decode(msgpack.packb(data))


@pytest.mark.parametrize(
    "data",
    [
        {"session_id": "s", "start": 3, "end": 0, "max_length": 8, "batch_size": 1},
        {"session_id": "s", "start": -1, "end": 2, "max_length": 8, "batch_size": 1},
        {"session_id": "s", "start": 0, "end": 2, "max_length": 0, "batch_size": 1},
        {"session_id": "s", "start": 0, "end": 2, "max_length": 8, "batch_size": 0},
        {"session_id": "s", "start": 0, "end": 2, "max_length": 8},
    ],
)
def test_invalid_open_raises(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        OpenSession.decode(msgpack.packb(data))


def test_oversized_metadata_raises() -> None:
    raw = msgpack.packb({"session_id": "s", "position": 0, "step_id": 0, "pad": "x" * MAX_METADATA_BYTES})
    assert len(raw) > MAX_METADATA_BYTES
    with pytest.raises(ProtocolError, match="exceeds"):
        Step.decode(raw)
    with pytest.raises(ProtocolError):
        decode_inference_message(raw)


def test_decode_inference_message_dispatches_by_kind() -> None:
    open_ = OpenSession(session_id="a", start=0, end=2, max_length=16, batch_size=1)
    step = Step(session_id="a", position=0, step_id=1)
    close = Close(session_id="a")
    for message in (open_, step, close):
        decoded = decode_inference_message(message.encode())
        assert type(decoded) is type(message)
        assert decoded == message


@pytest.mark.parametrize(
    "data",
    [
        {"session_id": "a"},  # no kind
        {"kind": "forward", "session_id": "a"},
        {"kind": 1, "session_id": "a"},
        {"kind": "step", "session_id": "a"},  # a step without position/step_id
        {"kind": "open", "session_id": "a", "start": 0},
    ],
)
def test_decode_inference_message_rejects_bad_kinds_and_fields(data: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode_inference_message(msgpack.packb(data))


def test_client_wire_dtype_compresses_float32_and_refuses_unknown_names() -> None:
    from corolla.engine.client.inputs import to_wire

    hidden = torch.randn(1, 3, 8)
    assert to_wire(hidden).dtype == torch.float32
    light = to_wire(hidden, "bfloat16")
    assert light.dtype == torch.bfloat16
    assert len(serialize(light).buffer) * 2 == len(serialize(hidden).buffer)
    with pytest.raises(ValueError, match="wire_dtype 'int8'"):
        to_wire(hidden, "int8")

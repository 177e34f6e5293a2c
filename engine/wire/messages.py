"""Request/response metadata, msgpack-encoded and validated field by field.

Transport envelopes are hivemind's ``ExpertRequest``/``ExpertResponse`` protobufs (tensors + opaque
metadata bytes); the metadata schemas below are Corolla's and carry the protocol version.
"""

from __future__ import annotations

from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corolla.engine.config import PROTOCOL_VERSION
from corolla.engine.errors import ProtocolError

MAX_METADATA_BYTES = 64 * 1024

RPC_INFERENCE = "CorollaServer.rpc_inference"
RPC_FORWARD = "CorollaServer.rpc_forward"
RPC_INFO = "CorollaServer.rpc_info"
RPC_PUSH = "CorollaServer.rpc_push"  # server to server: a hop's output pushed to the next hop (forwarding)
PEER_ID_CHARS = 128  # longest base58 peer id accepted in a message
MAX_BATCHED_SESSIONS = 256  # sessions one batched decode step may carry


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def encode(self) -> bytes:
        """msgpack bytes of this message."""
        data: bytes = msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)
        return data

    @classmethod
    def decode(cls, raw: bytes) -> Any:
        """Parse and validate peer-sent bytes; ProtocolError on anything malformed."""
        if len(raw) > MAX_METADATA_BYTES:
            raise ProtocolError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise ProtocolError(f"metadata is not valid msgpack: {e}") from e
        if not isinstance(data, dict):
            raise ProtocolError("metadata must be a map")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ProtocolError(f"invalid {cls.__name__}: {e.errors()[0]['msg']} at {e.errors()[0]['loc']}") from e


class OpenSession(_Message):
    """First message of an inference stream: reserve cache for a session over blocks start..end-1."""

    kind: Literal["open"] = "open"
    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=64)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    proof: str | None = Field(default=None, max_length=256)  # membership of a private swarm (wire/membership.py)
    contributor: str | None = Field(default=None, max_length=512)  # claim of a client that also serves
    adapter: str | None = Field(default=None, max_length=128)  # LoRA adapter to apply (None: the base model)


class Step(_Message):
    """One inference step: hidden states of ``new`` tokens at position ``position`` of the session.

    ``position`` is the number of tokens the client believes the server holds. If it is smaller than
    what the server holds, the server first forgets the tokens past it (rewind); if larger, the step
    is refused (the client and server disagree, e.g. after a faulty replay).
    """

    kind: Literal["step"] = "step"
    session_id: str = Field(min_length=1, max_length=64)
    position: int = Field(ge=0)
    step_id: int = Field(ge=0)
    # Forwarding (client/forwarding.py): the step's input comes from this peer's push instead of the message...
    from_peer: str | None = Field(default=None, min_length=1, max_length=PEER_ID_CHARS)
    wait: float = Field(default=0.0, ge=0.0, le=3600.0)  # ...within this many seconds
    # ...and its output goes to this peer too, as the input of its step ``step_id + 1``.
    next_peer: str | None = Field(default=None, min_length=1, max_length=PEER_ID_CHARS)
    push_within: float = Field(default=5.0, ge=0.0, le=600.0)  # seconds the push may take before the answer


class SessionAt(_Message):
    """One session of a batched decode step: its id and the tokens the client believes the server holds."""

    session_id: str = Field(min_length=1, max_length=64)
    position: int = Field(gt=0)  # a decode step follows the prompt: the session holds tokens already


class Steps(_Message):
    """One decode token for each of several sessions of the sending peer over the same blocks, in one message.

    Sent on the stream of ``sessions[0]``; the others were opened on their own streams by the same peer. The
    message's one tensor is [rows, 1, hidden]: each session's rows (its batch size) in the order listed. The
    answer's tensor holds the outputs in the same order, and ``positions`` what each session then holds.
    """

    kind: Literal["steps"] = "steps"
    step_id: int = Field(ge=0)
    sessions: list[SessionAt] = Field(min_length=1, max_length=MAX_BATCHED_SESSIONS)


class Close(_Message):
    """Last message of an inference stream: free the session's cache now."""

    kind: Literal["close"] = "close"
    session_id: str = Field(min_length=1, max_length=64)


class StepResult(_Message):
    """Server's answer to an open or a step."""

    ok: bool = True
    step_id: int = -1
    position: int = 0  # tokens the server holds after the step
    error: str | None = None
    error_type: str | None = None
    input_digest: str | None = Field(default=None, max_length=64)  # of the input the step ran on (forwarding)
    forward_error: str | None = Field(default=None, max_length=2048)  # why the push to the next peer failed
    positions: list[int] | None = Field(default=None, max_length=MAX_BATCHED_SESSIONS)  # per session (Steps)
    # hex Ed25519 signature of the step's output by the server's key (wire/commitment.py); None: not signed
    commitment: str | None = Field(default=None, max_length=2 * 64)
    commitments: list[str | None] | None = Field(default=None, max_length=MAX_BATCHED_SESSIONS)  # per session (Steps)


class ForwardRequest(_Message):
    """Stateless forward of full sequences through blocks start..end-1."""

    version: int = PROTOCOL_VERSION
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    proof: str | None = Field(default=None, max_length=256)  # membership of a private swarm (wire/membership.py)
    adapter: str | None = Field(default=None, max_length=128)  # LoRA adapter to apply (None: the base model)


class Push(_Message):
    """A hop's output pushed to the next hop of a session: the input of that hop's step ``step_id``."""

    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=64)
    position: int = Field(ge=0)
    step_id: int = Field(ge=0)
    proof: str | None = Field(default=None, max_length=256)  # membership of a private swarm (wire/membership.py)


def check_version(version: int) -> None:
    """Refuse a request of another protocol version (ProtocolError)."""
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (server speaks {PROTOCOL_VERSION}); upgrade the older side"
        )


def decode_inference_message(raw: bytes) -> OpenSession | Step | Steps | Close:
    """Decode the metadata of one inference-stream message by its ``kind``."""
    msg = _Kind.decode(raw)
    kinds: dict[str, type[_Message]] = {"open": OpenSession, "step": Step, "steps": Steps, "close": Close}
    result: OpenSession | Step | Steps | Close = kinds[msg.kind].decode(raw)
    return result


class _Kind(_Message):
    kind: Literal["open", "step", "steps", "close"]

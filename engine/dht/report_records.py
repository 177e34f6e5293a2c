"""Liar reports as DHT records: the evidence a third party needs to re-check a lie, signed by the reporter.

A report lives under ``{model}_reports`` with subkey ``report/{accused}/{reporter}``. Its value is an envelope
``{"v": 1, "body": <msgpack>, "sig": <64 bytes>}``; the reporter's Ed25519 key (its peer id) signs the DHT key,
the subkey, the expiration and the body, so a report cannot be moved to another model, accused or reporter, or
kept past its expiration. The body carries the accused's span, the inputs of its session from position 0 through
the lying step, the outputs it claimed for that step with its signature (``wire/commitment.py``), the output
the reporter's independent replicas computed (and which peers they were), and the time.

:class:`ReportValidator`, installed in every Corolla DHT peer, refuses a report value that is malformed, over
:data:`MAX_REPORT_BYTES`, unsigned by the reporter of its subkey, or set to expire more than
:data:`MAX_REPORT_TTL` seconds ahead. Whether the accused really lied is for each reader to re-check: a
valid report proves only who reported what.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from cryptography.exceptions import InvalidSignature
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from corolla.engine.dht.signing import SIGNATURE_BYTES, PeerIdentity, key_id, peer_public_key, signed_payload

__all__ = [
    "MAX_REPORT_BYTES",
    "MAX_REPORT_TTL",
    "PublishedReport",
    "ReportTooLarge",
    "ReportValidator",
    "open_report",
    "report_subkey",
    "reports_key",
    "seal_report",
]

REPORT_VERSION = 1
MAX_REPORT_BYTES = 512 * 1024
"""Largest report body published; a larger one (a long session) stays in the reporter's local file."""
MAX_REPORT_TTL = 3600.0
"""Seconds a report may live in the DHT at most."""
CLOCK_SLACK_S = 60.0
"""Seconds a peer's clock may run ahead of this one's when it sets an expiration."""
SUBKEY_PREFIX = "report/"
_DOMAIN = b"corolla/report/v1\x00"  # a report signature is never valid as a record's or a commitment's
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_WITNESSES = 8
_MAX_ENVELOPE_BYTES = MAX_REPORT_BYTES + 1024


class ReportTooLarge(ValueError):
    """A report's evidence is over :data:`MAX_REPORT_BYTES` encoded: it is kept locally only."""


def reports_key(model: str) -> str:
    """The DHT key of a model's liar reports."""
    return f"{model}_reports"


def report_subkey(accused: str, reporter: str) -> str:
    """The subkey of one reporter's report against one server."""
    return f"{SUBKEY_PREFIX}{accused}/{reporter}"


@dataclass(frozen=True)
class PublishedReport:
    """A report of a server's lie with the evidence to re-check it.

    Attributes:
        accused: Peer id of the server said to have lied.
        reporter: Peer id whose key signs the report.
        model: The model name (DHT prefix).
        start: First block of the accused's hop.
        end: One past its last block.
        inputs: Every input of the accused's session from position 0 through the lying step, [batch, last, hidden].
        claimed: What the accused answered for that step's positions (the last ``n``), [batch, n, hidden].
        commitment: The accused's signature of ``claimed`` (wire/commitment.py).
        honest: What the reporter's independent replicas computed for the same positions, [batch, n, hidden].
        witnesses: Peer ids of those replicas.
        time: Unix time of the catch.
    """

    accused: str
    reporter: str
    model: str
    start: int
    end: int
    inputs: torch.Tensor
    claimed: torch.Tensor
    commitment: bytes
    honest: torch.Tensor
    witnesses: tuple[str, ...]
    time: float

    @property
    def subkey(self) -> str:
        """The report's subkey."""
        return report_subkey(self.accused, self.reporter)


def _tensor_field(t: torch.Tensor) -> dict[str, Any]:
    c = t.detach().to("cpu").contiguous()
    return {"shape": list(c.shape), "data": c.view(torch.uint8).numpy().tobytes()}


def _body(report: PublishedReport) -> bytes:
    dtypes = {report.inputs.dtype, report.claimed.dtype, report.honest.dtype}
    names = [name for name, d in _DTYPES.items() if d in dtypes]
    if len(dtypes) != 1 or not names:
        raise ValueError(f"a report's tensors share one of {sorted(_DTYPES)}; got {sorted(map(str, dtypes))}")
    body: bytes = msgpack.packb(
        {
            "accused": report.accused,
            "reporter": report.reporter,
            "model": report.model,
            "start": report.start,
            "end": report.end,
            "dtype": names[0],
            "inputs": _tensor_field(report.inputs),
            "claimed": _tensor_field(report.claimed),
            "commitment": report.commitment,
            "honest": _tensor_field(report.honest),
            "witnesses": list(report.witnesses),
            "time": report.time,
        },
        use_bin_type=True,
    )
    return body


def _payload(key_id_bytes: bytes, subkey: str, expiration: float, body: bytes) -> bytes:
    return _DOMAIN + signed_payload(key_id_bytes, subkey, expiration, body)


def seal_report(identity: PeerIdentity, report: PublishedReport, expiration: float) -> dict[str, Any]:
    """The signed envelope of ``report`` (whose ``reporter`` must be ``identity``), to store until ``expiration``.

    Raises:
        ReportTooLarge: the encoded evidence is over :data:`MAX_REPORT_BYTES`.
        ValueError: the report names another reporter, or its tensors have different or unsupported dtypes.
    """
    if report.reporter != identity.peer_id:
        raise ValueError(f"a report by {report.reporter} cannot be signed by {identity.peer_id}")
    body = _body(report)
    if len(body) > MAX_REPORT_BYTES:
        raise ReportTooLarge(f"the report's evidence is {len(body)} bytes, over the {MAX_REPORT_BYTES}-byte limit")
    signature = identity.sign(_payload(key_id(reports_key(report.model)), report.subkey, expiration, body))
    return {"v": REPORT_VERSION, "body": body, "sig": signature}


def _tensor(field: Any, dtype: torch.dtype) -> torch.Tensor | None:
    if not isinstance(field, dict):
        return None
    shape, data = field.get("shape"), field.get("data")
    if not isinstance(shape, list) or len(shape) != 3 or not isinstance(data, bytes):
        return None
    if not all(isinstance(s, int) and 0 < s <= MAX_REPORT_BYTES for s in shape):
        return None
    if len(data) != math.prod(shape) * dtype.itemsize:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _report(body: dict[str, Any], subkey: str) -> PublishedReport | None:
    """The report in a decoded body, if every field has its type and the tensors fit together."""
    dtype = _DTYPES.get(body.get("dtype"))  # type: ignore[arg-type]
    text = (body.get("accused"), body.get("reporter"), body.get("model"))
    numbers = (body.get("start"), body.get("end"))
    witnesses, commitment, when = body.get("witnesses"), body.get("commitment"), body.get("time")
    if dtype is None or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in text):
        return None
    if not all(isinstance(n, int) and n >= 0 for n in numbers) or not numbers[0] < numbers[1]:  # type: ignore[operator]
        return None
    if not isinstance(witnesses, list) or len(witnesses) > _MAX_WITNESSES:
        return None
    if not all(isinstance(w, str) and len(w) <= 128 for w in witnesses):
        return None
    if not isinstance(commitment, bytes) or len(commitment) != SIGNATURE_BYTES or not isinstance(when, (int, float)):
        return None
    inputs, claimed, honest = (_tensor(body.get(k), dtype) for k in ("inputs", "claimed", "honest"))
    if inputs is None or claimed is None or honest is None or claimed.shape != honest.shape:
        return None
    if inputs.shape[0] != claimed.shape[0] or inputs.shape[2] != claimed.shape[2]:
        return None
    if claimed.shape[1] > inputs.shape[1]:
        return None
    report = PublishedReport(
        str(text[0]),
        str(text[1]),
        str(text[2]),
        int(numbers[0]),  # type: ignore[arg-type]
        int(numbers[1]),  # type: ignore[arg-type]
        inputs,
        claimed,
        commitment,
        honest,
        tuple(witnesses),
        float(when),
    )
    return report if report.subkey == subkey else None


def open_report(key_id_bytes: bytes, subkey: Any, envelope: Any, expiration: float) -> PublishedReport | None:
    """The report in ``envelope`` if the reporter named in ``subkey`` signed it for this key and expiration.

    Returns ``None`` for anything else (a subkey that is no report's, a bad signature, a body that does not match
    its subkey, tensors that do not fit together). Never raises on untrusted input.
    """
    if not isinstance(subkey, str) or not subkey.startswith(SUBKEY_PREFIX) or subkey.count("/") != 2:
        return None
    reporter_key = peer_public_key(subkey.rsplit("/", 1)[1])
    if reporter_key is None or not isinstance(envelope, dict) or envelope.get("v") != REPORT_VERSION:
        return None
    body, signature = envelope.get("body"), envelope.get("sig")
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        return None
    if len(body) > MAX_REPORT_BYTES or len(signature) != SIGNATURE_BYTES:
        return None
    try:
        reporter_key.verify(signature, _payload(key_id_bytes, subkey, expiration, body))
        data = msgpack.unpackb(body, raw=False)
    except (InvalidSignature, ValueError, TypeError, struct.error):
        return None
    return _report(data, subkey) if isinstance(data, dict) else None


def _unpack(data: bytes) -> Any:
    if len(data) > _MAX_ENVELOPE_BYTES:
        return None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError):
        return None


class ReportValidator(RecordValidatorBase):
    """hivemind record validator: a value under a report subkey must be a well-formed report signed by its
    reporter, expiring within :data:`MAX_REPORT_TTL`. Values under other subkeys are left to other validators."""

    def validate(self, record: DHTRecord) -> bool:
        """Whether ``record`` may be stored or believed."""
        subkey = _unpack(record.subkey) if record.subkey else None
        if not isinstance(subkey, str) or not subkey.startswith(SUBKEY_PREFIX):
            return True  # not a report
        if float(record.expiration_time) > get_dht_time() + MAX_REPORT_TTL + CLOCK_SLACK_S:
            return False
        envelope = _unpack(record.value)
        return open_report(record.key, subkey, envelope, float(record.expiration_time)) is not None

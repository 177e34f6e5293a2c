"""Step commitments and published liar reports: signatures that bind every field, and a validator that refuses
anything not signed by its reporter, too large or too long-lived."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from corolla.engine.client import report_check
from corolla.engine.client.hops import Hop
from corolla.engine.client.remote import HopStream
from corolla.engine.client.report_check import ReportChecker
from corolla.engine.client.reporting import evidence
from corolla.engine.config import ClientConfig
from corolla.engine.dht.report_records import (
    MAX_REPORT_BYTES,
    MAX_REPORT_TTL,
    PublishedReport,
    ReportTooLarge,
    ReportValidator,
    open_report,
    reports_key,
    seal_report,
)
from corolla.engine.dht.signing import PeerIdentity, key_id
from corolla.engine.wire.commitment import InputChain, commitment_digest, sign_commitment, verify_commitment

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny-llama"
SERVER = PeerIdentity.generate()
REPORTER = PeerIdentity.generate()


def _inputs(length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, length, 8, generator=torch.Generator().manual_seed(seed))


def _signed(inputs: torch.Tensor, output: torch.Tensor, *, start: int = 0, end: int = 4) -> bytes:
    last = inputs.shape[1]
    digest = commitment_digest(MODEL, start, end, last - output.shape[1], last, InputChain.of(inputs), output)
    return sign_commitment(SERVER, digest)


def test_a_commitment_verifies_and_any_tampered_field_does_not() -> None:
    inputs, output = _inputs(), torch.randn(2, 1, 8)
    signature = _signed(inputs, output)
    ok: dict[str, Any] = {"model": MODEL, "start": 0, "end": 4, "inputs": inputs, "output": output}
    assert verify_commitment(SERVER.peer_id, signature, **ok)
    first_input = inputs.clone()
    first_input[1, 0, 3] += 1e-3  # a row long before the step: the running hash covers it
    tampered = [
        {"model": "other"},
        {"start": 1},
        {"end": 5},
        {"inputs": first_input},
        {"inputs": inputs[:, :4]},  # the step's positions move
        {"inputs": inputs.to(torch.bfloat16)},
        {"output": output + 1e-3},
        {"output": torch.randn(2, 2, 8)},
    ]
    for change in tampered:
        assert not verify_commitment(SERVER.peer_id, signature, **{**ok, **change}), change
    assert not verify_commitment(REPORTER.peer_id, signature, **ok)  # another key
    assert not verify_commitment(SERVER.peer_id, signature[:-1] + bytes([signature[-1] ^ 1]), **ok)
    assert not verify_commitment(SERVER.peer_id, b"short", **ok)
    assert not verify_commitment("not a peer id", signature, **ok)


def test_the_input_chain_follows_rewinds() -> None:
    inputs = _inputs(6)
    chain = InputChain()
    chain.extend(inputs[:, :4])
    chain.truncate(2)  # the session rewound to 2 and continues with other rows
    other = torch.randn(2, 3, 8)
    assert chain.extend(other) == InputChain.of(torch.cat([inputs[:, :2], other], dim=1))
    assert chain.length == 5 and len(chain.hashes) == 6


def _report(**changes: Any) -> PublishedReport:
    inputs, claimed = _inputs(), torch.randn(2, 1, 8)
    fields: dict[str, Any] = {
        "accused": SERVER.peer_id,
        "reporter": REPORTER.peer_id,
        "model": MODEL,
        "start": 0,
        "end": 4,
        "inputs": inputs,
        "claimed": claimed,
        "commitment": _signed(inputs, claimed),
        "honest": torch.randn(2, 1, 8),
        "witnesses": ("12D3KooWwitness",),
        "time": 1.0,
    }
    fields.update(changes)
    return PublishedReport(**fields)


def _record(subkey: Any, value: Any, expiration: float) -> DHTRecord:
    return DHTRecord(
        key_id(reports_key(MODEL)), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration
    )


def test_a_sealed_report_opens_with_every_field_and_tampering_is_refused() -> None:
    report = _report()
    expiration = get_dht_time() + 600
    envelope = seal_report(REPORTER, report, expiration)
    kid = key_id(reports_key(MODEL))
    opened = open_report(kid, report.subkey, envelope, expiration)
    assert opened is not None
    for f in dataclasses.fields(report):
        a, b = getattr(opened, f.name), getattr(report, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    other = _report(accused=REPORTER.peer_id, reporter=REPORTER.peer_id).subkey
    assert open_report(key_id(reports_key("other")), report.subkey, envelope, expiration) is None  # moved model
    assert open_report(kid, other, envelope, expiration) is None  # moved accused
    assert open_report(kid, report.subkey, envelope, expiration + 1) is None  # later expiration
    body = bytearray(envelope["body"])
    body[-20] ^= 1
    assert open_report(kid, report.subkey, {**envelope, "body": bytes(body)}, expiration) is None
    assert open_report(kid, report.subkey, {**envelope, "v": 2}, expiration) is None
    with pytest.raises(ValueError, match="cannot be signed"):
        seal_report(SERVER, report, expiration)  # only the reporter signs its report


def test_the_validator_refuses_forged_large_and_long_lived_reports() -> None:
    validator = ReportValidator()
    report = _report()
    expiration = get_dht_time() + 600
    envelope = seal_report(REPORTER, report, expiration)
    assert validator.validate(_record(report.subkey, envelope, expiration))
    assert not validator.validate(_record(report.subkey, {**envelope, "sig": bytes(64)}, expiration))
    assert not validator.validate(_record(report.subkey, b"junk", expiration))
    far = get_dht_time() + MAX_REPORT_TTL + 3600
    assert not validator.validate(_record(report.subkey, seal_report(REPORTER, report, far), far))
    assert validator.validate(_record(SERVER.peer_id, b"anything", expiration))  # not a report: other validators'
    big = _report(inputs=torch.randn(2, MAX_REPORT_BYTES // 64 + 1, 8))
    with pytest.raises(ReportTooLarge):
        seal_report(REPORTER, big, expiration)


def test_evidence_is_the_first_signed_step_that_disagrees() -> None:
    hop = Hop(HopStream(SERVER.peer_id, 0, 4))
    x = [torch.randn(1, 3, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)]
    outs = [torch.randn(1, 3, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)]
    hop.record(x[0], outs[0], b"a" * 64)
    hop.mark_audited(3)  # the prompt's step passed an audit
    hop.record(x[1], outs[1], b"b" * 64)
    hop.record(x[2], outs[2], b"c" * 64)
    truth = torch.cat([outs[1], outs[2] + 1.0], dim=1)  # the second unaudited step was a lie
    # an audit that began before the lying step vouches for nothing after it: no evidence from it
    assert evidence(MODEL, hop, (3, 4), truth[:, :1], ("w",), 1e-3, REPORTER) is None
    report = evidence(MODEL, hop, (3, 5), truth, ("w",), 1e-3, REPORTER)
    assert report is not None and report.commitment == b"c" * 64
    assert torch.equal(report.inputs, torch.cat(x, dim=1)) and torch.equal(report.claimed, outs[2])
    assert torch.equal(report.honest, outs[2] + 1.0) and report.time <= time.time()
    hop.rewind(4)  # the lying step is cut: its claims and signature go
    assert [c for _, _, c in hop.claimed_steps()] == [b"b" * 64]
    hop.commitments[-1] = None  # an unsigned lie cannot be shown to anyone
    assert evidence(MODEL, hop, (3, 4), outs[1] + 1.0, ("w",), 1e-3, REPORTER) is None


# ---- re-checking published reports (client/report_check.py), with the DHT and the replicas faked ---------------
@dataclass
class _FakeManager:
    reports: list[PublishedReport]
    replica: str = "replica"
    model: str = MODEL
    num_blocks: int = 4
    dht: object = None
    convicted: list[str] = dataclasses.field(default_factory=list)

    def span(self, peer: str) -> Any:
        if peer == "elsewhere":
            return None
        return SimpleNamespace(start=0, end=4, record=SimpleNamespace(quant="none", dtype="float32"))

    @property
    def spans(self) -> dict[str, Any]:
        return {}

    def refresh(self) -> None:
        pass

    def replicas(self, start: int, end: int, exclude: Any, *, adapter: Any, quant: str) -> list[str]:
        return [self.replica]

    def convict(self, peer: str, start: int, end: int, reason: str) -> None:
        self.convicted.append(peer)


class _Loop:
    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run(coro)


def _checker(
    monkeypatch: pytest.MonkeyPatch,
    reports: list[PublishedReport],
    truth: torch.Tensor,
    checks: int = 6,
    hidden_size: int | None = None,
) -> tuple[ReportChecker, _FakeManager, list[PublishedReport]]:
    manager = _FakeManager(reports)
    config = ClientConfig(report_checks=checks)
    context = SimpleNamespace(config=config, manager=manager, p2p=None, loop=_Loop())
    recomputed: list[PublishedReport] = []

    async def groups(context: Any) -> dict[str, str]:
        return {}

    async def recompute(context: Any, route: Any, x: torch.Tensor) -> torch.Tensor:
        recomputed.append(next(r for r in reports if r.inputs is x))
        return torch.cat([x[:, :-1], truth], dim=1)

    monkeypatch.setattr(report_check, "peer_groups", groups)
    monkeypatch.setattr(report_check, "recompute", recompute)
    monkeypatch.setattr(report_check, "read_published_reports", lambda dht, model, timeout: list(reports))
    return ReportChecker(context, hidden_size), manager, recomputed  # type: ignore[arg-type]


def test_a_report_convicts_only_when_the_replica_contradicts_the_signed_output(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = torch.randn(2, 1, 8)
    inputs = _inputs()
    lie, right = truth + 1.0, truth.clone()
    liar = _report(inputs=inputs, claimed=lie, commitment=_signed(inputs, lie), honest=truth)
    reporters = [PeerIdentity.generate().peer_id for _ in range(3)]
    smear = _report(inputs=inputs.clone(), claimed=right, commitment=_signed(inputs, right), reporter=reporters[0])
    smear = dataclasses.replace(smear, honest=lie)
    forged = dataclasses.replace(liar, reporter=reporters[1], inputs=inputs.clone(), claimed=lie * 2)
    unused = dataclasses.replace(liar, accused="elsewhere", reporter=reporters[2], inputs=inputs.clone())
    checker, manager, recomputed = _checker(monkeypatch, [forged, unused, smear, liar], truth)
    checker.check_once()
    assert manager.convicted == [SERVER.peer_id] and set(checker.convicted) == {SERVER.peer_id}
    assert checker.forged == 1 and checker.smears == 1
    assert set(checker.ignored) == {reporters[0], reporters[1]}  # the smearer and the forger, not the others
    assert recomputed == [smear, liar]  # the forgery costs no recompute; the unused span is not looked at
    checker.check_once()  # nothing new: no second conviction, no recompute
    assert manager.convicted == [SERVER.peer_id] and len(recomputed) == 2


def test_a_report_of_another_width_is_refused_before_any_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = torch.randn(2, 1, 8)
    inputs = _inputs()
    lie = truth + 1.0
    liar = _report(inputs=inputs, claimed=lie, commitment=_signed(inputs, lie), honest=truth)
    checker, manager, recomputed = _checker(monkeypatch, [liar], truth, hidden_size=16)  # the model is 16 wide
    checker.check_once()
    assert recomputed == [] and manager.convicted == [] and checker.forged == 1
    assert set(checker.ignored) == {liar.reporter}
    checker, manager, recomputed = _checker(monkeypatch, [liar], truth, hidden_size=8)  # the right width
    checker.check_once()
    assert recomputed == [liar] and manager.convicted == [SERVER.peer_id]


def test_re_checks_are_bounded_per_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = torch.randn(2, 1, 8)
    flood = []
    for i in range(5):  # a flood of smears of one honest server, each by a fresh reporter key
        inputs = _inputs(seed=i)
        flood.append(
            _report(
                inputs=inputs,
                claimed=truth,
                commitment=_signed(inputs, truth),
                honest=truth + 1.0,
                reporter=PeerIdentity.generate().peer_id,
            )
        )
    checker, manager, recomputed = _checker(monkeypatch, flood, truth, checks=2)
    checker.check_once()
    checker.check_once()
    assert len(recomputed) == 2 and checker.smears == 2 and not manager.convicted

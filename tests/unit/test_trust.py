"""Pure trust functions: speed caps, probes, spot-check schedule, verdicts, output checks, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corolla.engine.client.verify import output_problem, outputs_agree, tolerance
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.routing.planner import plan_inference_route
from corolla.engine.routing.reports import LiarReport, read_reports, write_report
from corolla.engine.routing.spans import RemoteSpan
from corolla.engine.routing.trust import (
    FASTEST_BLOCK_S,
    Opinion,
    Verdict,
    believed_block_seconds,
    judge,
    probe_problem,
    settled,
    should_verify,
    silent_bound,
)


def span(peer: str, rps: float, cache: int = 10_000) -> RemoteSpan:
    record = ServerRecord(
        state=ServerState.ONLINE, start=0, end=6, throughput=rps, inference_rps=rps, cache_tokens_left=cache
    )
    return RemoteSpan(peer, 0, 6, record)


def test_announced_speed_is_capped_by_plausibility_and_measurement() -> None:
    assert believed_block_seconds(1e-9, None) == FASTEST_BLOCK_S  # "1e9 tokens/s" is not believed
    assert believed_block_seconds(0.02, None) == 0.02
    assert believed_block_seconds(1e-3, 0.05) == 0.05  # measured slower than it claims: the measurement wins
    assert believed_block_seconds(0.05, 1e-3) == 0.05  # measured faster: the claim stays (it may be busy)
    assert believed_block_seconds(float("nan"), None) == FASTEST_BLOCK_S


def test_fake_speed_does_not_beat_a_measured_fast_server() -> None:
    spans = {"fake": span("fake", 1e9), "honest": span("honest", 1e9)}
    rtt = {"honest": 0.002}  # measured; the fake never answered anything
    route = plan_inference_route(spans, 0, 6, rtt=rtt, measured_block_s={"fake": 1.0})
    assert [h.peer_id for h in route] == ["honest"]


def test_probe_checks_protocol_model_and_span() -> None:
    ok = {"version": 1, "model": "m", "start": 0, "end": 6}
    assert probe_problem(ok, version=1, model="m", start=2, end=6) is None
    assert "protocol" in str(probe_problem({**ok, "version": 2}, version=1, model="m", start=0, end=6))
    assert "model" in str(probe_problem({**ok, "model": "x"}, version=1, model="m", start=0, end=6))
    assert "blocks" in str(probe_problem({**ok, "end": 3}, version=1, model="m", start=0, end=6))
    assert "blocks" in str(probe_problem({**ok, "start": "0"}, version=1, model="m", start=0, end=6))


def test_new_servers_are_always_checked_then_at_the_rate() -> None:
    assert should_verify(0, first_steps=2, rate=0.0, draw=0.99)
    assert should_verify(1, first_steps=2, rate=0.0, draw=0.99)
    assert not should_verify(2, first_steps=2, rate=0.05, draw=0.5)
    assert should_verify(2, first_steps=2, rate=0.05, draw=0.01)


def test_judge_needs_two_independent_sources() -> None:
    assert judge([Opinion(("s",), 0)]).verdict is Verdict.UNVERIFIED
    assert judge([Opinion(("s",), 0), Opinion(("a",), 0)]).verdict is Verdict.AGREE
    disputed = judge([Opinion(("s",), 0), Opinion(("a",), 1)])
    assert disputed.verdict is Verdict.DISPUTED and disputed.suspects == ("s",) and not disputed.liars
    lied = judge([Opinion(("s",), 0), Opinion(("a",), 1), Opinion(("b",), 1)])
    assert lied.verdict is Verdict.SERVER_LIED and lied.liars == ("s",)
    # A lying replica is convicted too; a two-peer route that disagreed is only suspected.
    mixed = judge([Opinion(("s",), 0), Opinion(("x",), 1), Opinion(("y", "z"), 2), Opinion(("a",), 0)])
    assert mixed.verdict is Verdict.AGREE and mixed.liars == ("x",) and mixed.suspects == ("y", "z")
    assert not settled([Opinion(("s",), 0), Opinion(("a",), 1)])
    assert settled([Opinion(("s",), 0), Opinion(("a",), 1), Opinion(("b",), 1)])


def test_silent_bound_follows_the_measured_rtt() -> None:
    assert silent_bound(0.002, 1, 6, 1e-3, floor_s=1.5, ceiling_s=30.0) == pytest.approx(1.5 + 0.06)
    assert silent_bound(1.0, 1, 6, 1e-3, floor_s=1.5, ceiling_s=30.0) == pytest.approx(5.0 + 0.06)
    assert silent_bound(None, 10_000, 80, 1.0, floor_s=1.5, ceiling_s=30.0) == 30.0


def test_outputs_are_checked_for_shape_dtype_and_finiteness() -> None:
    x = torch.randn(1, 3, 8)
    assert output_problem(x, x.shape, x.dtype) is None
    assert "shape" in str(output_problem(x[:, :2], x.shape, x.dtype))
    assert "float16" in str(output_problem(x.half(), x.shape, x.dtype))
    assert "NaN" in str(output_problem(torch.full_like(x, float("nan")), x.shape, x.dtype))
    assert "NaN" in str(output_problem(torch.full_like(x, float("inf")), x.shape, x.dtype))


def test_outputs_agree_within_dtype_tolerance_only() -> None:
    torch.manual_seed(0)
    honest = torch.randn(2, 4, 64) * 3
    assert outputs_agree(honest + 1e-5, honest, tolerance(["float32"]))
    assert not outputs_agree(torch.randn_like(honest) * 3, honest, tolerance(["float32"]))  # random of same scale
    rounded = honest.to(torch.bfloat16).float()
    assert not outputs_agree(rounded, honest, tolerance(["float32"]))
    assert outputs_agree(rounded, honest, tolerance(["float32", "bfloat16"]))  # the loosest dtype counts
    assert not outputs_agree(honest[:, :2], honest, 1.0)


def test_outputs_agree_scales_each_element_by_its_own_size() -> None:
    """A massive-activation dimension (40, about 8 x the RMS) rounds far more than the rest: a 16-bit honest
    difference there is no lie, while the same absolute change of an ordinary element is."""
    torch.manual_seed(0)
    honest = torch.randn(1, 3, 64)
    honest[..., 7] = 40.0
    rms = honest.pow(2).mean(-1, keepdim=True).sqrt()
    fp16, bf16 = tolerance(["float16"]), tolerance(["bfloat16"])
    rounded = honest.clone()
    rounded[..., 7] *= 1.02  # 0.8 in absolute terms, 0.16 x the RMS: beyond any bound of 6e-2 x RMS
    assert outputs_agree(rounded, honest, fp16) and outputs_agree(rounded, honest, bf16)
    moved = honest.clone()
    moved[..., 3] += 0.8  # the same change on an ordinary element
    assert not outputs_agree(moved, honest, fp16)
    moved[..., 3] += 3 * rms[..., 0]
    assert not outputs_agree(moved, honest, bf16)
    noise = torch.randn_like(honest) * honest.std()
    noise[..., 7] = honest[..., 7]  # even keeping the massive dimension, random values are caught
    assert not outputs_agree(noise, honest, bf16)


def test_reports_round_trip_and_skip_garbage(tmp_path: Path) -> None:
    file = tmp_path / "sub" / "reports.jsonl"
    write_report(LiarReport("peerA", "m", 0, 6, "differed", 1.0), file)
    with file.open("a") as f:
        f.write("not json\n" + json.dumps({"peer_id": "x"}) + "\n")
    write_report(LiarReport("peerB", "other", 2, 4, "differed", 2.0), file)
    assert [r.peer_id for r in read_reports(file)] == ["peerA", "peerB"]
    assert [r.peer_id for r in read_reports(file, model="m")] == ["peerA"]
    assert read_reports(tmp_path / "missing.jsonl") == []

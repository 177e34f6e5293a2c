"""Reports travel: a liar one client caught is avoided by another client that never met it, and forged reports
against an honest server change nothing. Real server processes in three address groups (127.0.N.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attack_servers import scheduled_liar
from swarm_helpers import client, hf_greedy, hf_model, peer_id, random_ids, running_swarm

from corolla.engine.dht.announce import publish_report
from corolla.engine.dht.report_records import PublishedReport
from corolla.engine.dht.signing import PeerIdentity

pytestmark = pytest.mark.swarm

logger = logging.getLogger(__name__)

HONEST = ["--throughput", "50"]
FAST = ["--throughput", "1e6"]  # an unmeasured client routes through the liar first
ONLY_END_AUDITS = {"verify_rate": 1e-9, "audit_every": 0, "verify_first_steps": 2}
AVOID_WITHIN_S = 60.0


def host(address: str) -> list[str]:
    return ["--host", address]


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.timeout(180)
def test_a_reported_liar_is_avoided_by_a_fresh_client_and_forged_reports_smear_nobody(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tiny_checkpoint("llama")
    reports = tmp_path_factory.mktemp("reports")
    with running_swarm(path, [], tmp_path_factory) as swarm:
        honest = [
            swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host(a)]) for a in ("127.0.1.1", "127.0.2.1")
        ]
        liar = swarm.add_server(
            "0:6", wait=False, extra_args=[*FAST, *host("127.0.3.1")], launcher=scheduled_liar((5,))
        )
        swarm.wait_ready()
        a = client(path, swarm, report_file=str(reports / "a.jsonl"), report_refresh=0, **ONLY_END_AUDITS)
        try:
            with a.inference_session(32) as session:
                a.generate(random_ids(1, 4, seed=7), max_new_tokens=6, eos_token_id=[], session=session)
                assert session.liars == {peer_id(liar)}, "client A never caught the liar: the test proves nothing"
        finally:
            a.close()
        caught = time.monotonic()
        # B never audits and never met the liar: all it knows comes from A's report.
        b = client(path, swarm, report_file=str(reports / "b.jsonl"), report_refresh=1.0, verify_rate=0)
        try:
            joined = time.monotonic()
            assert wait_for(lambda: peer_id(liar) in b.report_checker.convicted, AVOID_WITHIN_S - (joined - caught))
            avoided = b.report_checker.convicted[peer_id(liar)]
            logger.warning(
                "B avoided the liar %.1f s after A caught it (%.1f s after B joined)",
                avoided - caught,
                avoided - joined,
            )
            assert avoided - caught < AVOID_WITHIN_S
            ids = random_ids(1, 5, seed=8)
            with b.inference_session(32) as session:
                out = b.generate(ids, max_new_tokens=4, eos_token_id=[], session=session)
                (hop,) = session.hops
                first, claim, commitment = hop.claimed_steps()[-1]
                inputs = hop.history(first + claim.shape[1])
            assert hop.stream.peer_id != peer_id(liar), "B routed through the reported liar (the fastest announced)"
            assert torch.equal(out, hf_greedy(hf_model(path), ids, 4, eos=False))
            target = hop.stream.peer_id  # an honest server, and its real signature of its last step
            assert commitment is not None and inputs is not None

            def smear(claimed: torch.Tensor, honest_out: torch.Tensor) -> PeerIdentity:
                reporter = PeerIdentity.generate()
                report = PublishedReport(
                    target, reporter.peer_id, b.manager.model, 0, 6, inputs, claimed, commitment, honest_out, (), 0.0
                )
                assert publish_report(b.dht, reporter, report)
                return reporter

            forger = smear(torch.randn_like(claim), claim)  # a made-up output: the signature does not match it
            smearer = smear(claim, torch.randn_like(claim))  # the real output and signature, a fake "honest" one
            checker = b.report_checker
            assert wait_for(lambda: {forger.peer_id, smearer.peer_id} <= set(checker.ignored), 30.0)
            assert checker.forged == 1 and checker.smears == 1
            assert target not in checker.convicted and target not in b.manager.banned()
            others = {peer_id(s) for s in honest} - {target}
            route = b.manager.plan_inference(exclude=others)  # the smeared server still carries routes
            assert [h.peer_id for h in route] == [target]
        finally:
            b.close()

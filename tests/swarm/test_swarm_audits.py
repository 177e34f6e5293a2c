"""Audits against liars that wait and liars that collude, with real server processes in several address groups.

Every server listens on its own loopback address: 127.0.1.1, 127.0.2.1, ... are different /24s, so the client
sees different operators, while 127.0.5.1 and 127.0.5.2 are one. Liars announce 1e6 tokens/s so an unmeasured
client routes through them first. Whatever they do, the client's tokens must be exactly transformers' greedy ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attack_servers import first_lie_step, scheduled_liar
from swarm_helpers import client, hf_greedy, hf_model, peer_id, random_ids, running_swarm

from corolla.engine.routing.reports import read_reports

pytestmark = pytest.mark.swarm

HONEST = ["--throughput", "50"]
FAST = ["--throughput", "1e6"]
LIE_STEP = 5  # the waiting liar is honest on a session's first steps (those a new server's audits cover)
# Audits only after a new server's first 2 steps and when a generation ends: the lie is not caught at once,
# so its tokens reach the user's stream before the audit withdraws them.
ONLY_END_AUDITS = {"verify_rate": 1e-9, "audit_every": 0, "verify_first_steps": 2}


def host(address: str) -> list[str]:
    return ["--host", address]


@pytest.mark.timeout(120)
def test_a_liar_that_waits_is_caught_and_its_tokens_withdrawn(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tiny_checkpoint("llama")
    reports = tmp_path_factory.mktemp("reports") / "reports.jsonl"
    with running_swarm(path, [], tmp_path_factory) as swarm:
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.1.1")])
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.2.1")])
        liar = swarm.add_server(
            "0:6", wait=False, extra_args=[*FAST, *host("127.0.3.1")], launcher=scheduled_liar((LIE_STEP,))
        )
        swarm.wait_ready()
        model = client(path, swarm, report_file=str(reports), **ONLY_END_AUDITS)
        try:
            prompt = "Once upon a"
            shown = ""  # what a streaming consumer shows, rewinds applied as the stream says
            with model.inference_session(32) as session:
                stream = model.stream_text(prompt, max_new_tokens=10, session=session)
                told = 0
                for piece in stream:
                    for cut in stream.rewinds[told:]:
                        shown = shown[:cut]
                    told = len(stream.rewinds)
                    shown += piece
                for cut in stream.rewinds[told:]:
                    shown = shown[:cut]
                assert session.retractions == 1 and session.liars == {peer_id(liar)}
                assert len(stream.rewinds) == 1, "the lie's tokens were never shown: the test proves nothing"
                route = {hop.stream.peer_id for hop in session.hops}
            ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        finally:
            model.close()
    honest = hf_greedy(hf_model(path), ids, 10)[0, ids.shape[1] :]
    expected = model.tokenizer.decode(honest, skip_special_tokens=True)
    assert shown == stream.text == expected, "a lie survived the rewind"
    assert peer_id(liar) not in route
    assert {r.peer_id for r in read_reports(reports)} == {peer_id(liar)}


RARE_LIES = 0.02  # issue #25: a liar lying on 2% of its steps is caught within 50 steps
WITHIN = 50


@pytest.mark.timeout(120)
def test_a_liar_on_two_percent_of_steps_is_caught_within_fifty_steps(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default schedule (audits in the background while the generation goes on) catches a rare liar mid-run,
    at most 50 steps after its first lie, and the text is transformers' greedy one. The liar's draws are seeded:
    the seed is the first whose first lie falls after a new server's first audits and leaves 50 steps to run."""
    path = tiny_checkpoint("llama")
    seed = next(s for s in range(1000) if 10 <= first_lie_step(rate=RARE_LIES, after=1, seed=s) <= 30)
    lie_step = first_lie_step(rate=RARE_LIES, after=1, seed=seed)  # the liar's first step is the prompt's
    ids = random_ids(1, 6, seed=25)
    new = lie_step + WITHIN
    with running_swarm(path, [], tmp_path_factory) as swarm:
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.1.1")])
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.2.1")])
        liar = swarm.add_server(
            "0:6",
            wait=False,
            extra_args=[*FAST, *host("127.0.3.1")],
            launcher=scheduled_liar(rate=RARE_LIES, after=1, seed=seed),
        )
        swarm.wait_ready()
        model = client(path, swarm)
        try:
            with model.inference_session(ids.shape[1] + new) as session:
                rewinds: list[tuple[int, int]] = []  # (position when caught, position rewound to)
                rewind = session.rewind
                monkeypatch.setattr(
                    session, "rewind", lambda to: (rewinds.append((session.position, to)), rewind(to))[-1]
                )
                out = model.generate(ids, max_new_tokens=new, eos_token_id=[], session=session)
        finally:
            model.close()
    assert session.liars == {peer_id(liar)} and session.retractions == len(rewinds) == 1
    lie_at = ids.shape[1] + lie_step - 2  # step 1 fed the prompt, step k >= 2 position len(prompt) + k - 2
    caught_at, rewound_to = rewinds[0]
    assert rewound_to <= lie_at < caught_at <= lie_at + WITHIN, (rewinds, lie_at)
    assert torch.equal(out, hf_greedy(hf_model(path), ids, new, eos=False)), "a lie survived"


@pytest.mark.timeout(120)
def test_colluders_in_one_address_group_do_not_vouch_for_each_other(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two liars in 127.0.5.0/24 tell the same lie (on stateless forwards too), next to one honest server."""
    path = tiny_checkpoint("llama")
    reports = tmp_path_factory.mktemp("reports") / "reports.jsonl"
    with running_swarm(path, [], tmp_path_factory) as swarm:
        honest = swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.6.1")])
        colluders = [
            swarm.add_server("0:6", wait=False, extra_args=[*FAST, *host(a)], launcher=scheduled_liar(collude=True))
            for a in ("127.0.5.1", "127.0.5.2")
        ]
        swarm.wait_ready()
        model = client(path, swarm, report_file=str(reports))
        try:
            ids = random_ids(1, 6, seed=51)
            with model.inference_session(32) as session:
                out = model.generate(ids, max_new_tokens=6, eos_token_id=[], session=session)
                route = {hop.stream.peer_id for hop in session.hops}
        finally:
            model.close()
    assert torch.equal(out, hf_greedy(hf_model(path), ids, 6, eos=False)), "the colluders' lie reached the user"
    assert route == {peer_id(honest)}
    assert {peer_id(c) for c in colluders} <= session.avoid
    # Two operators disagree and no third settles it: nobody is convicted, and the answer says it is unverified.
    assert not session.verified and not session.liars and not read_reports(reports)


@pytest.mark.timeout(120)
def test_speculative_decoding_withdraws_a_liars_tokens_too(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A draft (here the target's own weights) makes each step verify several tokens; a liar on one of those
    steps is caught when the generation ends and the tokens from its outputs are generated again."""
    path = tiny_checkpoint("llama")
    with running_swarm(path, [], tmp_path_factory) as swarm:
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.1.1")])
        swarm.add_server("0:6", wait=False, extra_args=[*HONEST, *host("127.0.2.1")])
        liar = swarm.add_server(
            "0:6", wait=False, extra_args=[*FAST, *host("127.0.3.1")], launcher=scheduled_liar((LIE_STEP - 1,))
        )
        swarm.wait_ready()
        model = client(path, swarm, **ONLY_END_AUDITS)
        hf = hf_model(path)
        try:
            ids = random_ids(1, 5, seed=4)
            with model.inference_session(64) as session:
                out = model.generate(ids, max_new_tokens=16, do_sample=False, draft_model=hf, session=session)
                assert session.retractions == 1 and session.liars == {peer_id(liar)}
        finally:
            model.close()
    assert torch.equal(out, hf_greedy(hf, ids, 16)), "a lie survived speculative decoding"

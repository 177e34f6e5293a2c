"""Pure parts of forwarding: input digests, who may push into a session, and how a forwarded step is judged."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from corolla.engine.client.forwarding import HopAnswer, forwarded_deadlines, settle_forwarded_step
from corolla.engine.client.hops import first_silent
from corolla.engine.errors import PeerUnavailableError, ProtocolError
from corolla.engine.wire.forwarding import Pushed, PushMissingError, check_offer, match_pushed, tensor_digest
from corolla.engine.wire.messages import Push, Step, StepResult, decode_inference_message

X = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)


def test_digest_tells_tensors_apart() -> None:
    assert tensor_digest(X) == tensor_digest(X.clone())
    assert tensor_digest(X) != tensor_digest(X + 1e-6)
    assert tensor_digest(X) != tensor_digest(X.to(torch.float16))  # dtype counts
    assert tensor_digest(X) != tensor_digest(X.reshape(1, 4, 3))  # shape counts
    assert tensor_digest(X[:, 1:]) == tensor_digest(X[:, 1:].contiguous())  # views hash their values


def test_only_the_named_predecessor_may_push() -> None:
    offer = Pushed("stranger", 0, 5, X)
    with pytest.raises(ProtocolError, match="not the previous hop"):
        check_offer("hop0", None, offer)
    check_offer(None, None, offer)  # before the client named one, any peer fills the one slot
    check_offer("hop0", Pushed("hop0", 0, 3, X), Pushed("hop0", 1, 5, X))  # a newer step replaces an older
    with pytest.raises(ProtocolError, match="in order"):
        check_offer("hop0", Pushed("hop0", 0, 5, X), Pushed("hop0", 0, 5, X))


def test_a_step_takes_only_its_own_push() -> None:
    assert match_pushed(None, "hop0", 0, 5) == (True, None)
    assert match_pushed(Pushed("other", 0, 5, X), "hop0", 0, 5) == (True, None)  # a stranger's: dropped
    assert match_pushed(Pushed("hop0", 0, 4, X), "hop0", 0, 5) == (True, None)  # stale: dropped
    mine = Pushed("hop0", 7, 5, X)
    assert match_pushed(mine, "hop0", 7, 5) == (False, mine)
    with pytest.raises(ProtocolError, match="position"):
        match_pushed(mine, "hop0", 8, 5)
    with pytest.raises(ProtocolError):
        match_pushed(Pushed("hop0", 7, 6, X), "hop0", 7, 5)


def _answers(n: int) -> list[HopAnswer | BaseException]:
    answers: list[HopAnswer | BaseException] = []
    x = X
    for _ in range(n):
        out = x * 2
        answers.append(HopAnswer(out, tensor_digest(x), None))
        x = out
    return answers


def test_judge_keeps_a_clean_step() -> None:
    assert settle_forwarded_step(X, _answers(3), ["a", "b", "c"]).done == 3


def test_judge_catches_a_push_that_differs_from_the_answer() -> None:
    answers = _answers(3)
    honest = answers[1]
    assert isinstance(honest, HopAnswer)
    answers[1] = HopAnswer(honest.out, tensor_digest(torch.randn_like(X)), None)  # it got garbage from hop 0
    verdict = settle_forwarded_step(X, answers, ["a", "b", "c"])
    assert (verdict.done, verdict.mismatch, verdict.blame) == (1, True, None)


def test_judge_blames_a_failed_hop_and_not_the_hops_after_it() -> None:
    answers = _answers(3)
    failure = PeerUnavailableError("b", "closed the stream")
    answers[1:] = [failure, PushMissingError("no input")]
    verdict = settle_forwarded_step(X, answers, ["a", "b", "c"])
    assert (verdict.done, verdict.blame, verdict.mismatch) == (1, failure, False)


def test_judge_blames_the_next_hop_that_its_predecessor_could_not_reach() -> None:
    answers = _answers(3)
    first = answers[0]
    assert isinstance(first, HopAnswer)
    answers[0] = HopAnswer(first.out, first.input_digest, "could not push to the next hop b: no answer")
    answers[1:] = [PushMissingError("no input"), PushMissingError("no input")]
    verdict = settle_forwarded_step(X, answers, ["a", "b", "c"])
    assert verdict.done == 1 and isinstance(verdict.blame, PeerUnavailableError) and verdict.blame.peer_id == "b"
    answers[0] = first  # no push error reported: a missing push blames nobody
    assert settle_forwarded_step(X, answers, ["a", "b", "c"]) == type(verdict)(1)


def test_forwarding_fields_are_optional_and_checked() -> None:
    old = Step(session_id="s", position=0, step_id=1)
    decoded = decode_inference_message(old.encode())
    assert isinstance(decoded, Step) and decoded.from_peer is None and decoded.next_peer is None
    assert StepResult.decode(StepResult().encode()).input_digest is None
    for bad in ({"wait": -1.0}, {"from_peer": "x" * 500}, {"next_peer": ""}):
        with pytest.raises(ProtocolError):
            Step.decode(msgpack.packb({"kind": "step", "session_id": "s", "position": 0, "step_id": 1, **bad}))
    with pytest.raises(ProtocolError):
        Push.decode(Push(session_id="s", position=0, step_id=1).encode()[:-3])


def test_forwarded_deadlines_cost_one_stall_bound_per_frozen_hop_not_a_sum() -> None:
    plan = forwarded_deadlines([1.5, 1.5, 1.5], floor=1.5)  # three fast hops: each at the stall floor
    assert plan.waits == [0.0, 1.5, 1.5]  # the servers wait one floor for a push, not 1.5 x position
    assert plan.pushes == [0.75, 0.75, 0.0]
    assert plan.stages == [2.25, 2.25, 1.5]  # from the predecessor's answer: a frozen hop costs ~2 s anywhere
    slow = forwarded_deadlines([4.0, 6.0, 1.5], floor=1.5)  # slow hops keep their own bounds
    assert slow.waits[2] == 1.5 + 2.5 + 4.5 and slow.waits[2] >= max(4.0, 6.0)
    assert all(c >= w + s for c, w, s in zip(slow.ceilings, slow.waits, slow.stages, strict=True))


async def _answer(
    after: float, *, fail: bool = False, forward_error: str | None = None
) -> tuple[torch.Tensor, StepResult]:
    await asyncio.sleep(after)
    if fail:
        raise PeerUnavailableError("hop1", "closed the stream")
    return X, StepResult(forward_error=forward_error)


@pytest.mark.timeout(10)
async def test_a_hop_whose_predecessor_failed_is_not_judged_before_its_wait_ends() -> None:
    plan = forwarded_deadlines([0.5, 0.5, 0.5], floor=0.5)  # waits [0, 0.5, 0.5], stages [0.75, 0.75, 0.5]
    # hop 1 is killed at once; hop 2 gets no push and says so when its 0.5 s wait ends (later than
    # hop 1's end + its 0.5 s stage): it is healthy, and cancelling it would abort its stream
    killed = [asyncio.ensure_future(c) for c in (_answer(0.0), _answer(0.0, fail=True), _answer(0.65))]
    assert await first_silent(killed, plan) is None
    unreachable = [asyncio.ensure_future(c) for c in (_answer(0.0, forward_error="refused"), _answer(0.65))]
    assert await first_silent(unreachable, forwarded_deadlines([0.5, 0.5], floor=0.5)) is None
    frozen = [asyncio.ensure_future(c) for c in (_answer(0.0), _answer(30.0), _answer(0.65))]
    assert await first_silent(frozen, plan) == 1  # its input came: silent past its stage, it is cancelled
    await asyncio.gather(*frozen, return_exceptions=True)
    assert frozen[1].cancelled()

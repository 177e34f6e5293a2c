"""The client's decode rounds (client/step_batch.py): sessions of one route share rounds, each gets its own
rows' logits, and a failed round hands every step back to its session."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from corolla.engine.apps.tiny_models import tiny_config
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.step_batch import DecodeBatcher
from corolla.engine.config import ClientConfig
from corolla.engine.models.checkpoint import ClientHead

STEPS = 5


class FakeSession:
    """What the batcher asks of a session: its route, settings, id, position and batch size."""

    def __init__(self, name: str, route: tuple[tuple[str, int, int], ...], batch: int) -> None:
        self.session_id = name
        self.route = route
        self.position = 3
        self.batch_size = batch
        self.config = ClientConfig()

    def decode_route(self) -> tuple[tuple[str, int, int], ...]:
        return self.route


def run_threads(batcher: DecodeBatcher, sessions: list[FakeSession]) -> dict[str, list[Any]]:
    """Each session in its own thread asks for logits STEPS times; what each got, per step."""
    got: dict[str, list[Any]] = {s.session_id: [] for s in sessions}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sessions))

    def run(session: FakeSession) -> None:
        try:
            barrier.wait()
            for step in range(STEPS):
                feed = torch.full((session.batch_size, 1), 10 + step + len(session.session_id))
                logits = batcher.logits(session, feed)  # type: ignore[arg-type]
                if logits is None:
                    time.sleep(0.02)  # the session's own step
                got[session.session_id].append((feed, logits))
            batcher.leave(session)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return got


@pytest.fixture
def head() -> ClientHead:
    torch.manual_seed(0)
    return ClientHead(tiny_config("llama")).eval()


@pytest.mark.timeout(60)
def test_sessions_of_one_route_share_rounds_and_each_gets_its_rows(head: ClientHead) -> None:
    loop = LoopThread()
    context = SimpleNamespace(config=ClientConfig(batch_window=0.2), loop=loop)
    batcher = DecodeBatcher(head, context, "auto")  # type: ignore[arg-type]
    rounds: list[list[str]] = []

    async def steps(sessions: list[FakeSession], x: torch.Tensor, rows: list[int]) -> tuple[list[bool], torch.Tensor]:
        assert x.shape == (sum(rows), 1, head.embed_tokens.weight.shape[1])
        rounds.append([s.session_id for s in sessions])
        return [True] * len(sessions), 2 * x  # a stand-in for the servers: doubles its input

    batcher._steps = steps  # type: ignore[method-assign]
    route_a, route_b = (("p1", 0, 3), ("p2", 3, 6)), (("p3", 0, 6),)
    sessions = [FakeSession("a1", route_a, 1), FakeSession("a22", route_a, 2), FakeSession("a333", route_a, 1)]
    sessions.append(FakeSession("b1", route_b, 1))
    try:
        got = run_threads(batcher, sessions)
    finally:
        loop.stop()
    for name, results in got.items():
        for feed, logits in results:
            if logits is None:  # stepped on its own (alone in its round): nothing computed for it
                continue
            with torch.inference_mode():
                want = head.logits(2 * head.embed(feed))[:, -1]
            assert torch.allclose(logits, want, atol=1e-5), name
    assert all(logits is None for _, logits in got["b1"])  # alone on its route: always its own step
    shared = [r for r in rounds if len(r) > 1]
    assert shared and all(set(r) <= {"a1", "a22", "a333"} for r in rounds)  # routes never mix
    assert batcher.rounds == len(rounds) and batcher.rows == sum(len(r) for r in rounds)


@pytest.mark.timeout(60)
def test_a_failed_round_hands_every_step_back(head: ClientHead) -> None:
    loop = LoopThread()
    context = SimpleNamespace(config=ClientConfig(batch_window=0.2), loop=loop)
    batcher = DecodeBatcher(head, context, "auto")  # type: ignore[arg-type]

    async def steps(sessions: list[FakeSession], x: torch.Tensor, rows: list[int]) -> tuple[list[bool], torch.Tensor]:
        raise ConnectionError("the server went away")

    batcher._steps = steps  # type: ignore[method-assign]
    route = (("p1", 0, 6),)
    try:
        got = run_threads(batcher, [FakeSession(f"s{i}", route, 1) for i in range(3)])
    finally:
        loop.stop()
    assert all(logits is None for results in got.values() for _, logits in results)
    assert batcher.rounds == 0


def test_a_zero_window_turns_rounds_off(head: ClientHead) -> None:
    context = SimpleNamespace(config=ClientConfig(batch_window=0.0), loop=None)
    batcher = DecodeBatcher(head, context, "auto")  # type: ignore[arg-type]
    session = FakeSession("s", (("p1", 0, 6),), 1)
    assert batcher.logits(session, torch.ones(1, 1, dtype=torch.long)) is None  # type: ignore[arg-type]

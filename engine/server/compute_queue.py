"""The server's compute queue: inference steps before forwards, and fair turns between client peers.

:class:`FairQueue` is the pure part: items wait under a priority and the peer that sent them; ``pop`` takes
the most urgent priority that has work and, within it, the next peer in round-robin order, so a peer that
queued a hundred requests gets one turn per round like a peer that queued one. :class:`ComputeThread` feeds one
thread from it (the device runs one request at a time) and hands results back as futures.

Batching is a layer over that order, not a second order: a job may carry a :class:`Batchable` (a key and a
payload). When the thread pops such a job, it also takes the other queued jobs with the same key (in the queue's
own order, up to a limit) and runs them as one call of ``run_many``; the pick order itself is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Priority(IntEnum):
    """Lower runs first."""

    INFERENCE = 0  # one step of an interactive session: a user waits for the next token
    FORWARD = 1  # a stateless forward of whole sequences (batch work)


class FairQueue(Generic[T]):
    """Items by priority, then round-robin across peers, then first come first served per peer.

    Not thread-safe on its own (ComputeThread guards it with a lock).
    """

    def __init__(self, favor_turns: int = 4) -> None:
        # priority -> peer -> that peer's items in arrival order; a peer's position is its turn in the round
        self._waiting: dict[int, OrderedDict[str, deque[T]]] = {}
        self._count = 0
        # Favored peers (contributors) take up to favor_turns turns in a row, then one other peer gets one:
        # first under load, yet nobody is starved.
        self.favor_turns = favor_turns
        self._favored: set[str] = set()
        self._favored_streak = 0

    def __len__(self) -> int:
        return self._count

    def put(self, item: T, priority: int, peer: str, favored: bool = False) -> None:
        """Queue ``item`` sent by ``peer``; a peer new to this priority takes its turn after the others.

        A ``favored`` item's peer is served ahead of others of the same priority (see ``favor_turns``).
        """
        self._waiting.setdefault(priority, OrderedDict()).setdefault(peer, deque()).append(item)
        self._count += 1
        if favored:
            self._favored.add(peer)

    def pop(self) -> T | None:
        """The next item to run, or None if nothing waits."""
        for priority in sorted(self._waiting):
            peers = self._waiting[priority]
            if not peers:
                continue
            peer = self._next_peer(peers)
            items = peers[peer]
            item = items.popleft()
            if items:
                peers.move_to_end(peer)  # its next item waits until every other peer had a turn
            else:
                del peers[peer]
                if peer in self._favored and not self.waiting(peer):
                    self._favored.discard(peer)
            self._count -= 1
            return item
        return None

    def take(self, match: Callable[[T], bool], limit: int) -> list[T]:
        """Remove and return up to ``limit`` queued items that ``match``, in round-robin order across peers
        (priorities first, then one matching item per peer per round, in arrival order); the other items keep
        their places. ``match`` is asked once per item at most, in that order."""
        taken: list[T] = []
        for priority in sorted(self._waiting):
            peers = self._waiting[priority]
            chosen: dict[str, list[T]] = {}
            pending = {peer: deque(items) for peer, items in peers.items()}  # items not yet asked about
            while pending and len(taken) < limit:
                for peer in list(pending):
                    if len(taken) >= limit:
                        break
                    items = pending[peer]
                    while items and not match(item := items[0]):
                        items.popleft()
                    if not items:
                        del pending[peer]
                        continue
                    taken.append(items.popleft())
                    chosen.setdefault(peer, []).append(item)
            for peer, gone in chosen.items():
                kept = deque(item for item in peers[peer] if not any(item is g for g in gone))
                if kept:
                    peers[peer] = kept
                else:
                    del peers[peer]
        self._count -= len(taken)
        return taken

    def _next_peer(self, peers: OrderedDict[str, deque[T]]) -> str:
        """The peer whose turn it is: round-robin, favored peers first unless they had favor_turns in a row."""
        first = next(iter(peers))
        if not self._favored:
            return first
        favored = next((p for p in peers if p in self._favored), None)
        other = next((p for p in peers if p not in self._favored), None)
        if favored is None or other is None:
            self._favored_streak = 0
            return first
        if self._favored_streak < self.favor_turns:
            self._favored_streak += 1
            return favored
        self._favored_streak = 0
        return other

    def waiting(self, peer: str) -> int:
        """Items ``peer`` has queued, over all priorities."""
        return sum(len(peers.get(peer, ())) for peers in self._waiting.values())


@dataclass(frozen=True)
class Batchable:
    """What lets queued jobs run together: jobs with equal ``key`` may be passed to one ``run_many`` call.

    ``run_many(payloads)`` returns one result per payload, in order. If it raises, each job runs alone (its
    own ``fn``), so one bad member fails only itself.
    """

    key: Hashable
    payload: Any
    run_many: Callable[[list[Any]], list[Any]]
    size: int = 1  # rows this job adds to a batch (its sequences)
    limit: int = 1  # rows one call may run at most


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]
    batch: Batchable | None = None


def _fits(first: Batchable) -> Callable[[_Job], bool]:
    """A matcher for jobs that may join ``first``'s batch: same key, and rows left under its limit."""
    left = first.limit - first.size

    def match(job: _Job) -> bool:
        nonlocal left
        if job.batch is None or job.batch.key != first.key or job.batch.size > left:
            return False
        left -= job.batch.size
        return True

    return match


class ComputeThread:
    """One thread running queued jobs in FairQueue order; ``submit`` returns an awaitable result."""

    def __init__(self, name: str = "corolla-compute") -> None:
        self._queue: FairQueue[_Job] = FairQueue()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    async def run(
        self, fn: Callable[[], T], priority: Priority, peer: str, batch: Batchable | None = None, favored: bool = False
    ) -> T:
        """Queue ``fn`` for ``peer`` and wait for its result; cancelling the wait drops it if not started.

        With ``batch``, the job may run inside one ``batch.run_many`` call with other queued jobs of its key.
        ``favored`` (a contributor's step) goes first in its priority, within the queue's fairness bound.
        """
        future: Future[T] = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the compute thread has stopped")
            self._queue.put(_Job(fn, future, batch), priority, peer, favored)
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not len(self._queue):
                    self._cond.wait()
                if self._stopped:
                    return
                job = self._queue.pop()
                group = [job] if job is not None else []
                if job is not None and job.batch is not None:
                    group += self._queue.take(_fits(job.batch), job.batch.limit)
            # Jobs whose callers gave up while they waited (timeout, hang-up) are dropped here.
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            if len(group) > 1 and self._run_together(group):
                continue
            for job in group:
                self._run_alone(job)

    @staticmethod
    def _run_alone(job: _Job) -> None:
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # handed to the caller, who reports it to the peer
            job.future.set_exception(e)

    @staticmethod
    def _run_together(group: list[_Job]) -> bool:
        """Run a group as one batch; False (nothing set) if the batch failed and each job should run alone."""
        first = group[0].batch
        assert first is not None  # only batchable jobs are grouped
        try:
            results = first.run_many([job.batch.payload for job in group if job.batch is not None])
        except Exception as e:
            logger.info("a batch of %d steps failed (%s); running them one by one", len(group), e)
            return False
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)
        return True

    def shutdown(self) -> None:
        """Stop after the running job; jobs still queued are cancelled."""
        with self._cond:
            self._stopped = True
            while (job := self._queue.pop()) is not None:
                job.future.cancel()
            self._cond.notify_all()

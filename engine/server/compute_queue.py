"""The server's compute queue: inference steps before forwards, and fair turns between client peers.

:class:`FairQueue` is the pure part: items wait under a priority and the peer that sent them; ``pop`` takes
the most urgent priority that has work and, within it, the next peer in round-robin order, so a peer that
queued a hundred requests gets one turn per round like a peer that queued one. :class:`ComputeThread` feeds one
thread from it (the device runs one request at a time) and hands results back as futures.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
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


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]


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

    async def run(self, fn: Callable[[], T], priority: Priority, peer: str, favored: bool = False) -> T:
        """Queue ``fn`` for ``peer`` and wait for its result; cancelling the wait drops it if not started."""
        future: Future[T] = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the compute thread has stopped")
            self._queue.put(_Job(fn, future), priority, peer, favored)
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
            if job is None or not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited (timeout, hang-up)
            try:
                job.future.set_result(job.fn())
            except BaseException as e:  # handed to the caller, who reports it to the peer
                job.future.set_exception(e)

    def shutdown(self) -> None:
        """Stop after the running job; jobs still queued are cancelled."""
        with self._cond:
            self._stopped = True
            while (job := self._queue.pop()) is not None:
                job.future.cancel()
            self._cond.notify_all()

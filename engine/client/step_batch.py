"""Decode steps of a client's concurrent sessions as one: one embedding lookup, one message per hop, one LM head.

Sessions that share a client (one thread each, e.g. an API serving many users) and a route would otherwise
send one message per session per hop per token, and run the head's big matrix once per session. A
:class:`DecodeBatcher` gathers the one-token steps of sessions on the same route and the same adapter into
rounds: the first session to arrive leads the next round; it waits until every session of its route is
there, or ``ClientConfig.batch_window`` seconds (a session busy elsewhere, e.g. reading its prompt, is not
waited for longer), then embeds every row at once, sends one batched step per hop (``HopStream.steps``;
the server runs the rows as one forward) and computes every row's logits at once. Steps that arrive while a
round runs wait for the next one (continuous batching). Each session then samples its own token.

A session keeps its own state: it checks its rows of the answer (spot checks included) and moves on only if
they pass (:meth:`InferenceSession.accept_batched_step`). Anything that goes wrong in a round hands its
sessions back to their own step, which has the usual failover; a round of one session is that step too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.hops import step_timeout
from corolla.engine.client.inputs import to_wire
from corolla.engine.client.session import InferenceSession
from corolla.engine.models.checkpoint import ClientHead

logger = logging.getLogger(__name__)

MAX_ROUND_SESSIONS = 64  # sessions one round carries at most (the rest go in the next one)
LONGEST_WAIT_S = 1.0  # a waiting session re-checks its round at least this often


@dataclass(eq=False)
class _Entry:
    session: InferenceSession
    feed: torch.Tensor  # [batch, 1] token ids
    arrived: float
    logits: torch.Tensor | None = None  # [batch, vocab], or None: run the step on its own
    done: bool = False


@dataclass(eq=False)
class _Group:
    members: set[InferenceSession] = field(default_factory=set)  # sessions decoding on this route
    pending: list[_Entry] = field(default_factory=list)  # steps waiting for the next round, in arrival order
    running: bool = False
    free_since: float = 0.0  # when the last round ended


class DecodeBatcher:
    """Rounds of one-token steps of a client's sessions on a shared route (thread-safe; see the module doc)."""

    def __init__(self, head: ClientHead, context: ClientContext, wire_dtype: str) -> None:
        self.head = head
        self.context = context
        self.wire_dtype = wire_dtype
        self.window = context.config.batch_window
        self.rounds = 0  # rounds of two sessions or more run
        self.rows = 0  # session steps those rounds carried
        self._cond = threading.Condition()
        self._groups: dict[Hashable, _Group] = {}
        self._route_of: dict[InferenceSession, Hashable] = {}

    def logits(self, session: InferenceSession, feed: torch.Tensor) -> torch.Tensor | None:
        """[batch, vocab] float32 logits of the token after ``feed`` ([batch, 1] ids, CPU), computed in a round
        with other sessions of the same route; None if the session is to run this step on its own."""
        if self.window <= 0 or feed.ndim != 2 or feed.shape[1] != 1:
            return None
        route = session.decode_route()
        if route is None:
            return None
        key = (route, session.config.active_adapter)
        entry = _Entry(session, feed, time.monotonic())
        with self._cond:
            group = self._join(session, key)
            group.pending.append(entry)
            self._cond.notify_all()
            batch = self._wait_turn(group, entry)
        if batch is None:  # the round that carried this step has run
            return entry.logits
        results: list[torch.Tensor | None] = [None] * len(batch)
        if len(batch) > 1:
            try:
                results = self._run(batch)
            except Exception as e:  # each session retries its step on its own, with failover
                logger.info("a batched step of %d sessions failed (%s); they step on their own", len(batch), e)
        with self._cond:
            for waiting, result in zip(batch, results, strict=True):
                waiting.logits, waiting.done = result, True
            group.running = False
            group.free_since = time.monotonic()
            self._cond.notify_all()
        return entry.logits

    def leave(self, session: InferenceSession) -> None:
        """``session`` stops decoding (its generation ended): rounds no longer wait for it."""
        with self._cond:
            key = self._route_of.pop(session, None)
            if key is not None:
                group = self._groups[key]
                group.members.discard(session)
                if not group.members and not group.pending and not group.running:
                    del self._groups[key]
            self._cond.notify_all()

    def _join(self, session: InferenceSession, key: Hashable) -> _Group:
        """The group of ``key``, with ``session`` a member (moved from its old route's group; lock held)."""
        old = self._route_of.get(session)
        if old is not None and old != key:
            self._groups[old].members.discard(session)
        self._route_of[session] = key
        group = self._groups.setdefault(key, _Group())
        group.members.add(session)
        return group

    def _wait_turn(self, group: _Group, entry: _Entry) -> list[_Entry] | None:
        """Wait (lock held) until ``entry``'s round ran (None) or ``entry`` leads the next one (its steps)."""
        while not entry.done:
            now = time.monotonic()
            if not group.running and group.pending and group.pending[0] is entry:
                deadline = max(entry.arrived, group.free_since) + self.window
                present = {e.session for e in group.pending}
                if group.members <= present or now >= deadline or len(group.pending) >= MAX_ROUND_SESSIONS:
                    batch, group.pending = group.pending[:MAX_ROUND_SESSIONS], group.pending[MAX_ROUND_SESSIONS:]
                    group.running = True
                    return batch
                self._cond.wait(min(deadline - now, LONGEST_WAIT_S))
            else:
                self._cond.wait(LONGEST_WAIT_S)
        return None

    @torch.inference_mode()
    def _run(self, batch: list[_Entry]) -> list[torch.Tensor | None]:
        """One round: embed every row, one batched step per hop, every row's logits; per entry its logits, or
        None where its session did not take its rows."""
        device = self.head.embed_tokens.weight.device
        rows = [e.feed.shape[0] for e in batch]
        ids = torch.cat([e.feed for e in batch], dim=0)  # [rows, 1]
        x = to_wire(self.head.embed(ids.to(device)), self.wire_dtype)  # [rows, 1, hidden]
        accepted, hidden = self.context.loop.run(self._steps([e.session for e in batch], x, rows))
        logits = self.head.logits(hidden.to(device))[:, -1]  # [rows, vocab]
        self.rounds += 1
        self.rows += len(batch)
        return [part if ok else None for part, ok in zip(torch.split(logits, rows), accepted, strict=True)]

    async def _steps(
        self, sessions: list[InferenceSession], x: torch.Tensor, rows: list[int]
    ) -> tuple[list[bool], torch.Tensor]:
        """Send ``x`` [rows, 1, hidden] through the shared route, one batched step per hop on the first session's
        streams; each session then takes its rows. Returns which sessions did, and the last hop's outputs."""
        leader = sessions[0]
        at = [(s.session_id, s.position) for s in sessions]
        states = [x]  # the input of hop k, then the last hop's output
        signed = []  # per hop: each session's signature of its rows
        for hop in leader.hops:
            timeout = step_timeout(self.context, hop.stream.peer_id, x.shape[0], hop.end - hop.start)
            out, commitments = await hop.stream.steps(at, states[-1], leader.next_step_id(), timeout)
            states.append(out)
            signed.append(commitments)
        parts = [torch.split(state, rows, dim=0) for state in states]
        taken = await asyncio.gather(
            *(
                s.accept_batched_step([p[i] for p in parts[:-1]], [p[i] for p in parts[1:]], [c[i] for c in signed])
                for i, s in enumerate(sessions)
            ),
            return_exceptions=True,
        )
        for result in taken:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        return [result is True for result in taken], states[-1]

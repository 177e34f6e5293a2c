"""Audits that run in the background of a session's steps.

An audit's stateless forward on another replica does not need the generation to wait: the session starts it
as a task on the client's event loop (:meth:`PendingAudits.start`) and goes on stepping. The schedule starts
one audit per hop at a time. The session only waits for an audit where the answer is needed: before a
generation ends (its text is never returned unverified), before a failed hop is replaced (its outputs fed the
later hops), and when a hop's audit lags too far behind its steps (:func:`lag_bound`). Where it waits, it
first starts a fresh audit of everything the hop claimed so far next to the one in flight (an audit
recomputes the hop's whole history whatever it covers, so both take about as long): the wait is one audit,
not the rest of one plus another. A finished audit is settled by the session at its next step
(:meth:`~corolla.engine.client.session.InferenceSession.step`): a lie rewinds there, exactly as if the audit
had run synchronously, only a few steps later.

While an audit runs its hop goes on recording outputs, and a rewind may drop some of the outputs it checks
(a speculative step's rejected drafts); :meth:`PendingAudits.rewind` lowers what a passed audit may vouch
for to what the hop still holds unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from corolla.engine.client.hops import Hop
from corolla.engine.client.spot_check import AuditOutcome

LAG_STEPS_WITHOUT_BOUND = 64
"""Steps a hop may take while its audit runs when ``audit_every`` sets no bound (0)."""


def lag_bound(audit_every: int) -> int:
    """Steps a hop may take while its audit runs before the session waits for it: the schedule's own bound on an
    unaudited run (``audit_every``), so a lie stands at most that many steps plus one audit's time."""
    return audit_every if audit_every > 0 else LAG_STEPS_WITHOUT_BOUND


@dataclass(eq=False)
class PendingAudit:
    """One hop's audit in flight: its outputs from ``hop.audited`` up to ``end`` are being recomputed."""

    hop: Hop
    task: asyncio.Task[AuditOutcome]
    begin: int  # the hop's first unaudited position when it began (where its recomputed outputs start)
    end: int  # one past the last position it vouches for if it passes (a rewind lowers it)
    steps: int  # the hop's unaudited steps when it began (those a pass covers)


class PendingAudits:
    """The audits a session runs in the background, oldest first; ``seconds`` they took, ``waited`` the seconds
    the session's caller spent waiting for them (the audits' cost to the generation)."""

    def __init__(self) -> None:
        self._pending: list[PendingAudit] = []
        self.seconds = 0.0
        self.waited = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def of(self, hop: Hop) -> PendingAudit | None:
        """The oldest audit of ``hop`` in flight (or finished, not yet settled), if any."""
        return next((p for p in self._pending if p.hop is hop), None)

    def all_of(self, hop: Hop) -> list[PendingAudit]:
        """Every audit of ``hop`` held, oldest first."""
        return [p for p in self._pending if p.hop is hop]

    def start(self, hop: Hop, end: int, judge: Coroutine[Any, Any, AuditOutcome]) -> PendingAudit:
        """Run ``judge`` (the audit of ``hop``'s outputs up to ``end``) as a task on the running loop."""
        began = time.perf_counter()
        task = asyncio.ensure_future(judge)
        task.add_done_callback(lambda _: self._took(time.perf_counter() - began))
        pending = PendingAudit(hop, task, hop.audited, end, hop.steps)
        self._pending.append(pending)
        return pending

    def finished(self) -> list[PendingAudit]:
        """Audits whose judgement is in, oldest first (still held: :meth:`result` takes one)."""
        return [p for p in self._pending if p.task.done()]

    def in_order(self) -> list[PendingAudit]:
        """Every audit held, oldest first."""
        return list(self._pending)

    async def result(self, pending: PendingAudit) -> AuditOutcome:
        """Wait for ``pending`` (the time counts as :attr:`waited`), forget it and return its judgement
        (an error the audit raised is raised here)."""
        if not pending.task.done():
            began = time.perf_counter()
            await asyncio.wait({pending.task})
            self.waited += time.perf_counter() - began
        self._pending.remove(pending)
        return pending.task.result()

    def rewind(self, position: int) -> None:
        """The session forgot outputs from ``position`` on: no audit vouches for them any more."""
        for p in self._pending:
            p.end = min(p.end, position)

    def drop(self, hop: Hop) -> None:
        """Forget ``hop``'s audits (the hop left the route): cancel those still running."""
        for pending in self.all_of(hop):
            self._pending.remove(pending)
            _discard(pending.task)

    def cancel_all(self) -> None:
        """Forget every audit (the session closes): cancel those still running."""
        for p in self._pending:
            _discard(p.task)
        self._pending.clear()

    def _took(self, seconds: float) -> None:
        self.seconds += seconds


def _discard(task: asyncio.Task[AuditOutcome]) -> None:
    """Cancel ``task``, or retrieve its error if it already failed (no "exception never retrieved" log)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()

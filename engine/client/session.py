"""Inference sessions: each server on the route keeps the session's attention cache; the client keeps
the inputs it sent to every hop, so a failed hop can be re-planned and its history replayed.

This module holds the session's state and its step loop; opening a route is in
:mod:`~corolla.engine.client.opening`, repairing a hop in :mod:`~corolla.engine.client.failover`,
audits in :mod:`~corolla.engine.client.spot_check`.

Every hop's outputs are kept until audited: after a step, a hop whose run of unaudited steps is due
(:func:`~corolla.engine.routing.trust.audit_due`) has that whole run recomputed on an independent replica
in one stateless forward, in the background while the session steps on
(:mod:`~corolla.engine.client.pending_audits`); :meth:`InferenceSession.audit` waits for those and audits
everything left (the token loop calls it before a generation ends). When a server is caught, the session
rewinds to its first unaudited position, moves off the liar, and raises
:class:`~corolla.engine.errors.OutputRetracted` (at the step after the audit's judgement came in, or from
:meth:`InferenceSession.audit`): the caller feeds again from there, so no lie survives in what the user gets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import torch

from corolla.engine.client.context import ClientContext, OnClient
from corolla.engine.client.failover import replace_hop, replay
from corolla.engine.client.forwarding import (
    HopAnswer,
    forwarded_deadlines,
    settle_forwarded_step,
)
from corolla.engine.client.hops import RETRYABLE, Hop, chunks, close_hops, describe_hops, first_silent, step_timeout
from corolla.engine.client.notices import NOTICES
from corolla.engine.client.opening import open_route
from corolla.engine.client.pending_audits import PendingAudit, PendingAudits, lag_bound
from corolla.engine.client.remote import commitment_of
from corolla.engine.client.reporting import evidence, publish, reporter_identity
from corolla.engine.client.spot_check import audit
from corolla.engine.client.verify import output_problem
from corolla.engine.config import ClientConfig
from corolla.engine.errors import (
    OutputRetracted,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
    short_peer,
)
from corolla.engine.routing.trust import Verdict, audit_due

logger = logging.getLogger(__name__)


class InferenceSession(OnClient):
    """A generation session over the swarm: ``step`` sends hidden states of new tokens through the route.

    Use as a context manager (or call ``close``) so servers free their caches promptly.

    With ``recurrent=True`` (a model whose blocks keep a recurrent state, e.g. Qwen3-Next's linear attention)
    servers cannot forget tokens past a position: after :meth:`rewind` the next step first replays every hop's
    kept inputs up to the new position from position 0, which rebuilds the states exactly.
    """

    def __init__(self, context: ClientContext, max_length: int, *, recurrent: bool = False) -> None:
        self.context = context
        self.max_length = max_length
        self.recurrent = recurrent
        self._replay_due = False  # a rewind left servers' recurrent states ahead of ``position``
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every server of the route holds
        self.batch_size: int | None = None
        self.hops: list[Hop] = []
        self.closed = False
        self.failovers = 0
        self._token_ids: torch.Tensor | None = None  # [batch, position] ids fed so far
        self._pending_ids: torch.Tensor | None = None  # [batch, 1] sampled but not yet fed
        self._step_id = 0
        self.avoid: set[str] = set()  # peers caught lying (or on a route that lied) in this session: never again
        self.liars: set[str] = set()  # peers this session convicted
        self.unverified: dict[tuple[int, int], str] = {}  # (start, end) of hops whose output no replica could check
        self.checks = 0  # audits run
        self.pending_audits = PendingAudits()  # audits in the background; the seconds they took and were waited on
        self.retractions = 0  # times an audit caught a liar and the session rewound
        # servers push each hop's output to the next (off after a mismatch)
        self._forwarding = context.config.forwarding
        self.forwarded_steps = 0  # steps whose every hop ran forwarded
        self._rng = random.Random()

    # ---- the client it belongs to -----------------------------------------------------------
    @property
    def config(self) -> ClientConfig:
        """The settings this session runs with."""
        return self.context.config

    # ---- public API -------------------------------------------------------------------------
    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] inputs of block 0 through the route; return last block's outputs.

        Raises:
            OutputRetracted: an audit (started after this or an earlier step, and run in the background) caught a
                server lying; the session rewound to ``error.position``: drop what came from later outputs, feed
                again from there.
        """
        if self.closed:
            raise SessionClosedError("this inference session is closed; open a new one")
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, length, hidden], got {list(hidden.shape)}")
        if self.batch_size is None:
            self.batch_size = hidden.shape[0]
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(f"this session runs {self.batch_size} sequences, got {hidden.shape[0]}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"the session holds {self.position} tokens; {hidden.shape[1]} more exceed max_length="
                f"{self.max_length}. Open the session with a larger max_length."
            )
        return self.loop.run(self._step(hidden))

    def rewind(self, position: int) -> None:
        """Forget tokens from ``position`` on (servers drop them at the next step)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the session holds {self.position} tokens")
        if self.recurrent and position < self.position:
            self._replay_due = True
        self.position = position
        self.pending_audits.rewind(position)
        for hop in self.hops:
            hop.rewind(position)

    def audit(self) -> None:
        """Audit every hop's unaudited outputs now, waiting for those in the background (a no-op with
        ``verify_rate=0``).

        Raises:
            OutputRetracted: a server was caught lying (see :meth:`step`).
        """
        if self.closed:
            raise SessionClosedError("this inference session is closed; open a new one")
        if self._auditing and self.hops:
            self.loop.run(self._audit_all())

    def close(self) -> None:
        """Free the servers' caches (idempotent, never raises, never waits: the goodbyes are sent from the
        client's loop, and the caller, e.g. ``generate`` returning its tokens, does not wait for a thread hop)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.submit(self._close())
        except Exception as e:  # closing is best effort: servers also free idle sessions themselves
            logger.debug("closing session: %s", e)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def verified(self) -> bool:
        """False if some hop's output could not be checked on an independent replica (see :attr:`unverified`)."""
        return not self.unverified

    @property
    def forwarding(self) -> bool:
        """Whether servers push each hop's output to the next (turned off after a mismatch)."""
        return self._forwarding

    def use_forwarding(self, on: bool) -> None:
        """Turn server-to-server forwarding on or off for the next steps."""
        self._forwarding = on

    def avoid_peers(self, peers: Iterable[str]) -> None:
        """Never route this session through ``peers`` again."""
        self.avoid.update(peers)

    # ---- token ids (kept for the model's token loop) ----------------------------------------
    @property
    def token_ids(self) -> torch.Tensor | None:
        """[batch, position] token ids fed to the servers so far (None before the first)."""
        return self._token_ids

    @property
    def pending_ids(self) -> torch.Tensor | None:
        """[batch, 1] ids sampled but not yet fed to the servers (None if there are none)."""
        return self._pending_ids

    def take_pending(self, new_ids: torch.Tensor) -> torch.Tensor:
        """The ids to feed next, [batch, n]: the pending sampled ids (if any), then ``new_ids``."""
        feed = new_ids if self._pending_ids is None else torch.cat([self._pending_ids, new_ids], dim=1)
        self._pending_ids = None
        return feed

    def record_fed(self, token_ids: torch.Tensor) -> None:
        """The servers now hold ``token_ids`` [batch, position] (every id fed so far); nothing is pending."""
        self._token_ids, self._pending_ids = token_ids, None

    def hold_pending(self, ids: torch.Tensor) -> None:
        """``ids`` [batch, 1] were sampled and go to the servers with the next fed tokens."""
        self._pending_ids = ids

    def reuse_prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens of ``ids`` [1, n] this session does not hold yet; rewinds the session where they diverge."""
        if self._token_ids is None:
            return ids
        held = self._token_ids
        if self._pending_ids is not None:
            held = torch.cat([held, self._pending_ids], dim=1)
        n = min(held.shape[1], ids.shape[1] - 1)  # always feed at least one token to get logits
        same = int((held[0, :n] == ids[0, :n]).long().cumprod(0).sum()) if n > 0 else 0
        fed = self._token_ids.shape[1]
        if same < fed:
            self.rewind(same)
            self._token_ids = self._token_ids[:, :same]
            self._pending_ids = None
            return ids[:, same:]
        # Everything fed is reused; the pending token (if it matches) is fed along with the rest.
        self._pending_ids = None
        return ids[:, fed:]

    # ---- batched decode steps (client/step_batch.py) ----------------------------------------
    def decode_route(self) -> tuple[tuple[str, int, int], ...] | None:
        """The live route as (peer, start, end) per hop, if this session's next one-token step may travel in a
        batched step with other sessions of the same route (None: it runs on its own)."""
        if self.closed or not self.hops or not 0 < self.position < self.max_length:
            return None
        if any(h.stream.closed for h in self.hops):
            return None
        if self.recurrent:  # recurrent states step alone (servers never batch them, and a rewind replays first)
            return None
        return tuple((h.stream.peer_id, h.start, h.end) for h in self.hops)

    def next_step_id(self) -> int:
        """A fresh step id for a message on this session's streams."""
        return self._next_step_id()

    async def accept_batched_step(
        self,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        commitments: list[bytes | None] | None = None,
    ) -> bool:
        """Take this session's rows of a batched step: ``inputs[k]`` went to hop ``k``, which answered
        ``outputs[k]`` (each [batch, 1, hidden]) signed with ``commitments[k]`` (None: unsigned). Every output
        is checked for shape and values as for a step of its own; if every hop passes, the hops keep inputs and outputs (to replay and to audit) and the session
        moves one token on (True). A hop that answered garbage is banned and replaced and nothing is kept
        (False): the step is to be run again on its own. Audits due after the step run in
        :meth:`audit_scheduled`, which the caller runs next (a caught liar raises there, not here)."""
        for k, (hop, x, out) in enumerate(zip(self.hops, inputs, outputs, strict=True)):
            problem = output_problem(out, x.shape, x.dtype)
            if problem is not None:
                peer = hop.stream.peer_id
                self.manager.ban(peer, f"server {short_peer(peer)} {problem}")
                await self._repair(k)
                return False
        signed = commitments if commitments is not None else [None] * len(self.hops)
        for hop, x, out, commitment in zip(self.hops, inputs, outputs, signed, strict=True):
            self.manager.mark_ok(hop.stream.peer_id)
            hop.record(x, out, commitment)
        self.position += 1
        return True

    def audit_scheduled(self) -> None:
        """Start the audits the schedule says are due now (after a step taken in a batched round), and settle
        those whose judgement came in.

        Raises:
            OutputRetracted: a server was caught lying (see :meth:`step`).
        """
        if self._auditing and self.hops:
            self.loop.run(self._audit_due())

    # ---- internals (run on the client's event loop) -----------------------------------------
    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    @property
    def _auditing(self) -> bool:
        return self.config.verify_rate > 0

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in chunks(hidden, self.config.max_chunk_bytes):
            outputs.append(await self._step_chunk(chunk))
        if self._auditing:
            await self._audit_due()
        return torch.cat(outputs, dim=1)

    async def _close(self) -> None:
        self.pending_audits.cancel_all()
        await close_hops(list(self.hops), self.session_id)

    async def _audit_due(self) -> None:
        """Settle the audits whose judgement is in, then start those the schedule says are due (each after its
        new server's first steps, then now and then): one per hop at a time, waited for only once the hop's steps
        since it began reach :func:`~corolla.engine.client.pending_audits.lag_bound` (the next one starts then)."""
        for pending in self.pending_audits.finished():
            await self._settle(pending)
        for hop in list(self.hops):
            pending = self.pending_audits.of(hop)
            if pending is not None:
                if hop.steps - pending.steps >= lag_bound(self.config.audit_every):
                    self._start_audit(hop)  # the next audit runs while the session waits for this one
                    await self._settle(pending)
                continue
            passed = self.manager.checks_passed(hop.stream.peer_id)
            if (hop.start, hop.end) in self.unverified:  # no replica of another group: on the schedule only
                passed = max(passed, self.config.verify_first_steps)
            due = audit_due(
                hop.steps,
                passed=passed,
                first_steps=self.config.verify_first_steps,
                every=self.config.audit_every,
                rate=self.config.verify_rate,
                draw=self._rng.random(),
            )
            if due:
                self._start_audit(hop)

    async def _audit_all(self) -> None:
        """Audit every hop's unaudited outputs: start an audit of each hop's claims at once (next to one in
        flight, which covers only part of them), then settle every audit held, oldest first."""
        for hop in self.hops:
            self._start_audit(hop)
        for pending in self.pending_audits.in_order():
            await self._settle(pending)

    async def _audit_hop(self, i: int) -> None:
        """Audit hop ``i``'s unaudited outputs now (next to its audit in flight, if any, settled first); on a lie,
        rewind, move off the liar, raise OutputRetracted."""
        hop = self.hops[i]
        self._start_audit(hop)
        for pending in self.pending_audits.all_of(hop):
            await self._settle(pending)

    def _index_of(self, hop: Hop) -> int | None:
        """Where ``hop`` is on the live route (None: it was replaced; Hops compare by identity here)."""
        return next((k for k, h in enumerate(self.hops) if h is hop), None)

    def _start_audit(self, hop: Hop) -> PendingAudit | None:
        """Start auditing ``hop``'s unaudited outputs in the background (None: it has none)."""
        claimed = hop.claimed()
        if claimed is None:
            return None
        end = hop.audited + claimed.shape[1]
        inputs = hop.history(end)
        assert inputs is not None  # claims exist, so inputs do
        self.checks += 1
        blocks = (hop.start, hop.end)
        judging = audit(self.context, hop.stream.peer_id, blocks, inputs, claimed, self.avoid, self._rng)
        return self.pending_audits.start(hop, end, judging)

    async def _settle(self, pending: PendingAudit) -> Verdict:
        """Wait for ``pending``'s judgement and act on it; on a lie, rewind, move off the liar, publish the
        evidence, raise OutputRetracted."""
        outcome = await self.pending_audits.result(pending)
        judgement = outcome.judgement
        hop = pending.hop
        peer = hop.stream.peer_id
        self.avoid.update(judgement.liars, judgement.suspects)
        for liar in judgement.liars:
            self.liars.add(liar)
            self.manager.convict(liar, hop.start, hop.end, "its output differed from two independent replicas'")
        if peer in judgement.liars and outcome.truth is not None and self.config.publish_reports:
            reporter = reporter_identity()
            report = evidence(
                self.manager.model,
                hop,
                (pending.begin, pending.end),
                outcome.truth,
                outcome.witnesses,
                outcome.rel_tol,
                reporter,
            )
            if report is not None:
                publish(self.context, report, reporter)
            else:
                logger.info("the lie of %s carries no signature: reported locally only", short_peer(peer))
        if judgement.verdict is Verdict.AGREE:
            self.manager.passed_check(peer)
            hop.passed_audit(pending.end, pending.steps)
            return judgement.verdict
        if judgement.verdict is Verdict.UNVERIFIED:
            hop.postpone()  # kept: a replica that joins later may still check them
            if (hop.start, hop.end) not in self.unverified:
                why = f"only {short_peer(peer)}'s address group serves blocks {hop.start}:{hop.end}"
                self.unverified[(hop.start, hop.end)] = why
                await NOTICES.report(self.context, peer, hop.start, hop.end, why)
            return judgement.verdict
        if judgement.verdict is Verdict.DISPUTED:
            why = f"replicas of blocks {hop.start}:{hop.end} disagree with {short_peer(peer)} and no third group settles it"
            logger.warning("%s: moving off it", why)
            self.unverified.setdefault((hop.start, hop.end), why)
        position = min(hop.audited, self.position)
        logger.warning(
            "rewinding to position %d: %s's outputs on blocks %d:%d since then are recomputed",
            position,
            short_peer(peer),
            hop.start,
            hop.end,
        )
        self.rewind(position)
        self.retractions += 1
        i = self._index_of(hop)
        if i is not None:  # (it always is: a hop's audit is settled or dropped before the hop is replaced)
            await self._replace(i)
        raise OutputRetracted(position, judgement.liars or (peer,))

    async def _step_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hops:
            await self._build(0, self.manager.num_blocks)
            self._replay_due = False  # fresh servers hold nothing to rebuild
        if self._replay_due:
            await self._replay_rewound()
        i = 0
        if self._forwarding and len(self.hops) > 1 and all(self.manager.forwards(h.stream.peer_id) for h in self.hops):
            i, x = await self._forwarded(x)
        failed: set[str] = set()  # peers that failed this step: each failure of a new one is free
        attempts = 0  # failures of peers that had failed before (the retry budget)
        while i < len(self.hops):
            hop = self.hops[i]
            peer = hop.stream.peer_id
            blocks = hop.end - hop.start
            try:
                began = time.perf_counter()
                step_id = self._next_step_id()
                timeout = step_timeout(self.context, peer, x.shape[0] * x.shape[1], blocks)
                out, commitment = await hop.stream.committed_step(self.session_id, x, self.position, step_id, timeout)
                problem = output_problem(out, x.shape, x.dtype)
                if problem is not None:
                    raise ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer)
                if x.shape[1] == 1:
                    self.manager.record_step(peer, time.perf_counter() - began, blocks)
            except RETRYABLE as e:
                if peer in failed:
                    attempts += 1
                    if attempts > self.config.max_retries:
                        raise
                failed.add(peer)
                self.manager.ban(peer, str(e))
                await self._repair(i)
                continue  # retry the same hop index: the replacement route starts there
            self.manager.mark_ok(peer)
            hop.record(x, out, commitment)
            x = out
            i += 1
        self.position += x.shape[1]
        return x

    async def _forwarded(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Run a step with server-to-server forwarding; (hops done, input of the next hop).

        The client sends ``x`` to the first hop and asks every other hop to take its input from its
        predecessor's push; every hop still answers the client, so the client holds each hop's input for
        replay and spot checks. What cannot be kept (see :func:`settle_forwarded_step`) is redone the classic way.
        """
        hops = list(self.hops)
        peers = [hop.stream.peer_id for hop in hops]
        tokens = x.shape[0] * x.shape[1]
        timeouts = [step_timeout(self.context, hop.stream.peer_id, tokens, hop.end - hop.start) for hop in hops]
        plan = forwarded_deadlines(timeouts, self.config.stall_timeout)
        base = self._step_id + 1
        self._step_id += len(hops)
        tasks = [
            asyncio.ensure_future(
                hop.stream.forwarded_step(
                    self.session_id,
                    x if k == 0 else None,
                    x.shape,
                    self.position,
                    base + k,
                    plan.ceilings[k],
                    from_peer=peers[k - 1] if k > 0 else None,
                    wait=plan.waits[k],
                    next_peer=peers[k + 1] if k + 1 < len(hops) else None,
                    push_within=plan.pushes[k],
                )
            )
            for k, hop in enumerate(hops)
        ]
        silent = await first_silent(tasks, plan)
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        if silent is not None:  # cancelled: its input was due long ago and it never answered
            results[silent] = PeerUnavailableError(
                peers[silent], f"no answer within {plan.stages[silent]:.1f} s of its input"
            )
        answers: list[HopAnswer | BaseException] = []
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, PeerError):
                    raise result
                answers.append(result)
                continue
            out, meta = result
            problem = output_problem(out, x.shape, x.dtype)
            if problem is not None:
                answers.append(ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer))
            else:
                answers.append(HopAnswer(out, meta.input_digest, meta.forward_error, commitment_of(meta)))
        verdict = settle_forwarded_step(x, answers, peers)
        for k in range(verdict.done):
            answer = answers[k]
            assert isinstance(answer, HopAnswer)
            self.manager.mark_ok(peers[k])
            hops[k].record(x, answer.out, answer.commitment)
            x = answer.out
        if verdict.done == len(hops):
            self.forwarded_steps += 1
            return verdict.done, x
        if verdict.mismatch:
            done = verdict.done
            source = f"{short_peer(peers[done - 1])} returned" if done else "the client sent"
            logger.warning(
                "forwarding off for this session: %s computed on another input than %s",
                short_peer(peers[done]),
                source,
            )
            self._forwarding = False
        elif isinstance(verdict.blame, RETRYABLE):
            peer = verdict.blame.peer_id or peers[verdict.done]
            self.manager.ban(peer, str(verdict.blame))
            await self._repair(verdict.done)
        return verdict.done, x

    async def _replay_rewound(self) -> None:
        """After a rewind, rebuild each hop's recurrent state: its inputs up to ``position``, sent from position 0
        (a hop that fails meanwhile is replaced, and its replacement replayed, as in failover)."""
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            try:
                await replay(self.context, self.session_id, [hop], hop.history(self.position), self._next_step_id)
            except RETRYABLE as e:
                self.manager.ban(hop.stream.peer_id, str(e))
                before = len(self.hops)
                await self._repair(i)
                i += len(self.hops) - before  # the new hops were replayed by the repair
            i += 1
        self._replay_due = False
        logger.info("rewound to %d: replayed the recurrent states of %d hops", self.position, len(self.hops))

    async def _repair(self, index: int) -> None:
        """Replace a failed hop ``index``; its unaudited outputs are audited first (they fed the later hops)."""
        if self._auditing:
            await self._audit_hop(index)  # raises OutputRetracted (after replacing it) if the server lied
        await self._replace(index)

    async def _replace(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over the same blocks and replay its history into it."""
        self.pending_audits.drop(self.hops[index])
        new_hops = await replace_hop(
            self.context,
            self.session_id,
            self.hops[index],
            position=self.position,
            max_length=self.max_length,
            batch_size=self.batch_size or 1,
            avoid=self.avoid,
            next_step_id=self._next_step_id,
        )
        for hop in new_hops:
            hop.mark_audited(self.position)  # the replay's outputs fed nobody
        self.hops[index : index + 1] = new_hops
        self.failovers += 1

    async def _build(self, start: int, end: int) -> None:
        self.hops = await open_route(
            self.context,
            self.session_id,
            start,
            end,
            max_length=self.max_length,
            batch_size=self.batch_size or 1,
            exclude=(),
            avoid=self.avoid,
        )
        logger.info("route %s", describe_hops(self.hops))


class ActiveSession(InferenceSession):
    """An inference session that is its model's active session in the thread that entered it.

    ``active`` is the model's per-thread record: ``active.stack`` lists the sessions each thread entered
    with ``with``, innermost last.
    """

    def __init__(
        self, active: threading.local, context: ClientContext, max_length: int, *, recurrent: bool = False
    ) -> None:
        super().__init__(context, max_length, recurrent=recurrent)
        self._active = active

    def __enter__(self) -> ActiveSession:
        if not hasattr(self._active, "stack"):
            self._active.stack = []
        self._active.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack: list[InferenceSession] = getattr(self._active, "stack", [])
        if self in stack:
            stack.remove(self)
        super().__exit__(*exc)

"""Inference sessions: each server on the route keeps the session's attention cache; the client keeps
the inputs it sent to every hop, so a failed hop can be re-planned and its history replayed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.forwarding import HopAnswer, judge
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.remote import HopStream, remote_info
from corolla.engine.client.spot_check import spot_check
from corolla.engine.client.verify import output_problem
from corolla.engine.config import PROTOCOL_VERSION, ClientConfig
from corolla.engine.errors import (
    CacheFullError,
    MissingBlocksError,
    NoRouteError,
    PeerError,
    PeerUnavailableError,
    ProtocolError,
    SessionClosedError,
    short_peer,
)
from corolla.engine.routing.planner import RouteHop
from corolla.engine.routing.sequence_manager import SequenceManager, describe_route
from corolla.engine.routing.trust import (
    Verdict,
    on_this_machine,
    probe_problem,
    should_verify,
    silent_bound,
    warn_unverified,
)

logger = logging.getLogger(__name__)

_RETRYABLE = (PeerUnavailableError, CacheFullError, SessionClosedError, ProtocolError)
PROBE_BATCH = 16
"""Servers probed at once when a route needs a new one (the route's own, then other candidates)."""
PEERS_TIMEOUT_S = 2.0
"""Seconds to ask the p2p daemon where a server's connections come from (else it counts as a stranger)."""

_warned_unverified: set[tuple[str, int, int]] = set()  # (model, start, end) warned about in this process
_warned_lock = threading.Lock()


@dataclass
class _Hop:
    """One hop of the live route and every input it has been sent (for replay)."""

    stream: HopStream
    inputs: list[torch.Tensor] = field(default_factory=list)  # each [batch, new, hidden]

    @property
    def start(self) -> int:
        return self.stream.start

    @property
    def end(self) -> int:
        return self.stream.end

    def history(self, length: int) -> torch.Tensor | None:
        """Inputs of the first ``length`` positions, [batch, length, hidden]."""
        if length == 0 or not self.inputs:
            return None
        return torch.cat(self.inputs, dim=1)[:, :length]


class InferenceSession:
    """A generation session over the swarm: ``step`` sends hidden states of new tokens through the route.

    Use as a context manager (or call ``close``) so servers free their caches promptly.
    """

    def __init__(
        self,
        manager: SequenceManager,
        p2p: Any,
        loop: LoopThread,
        config: ClientConfig,
        max_length: int,
    ) -> None:
        self.manager = manager
        self.p2p = p2p
        self.loop = loop
        self.config = config
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every server of the route holds
        self.batch_size: int | None = None
        self.hops: list[_Hop] = []
        self.closed = False
        self.failovers = 0
        self.token_ids: torch.Tensor | None = None  # [batch, position] ids fed so far (kept by the model)
        self.pending_ids: torch.Tensor | None = None  # sampled but not yet fed (kept by the model)
        self._step_id = 0
        self.avoid: set[str] = set()  # peers caught lying (or on a route that lied) in this session: never again
        self.liars: set[str] = set()  # peers this session convicted
        self.unverified: dict[tuple[int, int], str] = {}  # (start, end) of hops whose output no replica could check
        self.checks = 0  # spot checks run
        self.forwarding = config.forwarding  # servers push each hop's output to the next (off after a mismatch)
        self.forwarded_steps = 0  # steps whose every hop ran forwarded
        self._rng = random.Random()

    # ---- public API -------------------------------------------------------------------------
    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run [batch, new, hidden] inputs of block 0 through the route; return last block's outputs."""
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
        self.position = position
        for hop in self.hops:
            hist = hop.history(position)
            hop.inputs = [hist] if hist is not None else []

    def close(self) -> None:
        """Free the servers' caches (idempotent, never raises)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.run(self._close_all(self.hops), timeout=10)
        except Exception as e:  # closing is best effort: servers also free idle sessions themselves
            logger.debug("closing session: %s", e)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals (run on the client's event loop) -----------------------------------------
    async def _close_all(self, hops: list[_Hop]) -> None:
        for hop in hops:
            await hop.stream.close(self.session_id)

    def _chunks(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
        size = max(1, self.config.max_chunk_bytes // per_token)
        return [hidden[:, i : i + size] for i in range(0, hidden.shape[1], size)]

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in self._chunks(hidden):
            outputs.append(await self._step_chunk(chunk))
        return torch.cat(outputs, dim=1)

    @property
    def verified(self) -> bool:
        """False if some hop's output could not be checked on an independent replica (see :attr:`unverified`)."""
        return not self.unverified

    def _timeout(self, peer_id: str, tokens: int, blocks: int) -> float:
        """Seconds to wait for a step before the server counts as silent: tied to its measured round trip."""
        return silent_bound(
            self.manager.rtt.get(peer_id, self.manager.ping.get(peer_id)),
            tokens,
            blocks,
            self.manager.believed_block_s(peer_id),
            floor_s=self.config.stall_timeout,
            ceiling_s=self.config.step_timeout,
        )

    async def _verify(self, hop: _Hop, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Spot-check ``out`` when due; False if the hop's server lied (convicted) or is suspect (avoided)."""
        peer = hop.stream.peer_id
        # A hop already known to have no independent replica is checked at the rate only (it may gain one).
        seen = self.config.verify_first_steps if (hop.start, hop.end) in self.unverified else 0
        due = should_verify(
            max(self.manager.checked.get(peer, 0), seen),
            first_steps=self.config.verify_first_steps,
            rate=self.config.verify_rate,
            draw=self._rng.random(),
        )
        if not due:
            return True
        self.checks += 1
        history = hop.history(self.position)
        inputs = x if history is None else torch.cat([history, x], dim=1)
        judgement = await spot_check(
            self.manager, self.p2p, self.config, peer, (hop.start, hop.end), inputs, out, self.avoid
        )
        self.avoid.update(judgement.liars, judgement.suspects)
        for liar in judgement.liars:
            self.liars.add(liar)
            reason = "its output differed from two independent replicas'"
            self.manager.convict(liar, hop.start, hop.end, reason)
        if judgement.verdict is Verdict.AGREE:
            self.manager.passed_check(peer)
        elif judgement.verdict is Verdict.UNVERIFIED and (hop.start, hop.end) not in self.unverified:
            why = f"only {short_peer(peer)} serves blocks {hop.start}:{hop.end}"
            self.unverified[(hop.start, hop.end)] = why
            await self._warn_unverified(peer, hop.start, hop.end, why)
        elif judgement.verdict is Verdict.DISPUTED:
            logger.warning(
                "replicas of blocks %d:%d disagree with %s and none settles it: moving off it",
                hop.start,
                hop.end,
                short_peer(peer),
            )
        return judgement.verdict in (Verdict.AGREE, Verdict.UNVERIFIED)

    async def _warn_unverified(self, peer: str, start: int, end: int, why: str) -> None:
        """Log, once per process and span, that a stranger's hop could not be checked (results keep every one)."""
        span = (self.manager.model, start, end)
        own = self.config.swarm_key_file is not None or on_this_machine(await self._observed_addrs(peer))
        with _warned_lock:
            if not warn_unverified(span, own_servers=own, warned=_warned_unverified):
                logger.debug("output is unverified: %s (the swarm's servers are your own)", why)
                return
            _warned_unverified.add(span)
        logger.warning("output is unverified: %s (no other server holds these blocks to check it)", why)

    async def _observed_addrs(self, peer: str) -> list[str]:
        """Addresses this client's open connections to ``peer`` come from (empty if unknown)."""
        try:
            peers = await asyncio.wait_for(self.p2p.list_peers(), PEERS_TIMEOUT_S)
        except Exception as e:  # unknown origin: the server counts as a stranger's
            logger.debug("listing connected peers: %s", e)
            return []
        return [str(a) for info in peers if str(info.peer_id) == peer for a in info.addrs]

    async def _step_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hops:
            await self._build(0, self.manager.num_blocks)
        i = 0
        if (
            self.forwarding
            and len(self.hops) > 1
            and all(h.stream.peer_id in self.manager.forwarders for h in self.hops)
        ):
            i, x = await self._forwarded(x)
        failed: set[str] = set()  # peers that failed this step: each failure of a new one is free
        attempts = 0  # failures of peers that had failed before (the retry budget)
        while i < len(self.hops):
            hop = self.hops[i]
            peer = hop.stream.peer_id
            blocks = hop.end - hop.start
            try:
                began = time.perf_counter()
                self._step_id += 1
                timeout = self._timeout(peer, x.shape[0] * x.shape[1], blocks)
                out = await hop.stream.step(self.session_id, x, self.position, self._step_id, timeout)
                problem = output_problem(out, x.shape, x.dtype)
                if problem is not None:
                    raise ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer)
                if x.shape[1] == 1:
                    self.manager.record_step(peer, time.perf_counter() - began, blocks)
            except _RETRYABLE as e:
                if peer in failed:
                    attempts += 1
                    if attempts > self.config.max_retries:
                        raise
                failed.add(peer)
                self.manager.ban(peer, str(e))
                await self._repair(i)
                continue  # retry the same hop index: the replacement route starts there
            if not await self._verify(hop, x, out):
                await self._repair(i)
                continue  # the liar's answer is dropped; its replacement recomputes the step
            self.manager.mark_ok(peer)
            hop.inputs.append(x)
            x = out
            i += 1
        self.position += x.shape[1]
        return x

    async def _forwarded(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Run a step with server-to-server forwarding; (hops done, input of the next hop).

        The client sends ``x`` to the first hop and asks every other hop to take its input from its
        predecessor's push; every hop still answers the client, so the client holds each hop's input for
        replay and spot checks. What cannot be kept (see :func:`judge`) is redone the classic way.
        """
        hops = list(self.hops)
        peers = [hop.stream.peer_id for hop in hops]
        tokens = x.shape[0] * x.shape[1]
        timeouts = [self._timeout(hop.stream.peer_id, tokens, hop.end - hop.start) for hop in hops]
        base = self._step_id + 1
        self._step_id += len(hops)
        results = await asyncio.gather(
            *(
                hop.stream.forwarded_step(
                    self.session_id,
                    x if k == 0 else None,
                    x.shape,
                    self.position,
                    base + k,
                    # waits for its predecessors, computes, then may take as long again to push
                    sum(timeouts[: k + 1]) + (timeouts[k] if k + 1 < len(hops) else 0.0),
                    from_peer=peers[k - 1] if k > 0 else None,
                    wait=sum(timeouts[:k]),
                    next_peer=peers[k + 1] if k + 1 < len(hops) else None,
                    push_within=timeouts[k] / 2,
                )
                for k, hop in enumerate(hops)
            ),
            return_exceptions=True,
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
                answers.append(HopAnswer(out, meta.input_digest, meta.forward_error))
        verdict = judge(x, answers, peers)
        for k in range(verdict.done):
            answer = answers[k]
            assert isinstance(answer, HopAnswer)
            if not await self._verify(hops[k], x, answer.out):
                await self._repair(k)  # the liar's answer is dropped; its replacement recomputes the step
                return k, x
            self.manager.mark_ok(peers[k])
            hops[k].inputs.append(x)
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
            self.forwarding = False
        elif isinstance(verdict.blame, _RETRYABLE):
            peer = verdict.blame.peer_id or peers[verdict.done]
            self.manager.ban(peer, str(verdict.blame))
            await self._repair(verdict.done)
        return verdict.done, x

    async def _repair(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over the same blocks and replay its history into it."""
        broken = self.hops[index]
        await broken.stream.close(self.session_id)
        history = broken.history(self.position)
        began = time.perf_counter()
        exclude = {broken.stream.peer_id, *self.avoid}
        for attempt in range(self.config.max_retries + 1):
            new_hops = await self._plan_and_open(broken.start, broken.end, exclude=exclude)
            try:
                await self._replay(new_hops, history)
            except _RETRYABLE as e:
                await self._close_all(new_hops)
                failed = _culprit(e, new_hops)
                self.manager.ban(failed, str(e))
                exclude.add(failed)
                if attempt == self.config.max_retries:
                    raise
                continue
            break
        self.hops[index : index + 1] = new_hops
        self.failovers += 1
        logger.info(
            "failover: blocks %d:%d moved to %s, replayed %d tokens in %.2f s",
            broken.start,
            broken.end,
            describe_route([RouteHop(h.stream.peer_id, h.start, h.end) for h in new_hops]),
            self.position,
            time.perf_counter() - began,
        )

    async def _replay(self, hops: list[_Hop], history: torch.Tensor | None) -> None:
        """Send the inputs of every position the session holds through ``hops`` (rebuilding their caches)."""
        x = history
        for hop in hops:
            if x is None:
                return
            outputs: list[torch.Tensor] = []
            position = 0
            for chunk in self._chunks(x):
                self._step_id += 1
                timeout = self._timeout(hop.stream.peer_id, chunk.shape[0] * chunk.shape[1], hop.end - hop.start)
                out = await hop.stream.step(self.session_id, chunk, position, self._step_id, timeout)
                problem = output_problem(out, chunk.shape, chunk.dtype)
                if problem is not None:
                    raise ProtocolError(
                        f"server {short_peer(hop.stream.peer_id)} {problem}", peer_id=hop.stream.peer_id
                    )
                outputs.append(out)
                position += chunk.shape[1]
            hop.inputs = [x]
            x = torch.cat(outputs, dim=1)

    def _probe_timeout(self) -> float:
        """Seconds a new server may take to answer its probe: tied to the round trips measured so far.

        Five times the median round trip of the servers already probed (at least ``stall_timeout``);
        ``connect_timeout`` before any was measured.
        """
        pings = sorted(self.manager.ping.values())
        if not pings:
            return self.config.connect_timeout
        typical = pings[len(pings) // 2]
        return silent_bound(
            typical, 0, 0, 0.0, floor_s=self.config.stall_timeout, ceiling_s=self.config.connect_timeout
        )

    async def _probe(self, hops: list[_Hop], start: int, end: int, exclude: set[str]) -> list[tuple[_Hop, PeerError]]:
        """Ask every server of ``hops`` not yet probed for its info; the hops whose server failed, and why.

        A server carries a session only once it answered with this client's protocol version, this model
        and a span that holds the hop's blocks (a record alone is a claim anyone could make). Up to
        :data:`PROBE_BATCH` other unprobed servers of the same blocks are probed at the same time, so a
        swarm full of fake records costs a few rounds of probes, not one round per fake; those that fail
        join ``exclude``.
        """
        new = [hop for hop in hops if hop.stream.peer_id not in self.manager.probed]
        if not new:
            return []
        extra = self.manager.unprobed(start, end, exclude | {h.stream.peer_id for h in hops}, PROBE_BATCH - len(new))
        candidates = [*new, *(_Hop(HopStream(p, max(start, s), min(end, e))) for p, s, e in extra)]

        async def probe(hop: _Hop) -> None:
            peer = hop.stream.peer_id
            began = time.perf_counter()
            proof = credentials_for(self.config).proof(self.p2p.peer_id.to_base58(), peer)
            info = await remote_info(self.p2p, peer, self._probe_timeout(), proof=proof)
            problem = probe_problem(
                info, version=PROTOCOL_VERSION, model=self.manager.model, start=hop.start, end=hop.end
            )
            if problem is not None:
                raise ProtocolError(f"server {short_peer(peer)} {problem}", peer_id=peer)
            self.manager.record_probe(peer, time.perf_counter() - began)
            if info.get("forwarding") is True:  # servers of older versions relay through the client only
                self.manager.forwarders.add(peer)

        results = await asyncio.gather(*(probe(hop) for hop in candidates), return_exceptions=True)
        failed = []
        for i, (hop, result) in enumerate(zip(candidates, results, strict=True)):
            if isinstance(result, PeerError):
                if i < len(new):
                    failed.append((hop, result))
                else:
                    self.manager.ban(hop.stream.peer_id, str(result))
                    exclude.add(hop.stream.peer_id)
            elif isinstance(result, BaseException):
                raise result
        return failed

    async def _plan_and_open(self, start: int, end: int, exclude: set[str]) -> list[_Hop]:
        """Plan blocks ``start..end-1`` and open a stream on every hop, retrying other servers on failure.

        Every server that fails (its probe or its open) is left out for the rest of this call, and
        planning goes on while untried servers remain: fifty fake records cost fifty quick failures,
        not the whole generation. The sequence manager re-reads the swarm (fresh from the DHT) before
        it reports blocks as missing, so a server that joined since the last read is found here. When
        only servers we already failed announce some blocks (NoRouteError: their records outlive them
        for the record TTL, and a busy server may have missed one deadline), every one of them gets one
        last try after a short pause, bans aside; if those fail too, the blocks are unreachable and
        NoRouteError (a MissingBlocksError) says so, with the last failure as its cause, instead of
        retrying dead servers for minutes.
        Peers this session caught lying are never tried again.
        """
        loop = asyncio.get_running_loop()
        last_chance = False
        cache_full: CacheFullError | None = None  # servers that answered but had no room are not "missing"
        tried: set[str] = set()
        last_error: BaseException | None = None  # the last failure of a tried server: the cause we report
        exclude = {*exclude, *self.avoid}
        while True:  # each round leaves out at least one more server, so it ends
            try:
                route = await loop.run_in_executor(
                    None,
                    self.manager.plan_inference,
                    start,
                    end,
                    self.max_length,
                    frozenset(exclude),
                    last_chance,
                    self.config.active_adapter,
                )
            except MissingBlocksError as e:
                if cache_full is not None:
                    raise CacheFullError(
                        f"no server of blocks {start}:{end} has room: {cache_full}", peer_id=cache_full.peer_id
                    ) from e
                if not isinstance(e, NoRouteError):
                    raise
                if last_chance:  # every candidate failed twice, bans aside
                    if last_error is None:
                        raise
                    raise NoRouteError(self.manager.model, e.blocks, sorted(tried), self.manager.source) from last_error
                last_chance, exclude = True, set(self.avoid)
                await asyncio.sleep(self.config.min_backoff)
                continue
            hops = [_Hop(HopStream(h.peer_id, h.start, h.end)) for h in route]
            tried.update(h.peer_id for h in route)
            credentials, me = credentials_for(self.config), self.p2p.peer_id.to_base58()
            failed: list[tuple[_Hop, BaseException]] = list(await self._probe(hops, start, end, exclude))
            if not failed:
                # Open every hop at once: one round trip for the whole route, not one per server.
                results = await asyncio.gather(
                    *(
                        hop.stream.open(
                            self.p2p,
                            self.session_id,
                            self.max_length,
                            self.batch_size or 1,
                            self.config.connect_timeout,
                            self._timeout(hop.stream.peer_id, 0, 0),
                            proof=credentials.proof(me, hop.stream.peer_id),
                            contributor=credentials.claim(me, hop.stream.peer_id),
                            adapter=self.config.active_adapter,
                        )
                        for hop in hops
                    ),
                    return_exceptions=True,
                )
                failed = [(hop, r) for hop, r in zip(hops, results, strict=True) if isinstance(r, BaseException)]
                if not failed:
                    return hops
                await self._close_all(hops)
            for hop, error in failed:
                if not isinstance(error, _RETRYABLE):
                    raise error
                self.manager.ban(hop.stream.peer_id, str(error))
                exclude.add(hop.stream.peer_id)
                last_error = error
                if isinstance(error, CacheFullError):
                    cache_full = error

    async def _build(self, start: int, end: int) -> None:
        self.hops = await self._plan_and_open(start, end, exclude=set())
        logger.info("route %s", describe_route([RouteHop(h.stream.peer_id, h.start, h.end) for h in self.hops]))


def _culprit(error: Exception, hops: list[_Hop]) -> str:
    """The full peer id a failure names (errors carry it as data); the first hop's if none does."""
    if isinstance(error, PeerError) and error.peer_id is not None:
        return error.peer_id
    return hops[0].stream.peer_id

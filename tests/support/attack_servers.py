"""Attackers and meters for the attack tests and benchmark: a lying server, the memory a server's process
tree holds, and many identities from one address holding sessions alive without progress."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
from dataclasses import dataclass, field
from typing import Any

_LYING_SERVER_CODE = """
import sys, torch
from corolla.engine.apps.cli import main
from corolla.engine.server.backend import SpanBackend
honest = SpanBackend.inference_step
async def lying_step(self, session, position, hidden):
    out = await honest(self, session, position, hidden)
    return torch.randn_like(out) * out.std()
SpanBackend.inference_step = lying_step
sys.exit(main())
"""
LYING_SERVER: tuple[str, ...] = (sys.executable, "-c", _LYING_SERVER_CODE)
"""Launcher of a ``corolla server`` whose every inference step answers random tensors of the right shape
and scale (its forwards stay honest): an attacker for the verification tests and benchmarks."""


_SCHEDULED_LIAR_CODE = """
import random, sys
from corolla.engine.apps.cli import main
from corolla.engine.server.backend import SpanBackend
LIE_STEPS = {steps!r}  # 1-based steps of each session that get a lie (None: every step, or at RATE)
RATE, AFTER = {rate!r}, {after!r}  # with LIE_STEPS None: lie on this share of the steps after a session's first AFTER
draw = random.Random({seed!r}).random
COLLUDE = {collude!r}  # stateless forwards lie too (the forwards audits use)
honest_step, honest_forward = SpanBackend.inference_step, SpanBackend.forward
seen = {{}}
def lie(out):
    return out.roll(1, dims=-1)  # a function of the honest output: every colluder tells the same lie
async def step(self, session, position, hidden):
    out = await honest_step(self, session, position, hidden)
    n = seen[id(session)] = seen.get(id(session), 0) + 1
    due = n in LIE_STEPS if LIE_STEPS is not None else n > AFTER and draw() < RATE
    return lie(out) if due else out
async def forward(self, *args, **kwargs):
    out = await honest_forward(self, *args, **kwargs)
    return lie(out) if COLLUDE else out
SpanBackend.inference_step = step
SpanBackend.forward = forward
sys.exit(main())
"""


def scheduled_liar(
    steps: tuple[int, ...] | None = None,
    *,
    collude: bool = False,
    rate: float = 1.0,
    after: int = 0,
    seed: int = 0,
) -> tuple[str, ...]:
    """Launcher of a ``corolla server`` that lies on the given 1-based ``steps`` of every session (None: on a
    ``rate`` share of the steps after each session's first ``after``, drawn from ``seed``), with a lie that is a
    function of the honest output (``collude``: on stateless forwards too), so two such servers tell the same
    lie and vouch for each other."""
    code = _SCHEDULED_LIAR_CODE.format(
        steps=set(steps) if steps is not None else None, collude=collude, rate=rate, after=after, seed=seed
    )
    return (sys.executable, "-c", code)


def first_lie_step(*, rate: float, after: int, seed: int) -> int:
    """The 1-based step of a session on which ``scheduled_liar(rate=rate, after=after, seed=seed)`` first lies,
    when that session is the only one with more than ``after`` steps on the liar (it draws once per such step)."""
    if not 0 < rate <= 1:
        raise ValueError(f"a lie rate in (0, 1] is needed, got {rate}")
    draw = random.Random(seed).random
    return after + next(i for i in itertools.count(1) if draw() < rate)


def tree_rss(pid: int) -> int:
    """RSS of a process and its children, in bytes (a server with its DHT process and p2p daemon)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class PeakRss:
    """Samples a process tree's RSS every 50 ms in a thread until stopped; ``peak`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        """Stop sampling; the peak RSS in bytes."""
        self._stop.set()
        self._thread.join(5)
        return self.peak


# ---- many identities, few addresses ----------------------------------------------------------------------------
async def identities(count: int, host: str, initial_peers: list[str]) -> list[Any]:
    """``count`` bare hivemind P2P peers (each its own peer id) listening on, and dialling from, ``host``: one
    operator's identities in one address group (loopback hosts 127.0.N.1 are other /24s on one machine).

    Direct connections only (``use_relay=False``): swarm peers now offer relaying, and a connection through a
    relay circuit counts as its own group (the server cannot see where it comes from), which these tests do
    not measure."""
    from hivemind.p2p import P2P

    return list(
        await asyncio.gather(
            *(
                P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], initial_peers=initial_peers, use_relay=False)
                for _ in range(count)
            )
        )
    )


@dataclass
class KeptAlive:
    """Sessions one identity holds open with a step now and then that adds nothing (the same position again)."""

    opened: int = 0
    refused: list[str] = field(default_factory=list)  # the errors of opens the server refused
    closed: list[str] = field(default_factory=list)  # the errors of keep-alive steps (sessions the server closed)
    streams: list[tuple[asyncio.Queue[Any], Any]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop stepping and close every stream."""
        for task in self.tasks:
            task.cancel()
        for queue, responses in self.streams:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await responses.aclose()


async def hold_sessions(
    p2p: Any, server: str, prefix: str, count: int, *, end: int, hidden: int, period: float
) -> KeptAlive:
    """Open ``count`` sessions of blocks ``0:end`` on ``server``, each kept alive by a one-token step at
    position 0 every ``period`` seconds (alive, never progressing), until :meth:`KeptAlive.close`."""
    import torch
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from corolla.engine.wire.messages import RPC_INFERENCE, OpenSession, Step, StepResult
    from corolla.engine.wire.tensors import serialize

    held = KeptAlive()
    x = serialize(torch.zeros(1, 1, hidden))

    async def keep(session_id: str, queue: asyncio.Queue[Any], responses: Any) -> None:
        for step_id in range(1, 1_000_000):
            await asyncio.sleep(period)
            step = Step(session_id=session_id, position=0, step_id=step_id)
            queue.put_nowait(runtime_pb2.ExpertRequest(tensors=[x], metadata=step.encode()))
            answer = StepResult.decode((await anext(responses)).metadata)
            if not answer.ok:
                held.closed.append(str(answer.error))
                return

    for i in range(count):
        session_id = f"{prefix}{i}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        msg = OpenSession(session_id=session_id, start=0, end=end, max_length=64, batch_size=1)
        queue.put_nowait(runtime_pb2.ExpertRequest(metadata=msg.encode()))

        async def requests(q: asyncio.Queue[Any] = queue) -> Any:
            while (item := await q.get()) is not None:
                yield item

        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(server), RPC_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )
        held.streams.append((queue, responses))
        answer = StepResult.decode((await anext(responses)).metadata)
        if not answer.ok:
            held.refused.append(str(answer.error))
            continue
        held.opened += 1
        held.tasks.append(asyncio.ensure_future(keep(session_id, queue, responses)))
    return held


@dataclass
class SilentIdentities:
    """Records of servers that claim to be fast: ``live`` of them answer ``info`` like the honest server they
    copy and take inference streams without ever answering; the rest are records whose peers do not exist."""

    dht: Any  # the attacker's DHT peer (it stores and refreshes nothing: the records live for ``ttl``)
    live: list[Any]  # the live identities' P2P peers

    async def shutdown(self) -> None:
        """Stop the live identities (the records expire on their own)."""
        await asyncio.gather(*(p.shutdown() for p in self.live), return_exceptions=True)
        self.dht.shutdown()


async def silent_identities(
    model: str, info: dict[str, Any], *, live: int, dead: int, host: str, initial_peers: list[str], ttl: float = 600.0
) -> SilentIdentities:
    """Announce ``live + dead`` records of blocks ``info['start']:info['end']`` at 1e6 tokens/s, all from
    ``host`` (one address group); ``info`` is what the live ones answer (an honest server's copy)."""
    import msgpack
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2

    from corolla.engine.dht.announce import announce_span, make_dht
    from corolla.engine.dht.records import ServerRecord, ServerState
    from corolla.engine.dht.signing import PeerIdentity
    from corolla.engine.wire.messages import RPC_INFERENCE, RPC_INFO

    record = ServerRecord(
        state=ServerState.ONLINE,
        start=info["start"],
        end=info["end"],
        throughput=1e6,
        inference_rps=1e6,
        cache_tokens_left=10**6,
        dtype=str(info.get("dtype", "")),
    )
    packed = msgpack.packb(info, use_bin_type=True)

    async def answer_info(_: Any, __: Any) -> Any:
        return runtime_pb2.ExpertInfo(serialized_info=packed)

    async def never_answer(_: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):  # read everything, answer nothing
                pass
        await asyncio.sleep(3600)

    async def start(identity: PeerIdentity) -> Any:
        with identity.identity_file() as path:
            p2p = await P2P.create(
                identity_path=path,
                check_if_identity_free=False,
                host_maddrs=[f"/ip4/{host}/tcp/0"],
                initial_peers=initial_peers,
            )
        await p2p.add_protobuf_handler(RPC_INFO, answer_info, runtime_pb2.ExpertUID)
        await p2p.add_binary_stream_handler(RPC_INFERENCE, never_answer)
        return p2p

    identities = [PeerIdentity.generate() for _ in range(live + dead)]
    peers: list[Any] = []
    for i in range(0, live, 4):  # a few daemons at a time: each must start within hivemind's 15 s
        peers += await asyncio.gather(*(start(identity) for identity in identities[i : min(i + 4, live)]))
    dht = make_dht(initial_peers, host)
    loop = asyncio.get_running_loop()
    for identity in identities:
        await loop.run_in_executor(None, announce_span, dht, model, identity, record, ttl)
    return SilentIdentities(dht, peers)

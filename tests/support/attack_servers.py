"""Attackers and meters for the verification tests and the attacks benchmark: a lying server and the
memory a server's process tree holds."""

from __future__ import annotations

import contextlib
import sys

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

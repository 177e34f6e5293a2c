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

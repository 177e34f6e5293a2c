"""A hivemind DHT whose process, and the p2p daemon that process starts, die with their owner."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hivemind
from hivemind.p2p import P2P

from corolla.engine import procs


class OwnedDHT(hivemind.DHT):
    """``hivemind.DHT`` (a forked process running a DHT node and its p2p daemon) that never outlives its owner.

    In the forked process, before hivemind starts anything: lead a process group (the p2p daemon joins
    it; SIGTERM, also hivemind's own shutdown fallback, stops the daemon too) and watch the process
    that created this object, so a SIGKILLed server or client leaves nothing running.

    ``daemon_args`` are extra ``p2pd`` flags (``{"relayService": 0}``) for the settings hivemind's
    ``P2P.create`` has no parameter for (the relay service's bounds, static relays only).
    """

    def __init__(self, *args: Any, daemon_args: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._daemon_args = dict(daemon_args or {})  # set before hivemind forks the DHT process
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        """Serve the DHT in the child process (hivemind's loop) under the owner watch."""
        procs.lead_process_group()
        procs.exit_with_owner(self._parent_pid, grace=5.0)
        if self._daemon_args:  # this process only: it is the one that starts the daemon
            make_args = P2P._make_process_args
            extra = self._daemon_args
            P2P._make_process_args = staticmethod(lambda *a, **kw: make_args(*a, **{**kw, **extra}))  # type: ignore[method-assign]
        super().run()

"""A hivemind DHT whose process, and the p2p daemon that process starts, die with their owner."""

from __future__ import annotations

import hivemind

from corolla.engine import procs


class OwnedDHT(hivemind.DHT):
    """``hivemind.DHT`` (a forked process running a DHT node and its p2p daemon) that never outlives its owner.

    In the forked process, before hivemind starts anything: lead a process group (the p2p daemon joins
    it; SIGTERM, also hivemind's own shutdown fallback, stops the daemon too) and watch the process
    that created this object, so a SIGKILLed server or client leaves nothing running.
    """

    def run(self) -> None:
        """Serve the DHT in the child process (hivemind's loop) under the owner watch."""
        procs.lead_process_group()
        procs.exit_with_owner(self._parent_pid, grace=5.0)
        super().run()

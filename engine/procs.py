"""Processes that never outlive their owner: a parent-death watch and the stopping of a process group.

A DHT process, the p2p daemon it starts, and a server started by the tray agent must all exit
within seconds when the process that owns them dies, whatever the signal (SIGKILL leaves no chance
to clean up). The owner cannot tell them, so each watches its owner:

- :func:`exit_with_owner` polls whether the owner still lives (a thread; ``prctl(PR_SET_PDEATHSIG)``
  would fire when the *thread* that forked exits, which kills a client's DHT when the thread that
  built the model ends). When the owner is gone it sends this process SIGTERM, so its graceful path
  runs, and kills it after a grace period if that path hangs.
- :func:`lead_process_group` makes the calling process lead a process group of its own, so
  everything it starts (hivemind's p2p daemon) is in that group, and makes SIGTERM stop the whole
  group. The group also keeps a terminal's Ctrl-C away from the daemon: the owner decides when to
  stop, and its DHT still works while it leaves the swarm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from types import FrameType

logger = logging.getLogger(__name__)

POLL_PERIOD = 0.5  # seconds between checks whether the owner still lives


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as gone where that can be told)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    return True


def owner_alive(owner_pid: int, direct: bool) -> bool:
    """Whether the owner still lives. ``direct``: it was this process's parent when the watch began.

    For a direct owner, "alive" means "still our parent": a dead parent makes the kernel re-parent
    this process at once, while its pid could be reused later. Otherwise the pid must exist.
    """
    if direct:
        return os.getppid() == owner_pid
    return pid_alive(owner_pid)


def exit_with_owner(owner_pid: int, grace: float = 10.0, period: float = POLL_PERIOD) -> threading.Thread:
    """Watch ``owner_pid`` from a daemon thread; when it dies, stop this process.

    The process first gets SIGTERM (its own handler leaves cleanly); if it still runs ``grace``
    seconds later it is killed, with its process group if it leads one.

    Args:
        owner_pid: The process whose death ends this one.
        grace: Seconds between SIGTERM and SIGKILL.
        period: Seconds between checks.

    Returns:
        The started watch thread.
    """
    direct = os.getppid() == owner_pid

    def watch() -> None:
        while owner_alive(owner_pid, direct):
            time.sleep(period)
        logger.warning("owner process %d is gone: stopping", owner_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        kill_self()

    thread = threading.Thread(target=watch, name=f"corolla-owner-watch-{owner_pid}", daemon=True)
    thread.start()
    return thread


def kill_self() -> None:
    """SIGKILL this process, and everything in its process group if it leads one."""
    if hasattr(os, "killpg") and os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def lead_process_group(grace: float = 3.0) -> None:
    """Make this process lead its own process group and stop the whole group on SIGTERM.

    Call it first thing in a child process, from its main thread, before it starts processes of its
    own. Does nothing where process groups do not exist (Windows).

    Args:
        grace: Seconds the group's other processes get between SIGTERM and SIGKILL.
    """
    if not hasattr(os, "setpgid"):
        return
    os.setpgid(0, 0)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the SIGTERM sent to the group below is for the others
        _stop_own_group(grace)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _stop_own_group(grace: float) -> None:
    """SIGTERM the other processes of this process's group, reap them, and SIGKILL the group if any is left."""
    pgid = os.getpid()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return  # no child left in the group
        if pid == 0:
            time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # this process too: it is on its way out anyway

"""The parent-death watch and process-group stopping, on plain Python processes (no swarm)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from corolla.engine import procs

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

# A parent that forks a child; the child watches the parent, leads a group and starts `sleep` in it.
FAMILY = """
import os, subprocess, sys, time
from corolla.engine import procs
owner = os.getpid()
child = os.fork()
if child == 0:
    procs.lead_process_group(grace=2.0)
    procs.exit_with_owner(owner, grace=5.0, period=0.1)
    grandchild = subprocess.Popen(["sleep", "600"])
    print(os.getpid(), grandchild.pid, flush=True)
    while True:
        time.sleep(1)
else:
    time.sleep(600)
"""


def _start_family() -> tuple[subprocess.Popen[str], psutil.Process, psutil.Process]:
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid, grandchild_pid = (int(x) for x in parent.stdout.readline().split())
    return parent, psutil.Process(child_pid), psutil.Process(grandchild_pid)


def _gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _cleanup(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigkilled_owner_takes_the_child_and_its_group_along() -> None:
    parent, child, grandchild = _start_family()
    try:
        assert os.getpgid(child.pid) == child.pid == os.getpgid(grandchild.pid)  # the child leads their group
        parent.kill()
        parent.wait(timeout=10)
        assert _gone(child, 10), "the child outlived its SIGKILLed owner"
        assert _gone(grandchild, 10), "the child's group outlived it"
    finally:
        _cleanup(parent.pid, child.pid, grandchild.pid)


def test_sigterm_of_a_group_leader_stops_its_group_while_the_owner_lives() -> None:
    parent, child, grandchild = _start_family()
    try:
        child.terminate()
        assert _gone(child, 10) and _gone(grandchild, 10)
        assert parent.poll() is None
    finally:
        _cleanup(parent.pid, child.pid, grandchild.pid)


def test_owner_alive() -> None:
    assert procs.owner_alive(os.getppid(), direct=True)
    assert not procs.owner_alive(os.getpid(), direct=True)  # we are not our own parent
    assert procs.owner_alive(os.getpid(), direct=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not procs.pid_alive(dead.pid)
    assert not procs.pid_alive(0)

"""Helpers for the agent tests: polling, pid checks, fake sensors, the fake server command."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corolla.agent.sensors import NO_GPU, GpuReading

FAKE_SERVER = Path(__file__).with_name("fake_server.py")


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> object:
    """Polls ``predicate`` until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def kill_pid(pid: int | None) -> None:
    """Last-resort cleanup of one process we started."""
    if pid and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def fake_server_command() -> list[str]:
    """The settings' ``server_command`` that runs the fake server."""
    return [sys.executable, str(FAKE_SERVER)]


class FakeIdle:
    """Idle sensor whose value the test sets."""

    def __init__(self, idle_s: float | None = 10_000.0) -> None:
        self.idle_s = idle_s

    def idle_seconds(self) -> float | None:
        return self.idle_s


class FakeGpu:
    """GPU sensor whose reading the test sets; records the pids passed as ours."""

    def __init__(self, reading: GpuReading = NO_GPU) -> None:
        self.reading = reading
        self.own_pids: frozenset[int] = frozenset()

    def read(self, own_pids: frozenset[int]) -> GpuReading:
        self.own_pids = own_pids
        return self.reading


class FakeApps:
    """App sensor returning what the test sets (filtered by the pause list)."""

    def __init__(self) -> None:
        self.running_now: tuple[str, ...] = ()

    def running(self, names: object) -> tuple[str, ...]:
        wanted = {str(n).lower() for n in names}  # type: ignore[attr-defined]
        return tuple(n for n in self.running_now if n.lower() in wanted)


class FakeClock:
    """A monotonic clock the test advances."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

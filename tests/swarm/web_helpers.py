"""Helpers of the web-face tests: ``corolla api`` / ``corolla monitor`` child processes on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from swarm_helpers import STARTED_GROUPS

from corolla.engine.apps.local_swarm import server_env


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout:.0f} s (last: {last!r})")


class WebProcess:
    """A ``corolla <command>`` child in its own process group, serving HTTP on 127.0.0.1:``port``."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corolla.engine.apps.cli", *args, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**server_env(), **(env or {})},
            start_new_session=True,
        )
        STARTED_GROUPS.add(self.proc.pid)  # checked for leftovers at module end

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll ``/health`` until it answers 200 (fails early if the process exits)."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.url} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            return False

        wait_for(up, timeout, f"{self.url}/health answers")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL whatever is left of the group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its DHT process and p2p daemon
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()

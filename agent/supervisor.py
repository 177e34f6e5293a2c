"""Owns the ``corolla server`` child process: start, log capture, restart, stop.

The child's stdout and stderr go to a log file. If it exits while it should run, it is
restarted after a capped exponential backoff; after ``max_restarts`` quick crashes in a row the
supervisor gives up and reports the failure (the app shows the error state). Stopping sends
SIGTERM (the server leaves the swarm), waits ``grace_s``, then kills the child's whole
process group, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_LOG_ROTATE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``base_s * factor**(n-1)``, at most ``cap_s``."""

    base_s: float = 2.0
    factor: float = 2.0
    cap_s: float = 300.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based)."""
        return float(min(self.cap_s, self.base_s * self.factor ** max(0, attempt - 1)))


@dataclass(frozen=True)
class ChildStatus:
    """What the supervisor reports each poll.

    Attributes:
        wanted: Whether the child should run.
        pid: The live child's pid (None when not running).
        restart_in_s: Seconds until the next restart after a crash (None: none pending).
        crashes: Consecutive unexpected exits.
        failed: Why the supervisor gave up (None: it has not).
        started_at: Monotonic time the current child started (None when not running).
    """

    wanted: bool
    pid: int | None
    restart_in_s: float | None
    crashes: int
    failed: str | None
    started_at: float | None


class Supervisor:
    """Runs one child process on demand.

    Args:
        log_path: File that receives the child's stdout and stderr (appended).
        grace_s: Seconds between SIGTERM and SIGKILL.
        backoff: Delays between restarts.
        max_restarts: Quick crashes in a row before giving up.
        stable_after_s: A child that ran this long resets the crash count.
        env: Extra environment variables for the child.
        clock: Monotonic clock (tests pass a fake).
    """

    def __init__(
        self,
        log_path: Path,
        grace_s: float = 15.0,
        backoff: Backoff | None = None,
        max_restarts: int = 5,
        stable_after_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log_path = log_path
        self.grace_s = grace_s
        self.backoff = backoff or Backoff()
        self.max_restarts = max_restarts
        self.stable_after_s = stable_after_s
        self.env = dict(env or {})
        self.clock = clock
        self._lock = threading.RLock()
        self._argv: list[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_at: float | None = None
        self._wanted = False
        self._crashes = 0
        self._restart_at: float | None = None
        self._failed: str | None = None
        self.last_exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, argv: list[str]) -> None:
        """Starts the child now (resets the crash count); no-op if it already runs that argv.

        Args:
            argv: The command line, program first.
        """
        with self._lock:
            if self._wanted and self.pid is not None and argv == self._argv:
                return
            if self.pid is not None:
                self._terminate()
            self._argv = list(argv)
            self._wanted = True
            self._crashes = 0
            self._failed = None
            self._restart_at = None
            self._spawn()

    def stop(self) -> int | None:
        """Stops the child: SIGTERM, wait ``grace_s``, then kill its process group.

        Returns:
            The child's exit code, or None if none was running.
        """
        with self._lock:
            self._wanted = False
            self._restart_at = None
            return self._terminate()

    def reset(self) -> None:
        """Forgets past crashes and a give-up, so the next :meth:`start` tries afresh."""
        with self._lock:
            self._crashes = 0
            self._failed = None

    def poll(self) -> ChildStatus:
        """Notices exits, restarts after backoff, and reports the status. Never raises."""
        with self._lock:
            now = self.clock()
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self._reap(proc)
                if self._wanted:
                    self._on_crash(now)
            due = self._restart_at is not None and now >= self._restart_at
            if self._wanted and self._proc is None and due:
                self._restart_at = None
                self._spawn()
            restart_in = None if self._restart_at is None else max(0.0, self._restart_at - now)
            return ChildStatus(
                wanted=self._wanted,
                pid=self.pid,
                restart_in_s=restart_in,
                crashes=self._crashes,
                failed=self._failed,
                started_at=self._started_at if self.pid is not None else None,
            )

    def process_ids(self) -> frozenset[int]:
        """The child and its descendants (for telling our GPU use from others')."""
        pid = self.pid
        if pid is None:
            return frozenset()
        pids = {pid}
        try:
            import psutil

            pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except Exception:
            pass
        return frozenset(pids)

    # -- internals -------------------------------------------------------------------------

    def _on_crash(self, now: float) -> None:
        ran_s = now - self._started_at if self._started_at is not None else 0.0
        self._crashes = 1 if ran_s >= self.stable_after_s else self._crashes + 1
        tail = _tail(self.log_path)
        if self._crashes > self.max_restarts:
            self._wanted = False
            self._failed = f"server exited {self._crashes} times (code {self.last_exit_code}); {tail}"
            logger.error("giving up on the server: %s; see %s", self._failed, self.log_path)
            return
        delay = self.backoff.delay(self._crashes)
        self._restart_at = now + delay
        logger.warning(
            "server exited with code %s after %.0f s; restarting in %.0f s (%s)",
            self.last_exit_code, ran_s, delay, tail,
        )  # fmt: skip

    def _spawn(self) -> None:
        assert self._argv is not None  # set by start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _rotate(self.log_path)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self._argv)}\n".encode())
        log.flush()
        kwargs: dict[str, object] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined,unused-ignore]
        else:
            kwargs["start_new_session"] = True  # own process group: kill it whole, no stray Ctrl-C
        try:
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # The server exits when this process dies, even by SIGKILL (ServerConfig.parent_pid).
                env={**os.environ, **self.env, "COROLLA_PARENT_PID": str(os.getpid())},
                **kwargs,
            )
        except OSError as e:
            log.write(f"=== could not start: {e}\n".encode())
            log.close()
            self._proc = None
            self._wanted = False
            self._failed = f"could not start the server: {e}"
            logger.error("%s (command: %s)", self._failed, self._argv[0])
            return
        self._log = log
        self._started_at = self.clock()
        logger.info("server started (pid %d), log: %s", self._proc.pid, self.log_path)

    def _terminate(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            logger.info("stopping server (pid %d)", proc.pid)
            _signal_stop(proc)
            try:
                proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("server (pid %d) ignored SIGTERM for %.0f s: killing", proc.pid, self.grace_s)
                _kill_tree(proc)
                proc.wait()
        code = self._reap(proc)
        logger.info("server stopped (exit code %s)", code)
        return code

    def _reap(self, proc: subprocess.Popen[bytes]) -> int | None:
        code = proc.wait()
        _kill_tree(proc)  # sweep anything the child left in its process group
        self.last_exit_code = code
        self._proc = None
        if self._log is not None:
            try:
                self._log.write(f"=== exited with code {code}\n".encode())
            finally:
                self._log.close()
            self._log = None
        return code


def _signal_stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        if sys.platform == "win32":
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined,unused-ignore]
        else:
            proc.send_signal(signal.SIGTERM)
    except OSError:
        pass


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    if sys.platform == "win32":
        try:
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except Exception:
            pass
        if proc.poll() is None:
            proc.kill()
        return
    # The child leads its own process group (start_new_session); the group id cannot be
    # reused while any member lives, so this reaches only what the child started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _rotate(path: Path) -> None:
    try:
        if path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(path, path.with_suffix(path.suffix + ".1"))
    except OSError:
        pass


def _tail(path: Path, lines: int = 1) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return "no log"
    useful = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("===")]
    return " | ".join(useful[-lines:]) if useful else "no output"

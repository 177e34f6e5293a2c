"""The app core: one state machine and one command dispatcher, with no GUI imports.

The tray, the CLI and the control socket only call :meth:`AgentApp.dispatch`; a worker thread
(:meth:`AgentApp.run`) samples the sensors, asks the policy, and starts or stops the server
through the :class:`~corolla.agent.supervisor.Supervisor`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from corolla.agent import autostart
from corolla.agent.paths import AgentPaths
from corolla.agent.policy import Policy, PolicyConfig, Readings
from corolla.agent.sensors import NO_GPU, GpuReading, Sensors
from corolla.agent.serverstatus import read_stats
from corolla.agent.settings import AgentSettings, SettingsStore
from corolla.agent.state import AgentState, Command, Reply, Status
from corolla.agent.supervisor import ChildStatus, Supervisor

logger = logging.getLogger(__name__)

SNOOZE_S = 3600.0
MIN_PAUSE_S = 60.0

Listener = Callable[[Status], None]


def open_path(path: Path) -> None:
    """Opens a folder in the desktop's file manager (detached)."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined,unused-ignore]
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    subprocess.Popen(
        [opener, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


class AgentApp:
    """The agent without any user interface.

    Args:
        settings: The loaded settings.
        paths: Where logs, state and the socket live.
        sensors: GPU, idle and app sensors (fakes in tests).
        supervisor: Owns the server process (default: one logging to ``paths.server_log``).
        store: Where toggles are persisted (None: not persisted).
        settings_error: Why the settings file was rejected (the app then stays in ERROR).
        clock: Monotonic clock.
        opener: Opens the log folder.
        set_autostart: Creates or removes the start-at-login entry.
    """

    def __init__(
        self,
        settings: AgentSettings,
        paths: AgentPaths,
        sensors: Sensors,
        supervisor: Supervisor | None = None,
        store: SettingsStore | None = None,
        settings_error: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        opener: Callable[[Path], None] = open_path,
        set_autostart: Callable[[bool], None] = autostart.set_enabled,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.sensors = sensors
        self.supervisor = supervisor or Supervisor(paths.server_log, grace_s=settings.stop_grace_s)
        self.store = store
        self.settings_error = settings_error
        self.clock = clock
        self.opener = opener
        self.set_autostart = set_autostart
        self.policy = Policy(
            PolicyConfig(
                idle_minutes=settings.idle_minutes,
                gpu_busy_percent=settings.gpu_busy_percent,
                resume_after_s=settings.resume_after_s,
                min_free_gb=settings.max_vram_gb,
            )
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._quit = False
        self._snooze_until: float | None = None
        self._paused_at: float | None = None
        self._clear_failure = False
        self._error: str | None = None
        self._gpu: GpuReading = NO_GPU
        self._status = Status(
            state=AgentState.ERROR if settings_error else AgentState.STOPPED,
            share_enabled=settings.share_enabled,
            reasons=(settings_error,) if settings_error else (),
            start_at_login=settings.start_at_login,
            log_dir=str(paths.log_dir),
            agent_pid=os.getpid(),
        )

    # -- commands (any thread) ---------------------------------------------------------------

    @property
    def status(self) -> Status:
        """The latest status snapshot."""
        return self._status

    @property
    def done(self) -> threading.Event:
        """Set once the app has quit and the server is stopped."""
        return self._done

    def add_listener(self, listener: Listener) -> None:
        """Calls ``listener(status)`` from the worker thread whenever the status changes."""
        self._listeners.append(listener)

    def dispatch(self, command: Command | str) -> Reply:
        """Runs one command. Never raises: failures come back as ``Reply(ok=False)``.

        Commands only change intents; the worker applies them within milliseconds.

        Args:
            command: A :class:`Command` or its string value.

        Returns:
            Whether it worked, a message, and the status.
        """
        try:
            cmd = Command(command)
        except ValueError:
            names = ", ".join(c.value for c in Command)
            return Reply(False, f"unknown command {command!r}; try one of: {names}", self._status)
        try:
            ok, message = self._apply(cmd)
        except Exception as e:
            logger.exception("command %s failed", cmd)
            ok, message = False, f"{cmd.value} failed: {e}"
        self._wake.set()
        return Reply(ok, message, self._status)

    def _apply(self, cmd: Command) -> tuple[bool, str]:
        now = self.clock()
        with self._lock:
            if cmd is Command.TOGGLE_SHARE:
                cmd = Command.SHARE_OFF if self.settings.share_enabled else Command.SHARE_ON
            if cmd is Command.STATUS:
                return True, self._status.tooltip()
            if cmd is Command.QUIT:
                self._quit = True
                self._set_status(quitting=True)
                return True, "quitting: stopping the server"
            if cmd is Command.SHARE_ON:
                if self.settings_error:
                    return False, self.settings_error
                self._snooze_until = self._paused_at = self._error = None
                self._clear_failure = True
                self.policy.reset()
                self._save(share_enabled=True)
                self._set_status(share_enabled=True)
                return True, "sharing on (only while this computer is idle)"
            if cmd is Command.SHARE_OFF:
                self._snooze_until = self._paused_at = None
                self._save(share_enabled=False)
                self._set_status(share_enabled=False)
                return True, "sharing off"
            if cmd is Command.PAUSE_UNTIL_IDLE:
                self._paused_at = now
                return True, "paused until this computer is idle again"
            if cmd is Command.SNOOZE:
                self._snooze_until = now + SNOOZE_S
                return True, "snoozed for 1 hour"
            if cmd in (Command.START_AT_LOGIN_ON, Command.START_AT_LOGIN_OFF):
                enabled = cmd is Command.START_AT_LOGIN_ON
                self.set_autostart(enabled)
                self._save(start_at_login=enabled)
                self._set_status(start_at_login=enabled)
                return True, f"start at login {'on' if enabled else 'off'}"
        # OPEN_LOGS: outside the lock (spawns a process)
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        self.opener(self.paths.log_dir)
        return True, f"logs are in {self.paths.log_dir}"

    def _save(self, **changes: object) -> None:
        self.settings = self.settings.model_copy(update=changes)
        if self.store is not None:
            self.store.save(self.settings)

    def _set_status(self, **changes: object) -> None:
        self._status = dataclasses.replace(self._status, **changes)  # type: ignore[arg-type]

    # -- worker -----------------------------------------------------------------------------

    def run(self) -> None:
        """The worker loop: tick until quit, then stop the server and set :attr:`done`."""
        logger.info(
            "agent running: sharing %s; settings %s",
            "on" if self.settings.share_enabled else "off (turn it on in the menu or `corolla-agent share`)",
            self.store.path if self.store else "(not saved)",
        )
        try:
            while not self._quit:
                try:
                    self.tick()
                except Exception:
                    logger.exception("agent tick failed")
                self._wake.wait(self.settings.poll_interval_s)
                self._wake.clear()
        finally:
            self._finish()

    def start(self) -> threading.Thread:
        """Runs :meth:`run` in a daemon thread and returns it."""
        thread = threading.Thread(target=self.run, name="corolla-agent", daemon=True)
        self._thread = thread
        thread.start()
        return thread

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Asks the worker to quit and waits until the server is stopped.

        Safe to call more than once and from any thread but the worker's.
        """
        self.dispatch(Command.QUIT)
        if self._thread is None or not self._thread.is_alive():
            if not self._done.is_set():
                self._finish()  # the worker never ran (or died): stop the server here
            return
        if not self._done.wait(timeout_s if timeout_s is not None else self.settings.stop_grace_s + 30):
            logger.warning("agent worker did not finish; stopping the server directly")
            self.supervisor.stop()

    def _finish(self) -> None:
        try:
            self.supervisor.stop()
        finally:
            self._set_status(state=AgentState.STOPPED, pid=None, quitting=True, reasons=())
            self._done.set()
            self._notify()
            logger.info("agent stopped; no server left running")

    def tick(self) -> Status:
        """Samples sensors, applies the policy, starts or stops the server. Returns the status."""
        with self._lock:
            enabled = self.settings.share_enabled
            clear_failure, self._clear_failure = self._clear_failure, False
            snooze_until, paused_at = self._snooze_until, self._paused_at
        if clear_failure:
            self._error = None
            self.supervisor.reset()
        child = self.supervisor.poll()
        now = self.clock()
        readings = self._sample(child)
        self._gpu = readings.gpu

        decision = self.policy.decide(readings, now, sharing=child.pid is not None)
        reasons = list(decision.reasons)
        if snooze_until is not None:
            if now < snooze_until:
                reasons.insert(0, f"snoozed for {(snooze_until - now) / 60:.0f} min")
            else:
                with self._lock:
                    self._snooze_until = None
        if paused_at is not None:
            need = max(self.settings.idle_minutes * 60.0, MIN_PAUSE_S)
            idle = readings.idle_s
            if idle is not None and idle >= need and now - paused_at >= need:
                with self._lock:
                    self._paused_at = None
            else:
                reasons.insert(0, "paused until idle")
        if child.failed and enabled and self._error is None:
            self._error = child.failed

        want_server = enabled and not reasons and not self.settings_error and self._error is None
        if want_server and child.pid is None and not child.wanted:
            self.supervisor.start(self._server_argv(readings.gpu))
            child = self.supervisor.poll()
        stopping = not want_server and (child.wanted or child.pid is not None)

        status = self._compose(enabled, tuple(reasons), child, stopping)
        self._publish(status)
        if stopping:
            self.supervisor.stop()
            status = self._compose(enabled, tuple(reasons), self.supervisor.poll(), False)
            self._publish(status)
        return status

    def _server_argv(self, gpu: GpuReading) -> list[str]:
        device = self.settings.device
        if device == "auto":
            device = "cuda" if gpu.present else "cpu"
        self.paths.status_file.unlink(missing_ok=True)  # no stale "online" from a previous run
        return self.settings.server_argv(self.paths.status_file, device)

    def _sample(self, child: ChildStatus) -> Readings:
        try:
            idle = self.sensors.idle.idle_seconds()
        except Exception:
            logger.exception("idle sensor failed")
            idle = None
        try:
            gpu = self.sensors.gpu.read(self.supervisor.process_ids() if child.pid else frozenset())
        except Exception:
            logger.exception("GPU sensor failed")
            gpu = NO_GPU
        try:
            apps = self.sensors.apps.running(self.settings.pause_for_apps)
        except Exception:
            logger.exception("app sensor failed")
            apps = ()
        return Readings(idle_s=idle, gpu=gpu, pausing_apps=apps)

    def _compose(self, enabled: bool, reasons: tuple[str, ...], child: ChildStatus, stopping: bool) -> Status:
        stats = read_stats(self.paths.status_file) if child.pid is not None and not stopping else None
        if self.settings_error:
            state, reasons = AgentState.ERROR, (self.settings_error,)
        elif not enabled:
            state, reasons = AgentState.STOPPED, ()
        elif self._error is not None:
            state, reasons = AgentState.ERROR, (self._error,)
        elif reasons:
            state = AgentState.PAUSED_BUSY
        elif stats is not None and stats.state == "online" and child.pid is not None:
            state = AgentState.SHARING
        else:
            state = AgentState.STARTING
            if child.restart_in_s is not None:
                reasons = (f"server exited; restarting in {child.restart_in_s:.0f} s",)
        if stopping:
            reasons = (*reasons, "stopping the server")
        default_blocks = f"{self.settings.num_blocks} blocks" if self.settings.num_blocks else None
        return Status(
            state=state,
            share_enabled=enabled,
            reasons=reasons,
            pid=child.pid,
            blocks=(stats.blocks if stats and stats.blocks else default_blocks),
            tokens_processed=stats.tokens_processed if stats else 0,
            tokens_served_today=stats.tokens_served_today if stats else self._status.tokens_served_today,
            tokens_served_total=stats.tokens_served_total if stats else self._status.tokens_served_total,
            gpu=self._gpu.name,
            start_at_login=self.settings.start_at_login,
            log_dir=str(self.paths.log_dir),
            quitting=self._quit,
            agent_pid=os.getpid(),
        )

    def _publish(self, status: Status) -> None:
        changed = status != self._status
        if changed and status.state != self._status.state:
            logger.info("state: %s → %s %s", self._status.state, status.state, "; ".join(status.reasons))
        self._status = status
        if changed:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener(self._status)
            except Exception:
                logger.exception("status listener failed")

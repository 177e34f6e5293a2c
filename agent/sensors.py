"""Sensors the sharing policy reads: GPU (NVML), user input idle time, running apps.

Each sensor is a small class behind a ``Protocol`` so tests pass fakes. Sensors never raise
from ``read()``: a missing driver or display is reported as a state (no GPU, idle unknown).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One look at the GPU.

    Attributes:
        present: False when there is no NVIDIA GPU or driver (a state, not an error).
        name: The GPU's name, or why there is none.
        utilisation_pct: Busy percentage over the last sample period (None: unknown).
        foreign_pids: Processes using the GPU that are not the agent's server.
        free_bytes: Free GPU memory (None: unknown).
        total_bytes: Total GPU memory (None: unknown).
    """

    present: bool
    name: str = "no NVIDIA GPU"
    utilisation_pct: float | None = None
    foreign_pids: tuple[int, ...] = ()
    free_bytes: int | None = None
    total_bytes: int | None = None


NO_GPU = GpuReading(present=False)


class GpuSensor(Protocol):
    """Reads the GPU state; ``own_pids`` are the server's processes (not foreign)."""

    def read(self, own_pids: frozenset[int]) -> GpuReading: ...


class IdleSensor(Protocol):
    """Seconds since the last keyboard/mouse input, or None when that cannot be known."""

    def idle_seconds(self) -> float | None: ...


class AppSensor(Protocol):
    """Names of running processes that match the pause list."""

    def running(self, names: Iterable[str]) -> tuple[str, ...]: ...


@dataclass
class Sensors:
    """The sensors one agent uses."""

    gpu: GpuSensor
    idle: IdleSensor
    apps: AppSensor

    @classmethod
    def default(cls) -> Sensors:
        """The real sensors for this platform."""
        return cls(gpu=NvmlGpuSensor(), idle=make_idle_sensor(), apps=PsutilAppSensor())


class NvmlGpuSensor:
    """GPU readings from NVML (``nvidia-ml-py``); no driver means ``present=False``.

    Args:
        index: Which GPU (NVML index).
    """

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._nvml: Any = None
        self._handle: Any = None
        self._failed: str | None = None

    def _init(self) -> None:
        if self._handle is not None or self._failed is not None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            self._failed = f"no NVIDIA GPU ({type(e).__name__})"
            logger.info("%s: sharing uses the configured device without GPU checks", self._failed)

    def read(self, own_pids: frozenset[int]) -> GpuReading:
        """Reads utilisation, memory and processes; never raises."""
        self._init()
        if self._handle is None:
            return GpuReading(present=False, name=self._failed or NO_GPU.name)
        nvml, handle = self._nvml, self._handle
        try:
            name = nvml.nvmlDeviceGetName(handle)
            util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            pids: set[int] = set()
            for query in (
                nvml.nvmlDeviceGetComputeRunningProcesses,
                nvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                with contextlib.suppress(nvml.NVMLError):
                    pids.update(int(p.pid) for p in query(handle))
        except Exception as e:
            logger.warning("NVML read failed: %s", e)
            return GpuReading(present=True, name=f"GPU {self.index} (unreadable)")
        compositors = _display_server_pids(pids)
        foreign = tuple(sorted(pids - own_pids - compositors))
        return GpuReading(
            present=True,
            name=name if isinstance(name, str) else bytes(name).decode(errors="replace"),
            utilisation_pct=util,
            foreign_pids=foreign,
            free_bytes=int(memory.free),
            total_bytes=int(memory.total),
        )

    def close(self) -> None:
        """Releases NVML."""
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._handle = None


# Processes that hold a GPU context on every desktop: not a sign the user is busy.
_ALWAYS_ON_GPU = {
    "xorg", "x", "xwayland", "gnome-shell", "kwin_x11", "kwin_wayland", "plasmashell",
    "mutter", "picom", "compiz", "dwm.exe", "explorer.exe", "windowserver",
}  # fmt: skip


def _display_server_pids(pids: Iterable[int]) -> set[int]:
    try:
        import psutil
    except ImportError:
        return set()
    found: set[int] = set()
    for pid in pids:
        try:
            if psutil.Process(pid).name().lower() in _ALWAYS_ON_GPU:
                found.add(pid)
        except psutil.Error:
            continue
    return found


class UnknownIdleSensor:
    """For platforms where input idle time cannot be read (e.g. Wayland): always unknown."""

    def __init__(self, why: str = "input idle time unknown") -> None:
        self.why = why

    def idle_seconds(self) -> float | None:
        """Always None (the policy treats unknown as not idle)."""
        return None


class X11IdleSensor:
    """Idle time from the X11 screensaver extension (python-xlib).

    Args:
        display: X display name (None: ``$DISPLAY``).
    """

    def __init__(self, display: str | None = None) -> None:
        self.display_name = display
        self._display: Any = None

    def idle_seconds(self) -> float | None:
        """Milliseconds since last input / 1000, or None when X is unreachable."""
        try:
            if self._display is None:
                from Xlib import display as xdisplay

                self._display = xdisplay.Display(self.display_name)
                if not self._display.has_extension("MIT-SCREEN-SAVER"):
                    logger.warning("X server has no MIT-SCREEN-SAVER extension: idle time unknown")
            root = self._display.screen().root
            return float(self._display.screensaver_query_info(root).idle) / 1000.0
        except Exception as e:
            logger.debug("X11 idle query failed: %s", e)
            self.close()
            return None

    def close(self) -> None:
        """Closes the X connection."""
        if self._display is not None:
            with contextlib.suppress(Exception):
                self._display.close()
            self._display = None


class WindowsIdleSensor:  # pragma: no cover - Windows only
    """Idle time from ``GetLastInputInfo`` (sees only the current session's input)."""

    def idle_seconds(self) -> float | None:
        """Seconds since the last input in this session, or None on failure."""
        try:

            class LastInputInfo(ctypes.Structure):
                _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

            info = LastInputInfo()
            info.cbSize = ctypes.sizeof(info)
            windll: Any = ctypes.windll  # type: ignore[attr-defined,unused-ignore]
            if not windll.user32.GetLastInputInfo(ctypes.byref(info)):
                return None
            now = windll.kernel32.GetTickCount() & 0xFFFFFFFF
            return ((now - info.dwTime) & 0xFFFFFFFF) / 1000.0
        except Exception as e:
            logger.debug("GetLastInputInfo failed: %s", e)
            return None


_HID_IDLE_RE = re.compile(r'"HIDIdleTime"\s*=\s*(\d+)')


class MacIdleSensor:
    """Idle time from ``ioreg -c IOHIDSystem`` (``HIDIdleTime`` in nanoseconds)."""

    def idle_seconds(self) -> float | None:
        """Seconds since last input, or None when ioreg fails."""
        try:
            out = subprocess.run(
                ["ioreg", "-c", "IOHIDSystem", "-d", "4"], capture_output=True, text=True, timeout=5
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            logger.debug("ioreg failed: %s", e)
            return None
        return parse_hid_idle(out)


def parse_hid_idle(ioreg_output: str) -> float | None:
    """Seconds from the first ``HIDIdleTime`` in ioreg output, or None."""
    match = _HID_IDLE_RE.search(ioreg_output)
    return int(match.group(1)) / 1e9 if match else None


def make_idle_sensor(platform: str | None = None, env: dict[str, str] | None = None) -> IdleSensor:
    """Picks the idle sensor for this platform.

    Wayland sessions get :class:`UnknownIdleSensor`: X11 would only see XWayland input and
    report a busy user as idle.
    """
    platform = platform or sys.platform
    env = dict(os.environ) if env is None else env
    if platform == "win32":
        return WindowsIdleSensor()
    if platform == "darwin":
        return MacIdleSensor()
    if env.get("WAYLAND_DISPLAY") or env.get("XDG_SESSION_TYPE") == "wayland":
        return UnknownIdleSensor("Wayland hides input from other apps: idle time unknown")
    if env.get("DISPLAY"):
        return X11IdleSensor()
    return UnknownIdleSensor("no display: idle time unknown")


class PsutilAppSensor:
    """Finds running processes whose name (or executable's name) is in the pause list."""

    def running(self, names: Iterable[str]) -> tuple[str, ...]:
        """Matching process names, sorted; empty when psutil is missing."""
        wanted = {n.lower() for n in names if n}
        if not wanted:
            return ()
        try:
            import psutil
        except ImportError:
            return ()
        found: set[str] = set()
        for proc in psutil.process_iter(["name", "exe"]):
            info = proc.info
            candidates = {str(info.get("name") or "").lower()}
            if info.get("exe"):
                candidates.add(os.path.basename(str(info["exe"])).lower())
            found.update(candidates & wanted)
        return tuple(sorted(found))

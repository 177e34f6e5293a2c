"""The real tray on Linux: Xvfb + trayer + pystray's gtk backend under dbus-run-session.

The test right-clicks the icon with xdotool, clicks "Share my GPU" in the real GTK menu, checks
that a server process starts, that the icon's pixels turn from grey to green, then unchecks it
and checks that the server stops, and quits from the menu. It saves a screenshot of the open
menu to ``$COROLLA_TRAY_SCREENSHOT`` (default: the test's temp dir; ``.ci/pictures.sh`` points it
at ``docs/tray-menu.png`` for the README).

Every wait polls what X shows now and tolerates the races of a busy machine: windows are looked up
and measured afresh on each poll, grabs are clipped to the screen, and an X error from a window
that is being resized, mapped or destroyed counts as "not yet". A menu is clicked only once its
geometry has held still and it is painted; each click is followed by a wait for its effect.

System packages: see ``.ci/system-deps.sh``. This test fails (it does not skip) on Linux
when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from agent_helpers import fake_server_command, kill_pid, pid_alive, wait_for

from corolla.agent.control import AgentNotRunningError, send_command
from corolla.agent.icons import STATE_COLOURS
from corolla.agent.paths import AgentPaths
from corolla.agent.settings import AgentSettings, SettingsStore
from corolla.agent.state import AgentState

pytestmark = [
    pytest.mark.gui,
    pytest.mark.timeout(240),  # generous: every wait below is bounded, and a loaded CI machine is slow
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the GUI test drives X11 (Linux only)"),
]

SCREEN = (640, 400)
WAIT_S = 30.0  # bound of each wait for the GUI to catch up (a poll returns as soon as it is true)


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: run .ci/system-deps.sh (as root) first")
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def display() -> Iterator[Any]:
    """A fresh Xvfb server; yields an open python-xlib Display."""
    from Xlib import display as xdisplay

    read_fd, write_fd = os.pipe()
    screen = f"{SCREEN[0]}x{SCREEN[1]}x24"
    xvfb = subprocess.Popen(
        [_need("Xvfb"), "-displayfd", str(write_fd), "-screen", "0", screen, "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()  # Xvfb writes the display number once it is ready
        assert number, "Xvfb did not start"
        dpy = xdisplay.Display(f":{number}")
        yield dpy
        dpy.close()
    finally:
        _stop(xvfb)


def _top_windows(dpy: Any) -> list[tuple[Any, str, Rect, bool]]:
    from Xlib import X

    found = []
    for window in dpy.screen().root.query_tree().children:
        try:
            geometry = window.get_geometry()
            viewable = window.get_attributes().map_state == X.IsViewable
            name = window.get_wm_name() or ""
        except Exception:  # the window went away meanwhile
            continue
        found.append((window, str(name), Rect(geometry.x, geometry.y, geometry.width, geometry.height), viewable))
    return found


def _on_screen(rect: Rect) -> Rect | None:
    """``rect`` clipped to the screen (the root window's bounds), or None if nothing of it is on screen."""
    x0, y0 = max(0, rect.x), max(0, rect.y)
    x1, y1 = min(SCREEN[0], rect.x + rect.w), min(SCREEN[1], rect.y + rect.h)
    return Rect(x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def _grab(dpy: Any, rect: Rect) -> Any:
    """The screen's pixels in ``rect`` (clipped to the screen), or None if X could not give them now.

    A rectangle read while a window is being resized can be stale; X answers a grab outside the root
    window with BadMatch. Pollers treat None as "not yet" and measure again.
    """
    from PIL import Image
    from Xlib import X
    from Xlib.error import XError

    clipped = _on_screen(rect)
    if clipped is None:
        return None
    try:
        raw = dpy.screen().root.get_image(clipped.x, clipped.y, clipped.w, clipped.h, X.ZPixmap, 0xFFFFFFFF)
    except XError:
        return None
    return Image.frombytes("RGB", (clipped.w, clipped.h), raw.data, "raw", "BGRX")


def _count(image: Any, colour: tuple[int, int, int]) -> int:
    return sum(n for n, rgb in image.getcolors(image.width * image.height) if rgb == colour)


def _steady(measure: Callable[[], Any], still_s: float = 0.3) -> Callable[[], Any]:
    """A predicate for ``wait_for``: ``measure()``'s value once it is truthy and has not changed for ``still_s``."""
    since: list[Any] = [None, 0.0]  # the last value, and when it was first seen

    def check() -> Any:
        value, now = measure(), time.monotonic()
        if not value or value != since[0]:
            since[:] = [value, now]
            return None
        return value if now - since[1] >= still_s else None

    return check


@pytest.fixture
def tray_host(display: Any) -> Iterator[Rect]:
    """trayer docked at the top right; yields its panel's rectangle."""
    env = {**os.environ, "DISPLAY": display.get_display_name()}
    trayer = subprocess.Popen(
        [_need("trayer"), "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        panel = wait_for(lambda: [r for _, n, r, v in _top_windows(display) if n == "panel" and v], WAIT_S, "trayer")
        yield panel[0]  # type: ignore[index]
    finally:
        _stop(trayer)


def _status(paths: AgentPaths) -> dict[str, Any] | None:
    try:
        return send_command(paths.control_socket, "status", timeout_s=2)["status"]  # type: ignore[no-any-return]
    except (AgentNotRunningError, OSError, ValueError):
        return None


def test_tray_menu_toggles_sharing(display: Any, tray_host: Rect, agent_paths: AgentPaths, tmp_path: Path) -> None:
    xdotool = _need("xdotool")
    dbus_run_session = _need("dbus-run-session")
    settings = AgentSettings(server_command=fake_server_command(), idle_minutes=0, poll_interval_s=0.25)
    SettingsStore(agent_paths.settings_file).save(settings)
    env = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=display.get_display_name(), NO_AT_BRIDGE="1", GDK_BACKEND="x11", PYSTRAY_BACKEND="gtk")
    out = open(tmp_path / "agent.out", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [dbus_run_session, "--", sys.executable, "-m", "corolla.agent.cli"], env=env, stdout=out, stderr=out
    )
    started: list[int] = []
    agent_pid = 0

    def xdo(*args: str) -> None:
        subprocess.run([xdotool, *args], env=env, check=True, timeout=10)

    def icon_rect() -> Rect:
        # the panel grows to fit the docked icon: measured afresh on every poll
        panels = [r for _, n, r, v in _top_windows(display) if n == "panel" and v]
        return panels[0] if panels else tray_host

    def icon_shows(state: AgentState) -> bool:
        # one grab answers "this colour and no other state's": a half-redrawn icon is "not yet"
        image = _grab(display, icon_rect())
        if image is None:
            return False
        counts = {other: _count(image, STATE_COLOURS[other]) for other in (AgentState.STOPPED, AgentState.SHARING)}
        return counts.pop(state, 0) > 100 and all(n <= 100 for n in counts.values())

    def painted(rect: Rect) -> bool:
        image = _grab(display, rect)
        return image is not None and len(image.getcolors(image.width * image.height)) > 1  # text on a background

    def open_menu() -> tuple[int, Rect]:
        """Right-click the icon; the menu's window id and rectangle once it is mapped, still and painted."""
        before = {w.id for w, n, r, v in _top_windows(display) if v}
        panel: Rect = wait_for(_steady(icon_rect), WAIT_S, "the panel to stop resizing")  # type: ignore[assignment]
        xdo("mousemove", str(panel.x + panel.w // 2), str(panel.y + panel.h // 2), "click", "3")

        def popup() -> tuple[int, Rect] | None:
            # the menu is the tallest new window (a tooltip may pop up too)
            new = [(w.id, r) for w, _, r, v in _top_windows(display) if v and w.id not in before and r.h > 120]
            return max(new, key=lambda item: item[1].h) if new else None

        menu = wait_for(_steady(popup), WAIT_S, "the tray menu to open")
        wait_for(lambda: painted(menu[1]), WAIT_S, "the tray menu to be drawn")  # type: ignore[index]
        return menu  # type: ignore[return-value]

    def click_item(menu: tuple[int, Rect], from_top: int | None = None, from_bottom: int | None = None) -> None:
        window, rect = menu
        y = rect.y + from_top if from_top is not None else rect.y + rect.h - (from_bottom or 0)
        xdo("mousemove", str(rect.x + 40), str(y), "click", "1")
        wait_for(lambda: not any(v and w.id == window for w, _, _, v in _top_windows(display)), WAIT_S, "menu to close")

    def wait_state(state: str) -> dict[str, Any]:
        return wait_for(lambda: (s := _status(agent_paths)) and s["state"] == state and s, WAIT_S, state)  # type: ignore[return-value]

    try:
        # dbus-run-session's children (bus daemon, agent): killed by pid below if the test fails
        session = wait_for(lambda: len(c := psutil.Process(agent.pid).children()) >= 2 and c, WAIT_S, "dbus")
        started.extend(child.pid for child in session)  # type: ignore[attr-defined]
        first = wait_state("stopped")
        agent_pid = first["agent_pid"]
        wait_for(lambda: icon_shows(AgentState.STOPPED), WAIT_S, "grey icon docked in trayer")

        click_item(open_menu(), from_top=16)  # "Share my GPU"
        sharing = wait_state("sharing")
        server_pid = sharing["pid"]
        started.append(server_pid)
        assert pid_alive(server_pid)
        wait_for(lambda: icon_shows(AgentState.SHARING), WAIT_S, "icon turns green (and no grey left)")

        menu = open_menu()  # screenshot of the open menu, with sharing on, for the README
        wait_for(lambda: (s := _status(agent_paths)) is not None and s["tokens_processed"] > 0, WAIT_S, "tokens")
        pad = 16
        shot = Rect(max(0, menu[1].x - 2 * pad), 0, 0, 0)
        shot = Rect(shot.x, 0, SCREEN[0] - shot.x, min(SCREEN[1], menu[1].y + menu[1].h + pad))
        target = Path(os.environ.get("COROLLA_TRAY_SCREENSHOT") or tmp_path / "tray-menu.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        wait_for(lambda: _grab(display, shot), WAIT_S, "the screenshot").save(target)  # type: ignore[attr-defined]

        click_item(menu, from_top=16)  # uncheck "Share my GPU"
        wait_state("stopped")
        wait_for(lambda: not pid_alive(server_pid), WAIT_S, "server stopped")
        wait_for(lambda: icon_shows(AgentState.STOPPED), WAIT_S, "icon back to grey (and no green left)")

        click_item(open_menu(), from_bottom=16)  # "Quit"
        assert agent.wait(30) == 0, (tmp_path / "agent.out").read_text()
        assert not pid_alive(agent_pid) and not agent_paths.control_socket.exists()
    finally:
        if agent.poll() is None:
            kill_pid(agent_pid)
            _stop(agent)
        for pid in started:
            kill_pid(pid)
        out.close()

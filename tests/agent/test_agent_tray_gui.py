"""The real tray on Linux: Xvfb + trayer + pystray's gtk backend under dbus-run-session.

The test right-clicks the icon with xdotool, clicks "Share my GPU" in the real GTK menu, checks
that a server process starts, that the icon's pixels turn from grey to green, then unchecks it
and checks that the server stops, and quits from the menu. It saves a screenshot of the open
menu to ``$COROLLA_TRAY_SCREENSHOT`` (default: the test's temp dir).

System packages: see ``.ci/system-deps.sh``. This test fails (it does not skip) on Linux
when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
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
    pytest.mark.timeout(90),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the GUI test drives X11 (Linux only)"),
]

SCREEN = (640, 400)


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


def _grab(dpy: Any, rect: Rect) -> Any:
    from PIL import Image
    from Xlib import X

    root = dpy.screen().root
    raw = root.get_image(rect.x, rect.y, rect.w, rect.h, X.ZPixmap, 0xFFFFFFFF)
    return Image.frombytes("RGB", (rect.w, rect.h), raw.data, "raw", "BGRX")


def _count(image: Any, colour: tuple[int, int, int]) -> int:
    return sum(n for n, rgb in image.getcolors(image.width * image.height) if rgb == colour)


@pytest.fixture
def tray_host(display: Any) -> Iterator[Rect]:
    """trayer docked at the top right; yields its panel's rectangle."""
    env = {**os.environ, "DISPLAY": display.get_display_name()}
    trayer = subprocess.Popen(
        [_need("trayer"), "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        panel = wait_for(lambda: [r for _, n, r, v in _top_windows(display) if n == "panel" and v], what="trayer")
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
        # the panel grows to fit the docked icon; re-read its geometry
        panels = [r for _, n, r, v in _top_windows(display) if n == "panel" and v]
        return panels[0] if panels else tray_host

    def icon_shows(state: AgentState) -> bool:
        return _count(_grab(display, icon_rect()), STATE_COLOURS[state]) > 100

    def open_menu() -> Rect:
        before = {w.id for w, n, r, v in _top_windows(display) if v}
        panel = icon_rect()
        xdo("mousemove", str(panel.x + panel.w // 2), str(panel.y + panel.h // 2), "click", "3")

        def popup() -> list[Rect]:
            # the menu is the tallest new window (a tooltip may pop up too)
            new = [r for w, _, r, v in _top_windows(display) if v and w.id not in before and r.h > 120]
            return sorted(new, key=lambda r: r.h, reverse=True)

        return wait_for(popup, what="the tray menu to open")[0]  # type: ignore[index, no-any-return]

    def click_item(menu: Rect, from_top: int | None = None, from_bottom: int | None = None) -> None:
        y = menu.y + from_top if from_top is not None else menu.y + menu.h - (from_bottom or 0)
        xdo("mousemove", str(menu.x + 40), str(y), "click", "1")
        wait_for(lambda: not any(v and r == menu for _, _, r, v in _top_windows(display)), what="menu to close")

    def wait_state(state: str) -> dict[str, Any]:
        return wait_for(lambda: (s := _status(agent_paths)) and s["state"] == state and s, 20, state)  # type: ignore[return-value]

    try:
        # dbus-run-session's children (bus daemon, agent): killed by pid below if the test fails
        session = wait_for(lambda: len(c := psutil.Process(agent.pid).children()) >= 2 and c, what="dbus")
        started.extend(child.pid for child in session)  # type: ignore[attr-defined]
        first = wait_state("stopped")
        agent_pid = first["agent_pid"]
        wait_for(lambda: icon_shows(AgentState.STOPPED), what="grey icon docked in trayer")

        click_item(open_menu(), from_top=16)  # "Share my GPU"
        sharing = wait_state("sharing")
        server_pid = sharing["pid"]
        started.append(server_pid)
        assert pid_alive(server_pid)
        wait_for(lambda: icon_shows(AgentState.SHARING), what="icon turns green")
        assert not icon_shows(AgentState.STOPPED)

        menu = open_menu()  # screenshot of the open menu, with sharing on, for the README
        wait_for(lambda: _status(agent_paths)["tokens_processed"] > 0, what="tokens")  # type: ignore[index]
        pad = 16
        shot = Rect(max(0, menu.x - 2 * pad), 0, 0, 0)
        shot = Rect(shot.x, 0, SCREEN[0] - shot.x, min(SCREEN[1], menu.y + menu.h + pad))
        target = Path(os.environ.get("COROLLA_TRAY_SCREENSHOT") or tmp_path / "tray-menu.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        _grab(display, shot).save(target)

        click_item(menu, from_top=16)  # uncheck "Share my GPU"
        wait_state("stopped")
        wait_for(lambda: not pid_alive(server_pid), what="server stopped")
        wait_for(lambda: icon_shows(AgentState.STOPPED), what="icon back to grey")

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

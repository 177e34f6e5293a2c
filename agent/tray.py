"""The tray shell (pystray): an icon per state, a tooltip, and a menu that sends commands.

Nothing here decides anything: every menu item calls :meth:`AgentApp.dispatch`, and the icon
follows the app's status through a listener. On Linux the ``gtk`` backend is used unless
``PYSTRAY_BACKEND`` says otherwise (it needs a D-Bus session bus and an XEmbed tray).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from corolla.agent.app import AgentApp
from corolla.agent.icons import state_image
from corolla.agent.state import STATE_LABELS, Command, Status

logger = logging.getLogger(__name__)

SHARE_LABEL = "Share my GPU"


def _import_pystray() -> Any:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("PYSTRAY_BACKEND", "gtk")
    import pystray

    try:  # name the GTK windows (WM_CLASS) after the agent, not after cli.py
        from gi.repository import GLib

        GLib.set_prgname("corolla-agent")
    except Exception:
        pass
    return pystray


def build_menu(app: AgentApp, pystray: Any) -> Any:
    """Builds the tray menu; every item only sends a command to ``app``.

    Args:
        app: The app core.
        pystray: The imported ``pystray`` module.

    Returns:
        A ``pystray.Menu``.
    """
    item, menu = pystray.MenuItem, pystray.Menu

    def send(command: Command) -> Any:
        def action(icon: Any, _item: Any) -> None:
            reply = app.dispatch(command)
            if not reply.ok:
                logger.warning("%s: %s", command.value, reply.message)

        return action

    def status_line(_item: Any) -> str:
        status = app.status
        line = STATE_LABELS[status.state]
        if status.reasons:
            line += f" ({status.reasons[0]})"
        elif status.blocks and status.state.value in ("sharing", "starting"):
            line += f": blocks {status.blocks}, {status.tokens_processed:,} tokens"
        return line

    def sharing_on(_item: Any) -> bool:
        return app.status.share_enabled

    def autostart_action(icon: Any, _item: Any) -> None:
        on = app.status.start_at_login
        send(Command.START_AT_LOGIN_OFF if on else Command.START_AT_LOGIN_ON)(icon, _item)

    return menu(
        item(SHARE_LABEL, send(Command.TOGGLE_SHARE), checked=sharing_on),
        item(status_line, None, enabled=False),
        menu.SEPARATOR,
        item("Pause until idle", send(Command.PAUSE_UNTIL_IDLE), enabled=sharing_on),
        item("Snooze 1 hour", send(Command.SNOOZE), enabled=sharing_on),
        item("Start at login", autostart_action, checked=lambda _i: app.status.start_at_login),
        item("Open logs", send(Command.OPEN_LOGS)),
        menu.SEPARATOR,
        item("Quit", send(Command.QUIT)),
    )


def run_tray(app: AgentApp) -> None:
    """Shows the icon and runs the GUI loop until the app quits (blocks; main thread).

    The app's worker thread is started once the icon is up.

    Args:
        app: The app core (not yet started).
    """
    pystray = _import_pystray()
    status = app.status
    icon = pystray.Icon("corolla-agent", icon=state_image(status.state), title=status.tooltip())
    icon.menu = build_menu(app, pystray)
    shown = {"state": status.state}

    def on_status(new: Status) -> None:
        if new.state != shown["state"]:
            shown["state"] = new.state
            icon.icon = state_image(new.state)
        icon.title = new.tooltip()
        _set_gtk_tooltip(icon, new.tooltip())
        icon.update_menu()
        if app.done.is_set():
            icon.stop()

    def setup(icon: Any) -> None:
        icon.visible = True
        _set_gtk_tooltip(icon, status.tooltip())
        app.add_listener(on_status)
        app.start()
        logger.info("tray icon shown (%s backend)", type(icon).__module__.rsplit(".", 1)[-1])

    try:
        icon.run(setup)
    except Exception as e:  # pystray's gtk cleanup raises when no notification daemon runs
        if not app.done.is_set():
            raise
        logger.debug("tray cleanup: %s", e)


def _set_gtk_tooltip(icon: Any, text: str) -> None:
    # pystray's gtk backend only sets the StatusIcon title; set the real tooltip as well.
    status_icon = getattr(icon, "_status_icon", None)
    if status_icon is None:
        return
    try:
        from gi.repository import GLib

        GLib.idle_add(lambda: status_icon.set_tooltip_text(text) and False)
    except Exception:
        pass

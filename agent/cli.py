"""``corolla-agent``: the tray (default), ``--headless``, or a command to the running agent.

Examples::

    corolla-agent                 # tray icon; sharing starts off until you turn it on
    corolla-agent --headless      # same agent, no tray; control it with the commands below
    corolla-agent status          # state, blocks served, tokens processed
    corolla-agent share           # turn sharing on (still only while the computer is idle)
    corolla-agent pause           # turn sharing off (--until-idle / --snooze for 1 h)
    corolla-agent quit            # stop the server and the agent
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import signal
import sys
import threading
import time
from pathlib import Path

from corolla.agent.paths import AgentPaths
from corolla.agent.state import Command

logger = logging.getLogger("corolla.agent")

_SIMPLE = {"status": Command.STATUS, "share": Command.SHARE_ON, "quit": Command.QUIT}


def configure_logging(log_file: Path | None, verbose: bool = False) -> None:
    """Logs to stderr and (rotating) to ``log_file``."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler
        handlers.append(rotating(log_file, maxBytes=2_000_000, backupCount=2, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corolla-agent",
        description="Share this computer's idle GPU with a Corolla swarm (tray icon or headless).",
    )
    parser.add_argument("--headless", action="store_true", help="run without a tray icon")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = sub.add_parser("status", help="show the running agent's state")
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    sub.add_parser("share", help="turn sharing on (only while idle)")
    pause = sub.add_parser("pause", help="turn sharing off")
    how = pause.add_mutually_exclusive_group()
    how.add_argument("--until-idle", action="store_true", help="pause now, resume once idle again")
    how.add_argument("--snooze", action="store_true", help="pause for one hour")
    sub.add_parser("logs", help="print where the logs are")
    sub.add_parser("quit", help="stop the server and the agent")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``corolla-agent`` console script.

    Returns:
        The exit code.
    """
    args = _parser().parse_args(argv)
    paths = AgentPaths.default()
    if args.command is None:
        return _run_agent(paths, headless=args.headless, verbose=args.verbose)
    if args.command == "logs":
        sys.stdout.write(f"{paths.log_dir}\n")
        return 0
    command = _SIMPLE.get(args.command, Command.SHARE_OFF)
    if args.command == "pause" and args.until_idle:
        command = Command.PAUSE_UNTIL_IDLE
    elif args.command == "pause" and args.snooze:
        command = Command.SNOOZE
    return _send(paths, command, as_json=bool(getattr(args, "json", False)))


def _send(paths: AgentPaths, command: Command, as_json: bool) -> int:
    from corolla.agent.control import AgentNotRunningError, send_command

    try:
        reply = send_command(paths.control_socket, command.value)
    except AgentNotRunningError as e:
        sys.stderr.write(f"corolla-agent: {e}\nStart it with `corolla-agent` or `corolla-agent --headless`\n")
        return 3
    if as_json:
        sys.stdout.write(json.dumps(reply, indent=2) + "\n")
    else:
        sys.stdout.write(f"{reply['message']}\n")
    if command is Command.QUIT and reply.get("ok"):
        _wait_gone(paths.control_socket, timeout_s=120.0)
    return 0 if reply.get("ok") else 1


def _wait_gone(path: Path, timeout_s: float) -> None:
    """Waits until the agent has stopped its server and closed the socket."""
    from corolla.agent.control import AgentNotRunningError, send_command

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            send_command(path, Command.STATUS.value, timeout_s=2.0)
        except (AgentNotRunningError, OSError, ValueError):
            return
        time.sleep(0.2)


def _run_agent(paths: AgentPaths, headless: bool, verbose: bool) -> int:
    from corolla.agent.app import AgentApp
    from corolla.agent.control import AgentAlreadyRunningError, ControlServer
    from corolla.agent.sensors import Sensors
    from corolla.agent.settings import SettingsStore

    paths.ensure()
    configure_logging(paths.agent_log, verbose)
    store = SettingsStore(paths.settings_file)
    settings, error = store.load()
    app = AgentApp(settings, paths, Sensors.default(), store=store, settings_error=error)
    try:
        control = ControlServer(app, paths.control_socket)
    except AgentAlreadyRunningError as e:
        logger.error("%s", e)
        return 2
    control.start()
    _quit_on_signals(app)
    try:
        if headless:
            app.start()
            while not app.done.wait(0.5):
                pass
        else:
            from corolla.agent.tray import run_tray

            run_tray(app)
    except Exception as e:
        logger.error("tray failed (%s); use `corolla-agent --headless` on machines without a tray", e)
        return 1
    finally:
        app.shutdown()
        control.close()
    return 0


def _quit_on_signals(app: object) -> None:
    from corolla.agent.app import AgentApp

    assert isinstance(app, AgentApp)
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: object) -> None:
        logger.info("signal %d: quitting", signum)
        # dispatch from a helper thread: the handler may interrupt a thread holding the app lock
        threading.Thread(target=app.dispatch, args=(Command.QUIT,), daemon=True).start()

    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

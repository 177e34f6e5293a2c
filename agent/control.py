"""The local control socket: JSON lines between ``corolla-agent <command>`` and the agent.

POSIX: a Unix socket (mode 0600) in the runtime dir. Windows: a loopback TCP port written,
with a random token, to ``control.json`` in the runtime dir. Each request line is
``{"command": "share-on"}`` (plus ``"token"`` on Windows); each response line is
:meth:`corolla.agent.state.Reply.to_dict`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

from corolla.agent.app import AgentApp

logger = logging.getLogger(__name__)

MAX_LINE = 64 * 1024


class AgentNotRunningError(ConnectionError):
    """No agent answers on the control socket."""


class AgentAlreadyRunningError(RuntimeError):
    """Another agent already owns the control socket."""


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            reply = self.server.answer(line)
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    app: AgentApp
    token: str | None

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            if len(line) > MAX_LINE:
                raise ValueError("request too long")
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError('expected {"command": "..."}')
            if self.token is not None and not secrets.compare_digest(str(request.get("token")), self.token):
                raise ValueError("bad token")
        except ValueError as e:
            return {"ok": False, "message": f"bad request: {e}", "status": self.app.status.to_dict()}
        return self.app.dispatch(request["command"]).to_dict()


if sys.platform == "win32":  # pragma: no cover - Windows only

    class _PlatformServer(_Server, socketserver.TCPServer):
        pass

else:

    class _PlatformServer(_Server, socketserver.UnixStreamServer):  # type: ignore[no-redef]
        pass


class ControlServer:
    """Serves :meth:`AgentApp.dispatch` on the control socket in a background thread.

    Args:
        app: The app whose commands to serve.
        path: The socket path (POSIX) or port file (Windows).

    Raises:
        AgentAlreadyRunningError: Another agent answers on ``path``.
    """

    def __init__(self, app: AgentApp, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _answers(path):
            raise AgentAlreadyRunningError(f"corolla-agent is already running (control socket {path})")
        token = None
        if sys.platform == "win32":  # pragma: no cover - Windows only
            token = secrets.token_hex(16)
            server = _PlatformServer(("127.0.0.1", 0), _Handler)
            port = server.server_address[1]
            path.write_text(json.dumps({"port": port, "token": token}), encoding="utf-8")
        else:
            path.unlink(missing_ok=True)  # stale socket from an agent that died
            old_umask = os.umask(0o177)
            try:
                server = _PlatformServer(str(path), _Handler)
            finally:
                os.umask(old_umask)
        server.app = app
        server.token = token
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="corolla-control", daemon=True)

    def start(self) -> None:
        """Starts answering."""
        self._thread.start()
        logger.info("control socket: %s", self.path)

    def close(self) -> None:
        """Stops answering and removes the socket file."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _connect(path: Path, timeout_s: float) -> tuple[socket.socket, str | None]:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return socket.create_connection(("127.0.0.1", int(info["port"])), timeout_s), str(info["token"])
        except (OSError, ValueError, KeyError) as e:
            raise AgentNotRunningError(f"no agent running ({e})") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise AgentNotRunningError(f"no agent answers on {path} ({e.strerror or e})") from e
    return sock, None


def _answers(path: Path) -> bool:
    if sys.platform != "win32" and not path.exists():
        return False
    try:
        sock, _ = _connect(path, 1.0)
    except AgentNotRunningError:
        return False
    sock.close()
    return True


def send_command(path: Path, command: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Sends one command to the running agent.

    Args:
        path: The control socket (see :attr:`AgentPaths.control_socket`).
        command: A :class:`~corolla.agent.state.Command` value.
        timeout_s: Seconds to wait for the answer.

    Returns:
        The reply dict: ``ok``, ``message``, ``status``.

    Raises:
        AgentNotRunningError: No agent is running (start one with ``corolla-agent --headless``).
    """
    sock, token = _connect(path, timeout_s)
    with sock, sock.makefile("rwb") as stream:
        request: dict[str, Any] = {"command": command}
        if token is not None:
            request["token"] = token
        stream.write(json.dumps(request).encode() + b"\n")
        stream.flush()
        line = stream.readline(MAX_LINE + 1)
    if not line:
        raise AgentNotRunningError(f"the agent on {path} closed the connection")
    reply: dict[str, Any] = json.loads(line)
    return reply

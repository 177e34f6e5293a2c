"""The web faces' shared start-up (``corolla api``, ``corolla monitor``): check the ``api`` extra, find
the initial peers, check the port is free, then serve an ASGI app with uvicorn until SIGINT/SIGTERM.

FastAPI, uvicorn and prometheus-client load only inside these functions, when a face runs.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any

from corolla.engine.config import ClientConfig, from_env
from corolla.engine.errors import CorollaError, missing_extra


def require_web_extra(command: str) -> None:
    """A CorollaError saying what to install when the ``api`` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CorollaError(missing_extra(f"`corolla {command}`", "api", e.name)) from e


def initial_peers_or_env(peers: Sequence[str], command: str) -> tuple[str, ...]:
    """``peers``, else ``COROLLA_INITIAL_PEERS``; a CorollaError saying what to pass if neither is set."""
    found = from_env(ClientConfig, initial_peers=tuple(peers) or None).initial_peers
    if not found:
        raise CorollaError(
            f"no initial peers: pass `corolla {command} --initial-peers MADDR...` (the addresses a server "
            "prints) or set COROLLA_INITIAL_PEERS"
        )
    return found


def before_serving(command: str, initial_peers: Sequence[str]) -> tuple[str, ...]:
    """What every web face checks before it joins the swarm: the extra is installed, and the initial peers
    (given, else from ``COROLLA_INITIAL_PEERS``), which it returns."""
    require_web_extra(command)
    return initial_peers_or_env(initial_peers, command)


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go: a CorollaError saying what to change if it cannot be had.

    Done before anything slow starts, so a port in use is one line, not a failure after joining the swarm.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CorollaError(f"cannot listen on {host!r} ({e.strerror}): pick another with --host") from e
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CorollaError(f"port {port} on {host} is in use: pick another with --port") from e
            raise CorollaError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --host or --port") from e


def serve(app: Any, host: str, port: int, on_listening: Callable[[], None], **options: Any) -> None:
    """Serve ``app`` at ``host:port`` until SIGINT/SIGTERM; ``on_listening`` runs once the socket is bound
    (the faces log their own "serving at" line there; no access log).

    ``options`` go to ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown``).
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_listening()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **options)
    _Server(config).run()

"""The web faces' shared start-up (``corolla api``, ``corolla monitor``): check the ``api`` extra, find
the initial peers, then serve an ASGI app with uvicorn until SIGINT/SIGTERM.

FastAPI, uvicorn and prometheus-client load only inside these functions, when a face runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corolla.engine.config import ClientConfig, from_env
from corolla.engine.errors import CorollaError


def require_web_extra(command: str) -> None:
    """A CorollaError saying what to install when the ``api`` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CorollaError(
            f"`corolla {command}` needs the api extra: pip install 'corolla[api]' ({e.name} is missing)"
        ) from e


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


def serve(app: Any, host: str, port: int, **options: Any) -> None:
    """Serve ``app`` at ``host:port`` until SIGINT/SIGTERM; the faces log their own lines (no access log).

    ``options`` go to ``uvicorn.run`` (e.g. ``timeout_graceful_shutdown``).
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, **options)

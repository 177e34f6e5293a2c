"""``corolla api``: join the swarm once, then serve the OpenAI-compatible app with uvicorn."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corolla.engine.config import ClientConfig, from_env
from corolla.engine.errors import CorollaError, missing_extra

logger = logging.getLogger(__name__)


def require_web_extra(command: str = "api") -> None:
    """A CorollaError naming the install command if the ``api`` extra (FastAPI, uvicorn) is missing."""
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
    """Run ``app`` with uvicorn until SIGINT/SIGTERM; ``on_listening`` runs once the socket is bound."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_listening()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, **options)
    _Server(config).run()


def run_api(
    model: str,
    initial_peers: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    request_timeout: float = 600.0,
    default_max_tokens: int = 512,
    max_sessions: int = 8,
    swarm_key_file: str | None = None,
) -> int:
    """Serve ``model`` from the swarm at ``http://host:port/v1`` until SIGINT/SIGTERM. Returns an exit code."""
    require_web_extra("api")
    from corolla.engine.api.app import ApiSettings, create_app
    from corolla.engine.client.model import DistributedModelForCausalLM
    from corolla.engine.models.source import check_model_source
    from corolla.engine.models.source import model_id as model_id_of

    check_model_source(model)
    initial_peers = initial_peers_or_env(initial_peers, "api")
    api_key = api_key or os.environ.get("COROLLA_API_KEY") or None
    try:
        settings = ApiSettings(
            model_id=model_id or model_id_of(model),
            aliases=(model, str(Path(model).expanduser().resolve())),
            api_key=api_key,
            request_timeout=request_timeout,
            default_max_tokens=default_max_tokens,
            max_sessions=max_sessions,
        )
    except ValueError as e:
        raise CorollaError(str(e)) from e
    check_port_free(host, port)
    client = DistributedModelForCausalLM.from_pretrained(
        model, initial_peers=initial_peers, swarm_key=swarm_key_file
    )  # no file given: COROLLA_SWARM_KEY_FILE
    try:
        app = create_app(client, settings)

        def listening() -> None:
            logger.info(
                "serving %s at http://%s:%d/v1 (OpenAI-compatible%s)",
                settings.model_id,
                host,
                port,
                ", API key required" if api_key else "",
            )

        serve(app, host, port, listening, timeout_graceful_shutdown=5)
    finally:
        client.close()
    return 0

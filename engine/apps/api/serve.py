"""``corolla api``: join the swarm once, then serve the OpenAI-compatible app with uvicorn."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from corolla.engine.apps.web import before_serving, check_port_free, serve
from corolla.engine.errors import CorollaError

logger = logging.getLogger(__name__)


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
    max_queue: int = 64,
    max_body_bytes: int = 4 * 1024 * 1024,
    swarm_key_file: str | None = None,
) -> int:
    """Serve ``model`` from the swarm at ``http://host:port/v1`` until SIGINT/SIGTERM. Returns an exit code."""
    initial_peers = before_serving("api", initial_peers)
    from corolla.engine.apps.api.app import ApiSettings, create_app
    from corolla.engine.client.model import DistributedModelForCausalLM
    from corolla.engine.models.source import check_model_source
    from corolla.engine.models.source import model_id as model_id_of

    check_model_source(model)
    api_key = api_key or os.environ.get("COROLLA_API_KEY") or None
    try:
        settings = ApiSettings(
            model_id=model_id or model_id_of(model),
            aliases=(model, str(Path(model).expanduser().resolve())),
            api_key=api_key,
            request_timeout=request_timeout,
            default_max_tokens=default_max_tokens,
            max_sessions=max_sessions,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
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

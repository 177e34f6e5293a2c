"""``corolla api``: an OpenAI-compatible HTTP server in front of one shared swarm client.

A face above the core, like the CLI: the engine never imports it. FastAPI and uvicorn come with the
``api`` extra and are imported only by :mod:`corolla.engine.apps.api.app` and :mod:`corolla.engine.apps.api.serve`.
"""

__all__: list[str] = []

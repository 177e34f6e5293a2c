"""``corolla monitor``: one long-lived DHT reader behind a self-refreshing web page of the swarm.

A face above the core, like the CLI: the engine never imports it. FastAPI and uvicorn come with the
``api`` extra and are imported only by :mod:`corolla.engine.apps.monitor.app` and ``serve``.
"""

__all__: list[str] = []

"""The faces of Corolla: the ``corolla`` command line, the demo, the health table, the OpenAI-compatible
API, the swarm monitor, and the loopback-swarm kit the demo starts.

The top layer: apps import the client, the server and the core; nothing in the engine below imports
them (tests/unit/test_layers.py). Importing this package imports none of its modules.
"""

__all__: list[str] = []

"""Corolla engine: the distributed block model, DHT records, routing, sessions and servers.

The client names (the model, sessions, sampling, text) are imported on first use (PEP 562
``__getattr__``): a server process or a CLI command that stops at its arguments does not pay for
the client modules, and ``corolla --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corolla.engine.config import ClientConfig, ServerConfig
from corolla.engine.errors import (
    CacheFullError,
    CorollaError,
    MissingBlocksError,
    NoRouteError,
    PeerUnavailableError,
    PrivateSwarmError,
    ProtocolError,
    SessionClosedError,
)
from corolla.engine.version import __version__

if TYPE_CHECKING:
    from corolla.engine.client.classification import DistributedModelForSequenceClassification
    from corolla.engine.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
    from corolla.engine.client.sampling import SamplingParams
    from corolla.engine.client.session import InferenceSession
    from corolla.engine.client.text import GenerationResult, TextStream

__all__ = [
    "AutoDistributedModelForCausalLM",
    "CacheFullError",
    "ClientConfig",
    "CorollaError",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "GenerationResult",
    "InferenceSession",
    "MissingBlocksError",
    "NoRouteError",
    "PeerUnavailableError",
    "PrivateSwarmError",
    "ProtocolError",
    "SamplingParams",
    "ServerConfig",
    "SessionClosedError",
    "TextStream",
    "__version__",
]

# The lazily imported public names → the module that defines each.
_LAZY = {
    "AutoDistributedModelForCausalLM": "corolla.engine.client.model",
    "DistributedModelForCausalLM": "corolla.engine.client.model",
    "DistributedModelForSequenceClassification": "corolla.engine.client.classification",
    "GenerationResult": "corolla.engine.client.text",
    "InferenceSession": "corolla.engine.client.session",
    "SamplingParams": "corolla.engine.client.sampling",
    "TextStream": "corolla.engine.client.text",
}


def __getattr__(name: str) -> Any:
    """Import a client name's module on first access (then it is a plain attribute of this module)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

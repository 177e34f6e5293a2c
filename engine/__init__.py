"""Corolla engine: the distributed block model, DHT records, routing, sessions and servers."""

from corolla.engine.client.classification import DistributedModelForSequenceClassification
from corolla.engine.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.engine.client.sampling import SamplingParams
from corolla.engine.client.session import InferenceSession
from corolla.engine.client.text import GenerationResult, TextStream
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

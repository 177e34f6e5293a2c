"""What the LangChain and LlamaIndex adapters share: the client cache, parameter mapping, messages.

Neither langchain nor llama_index is imported here, so both adapters (and their tests) can use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from pydantic import SecretStr

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Tokens generated when the caller does not say (LangChain's ``max_tokens=None``).
DEFAULT_MAX_NEW_TOKENS = 256
#: Name under which usage and traces report this provider.
PROVIDER = "corolla"

FinishReason = Literal["stop", "length", "eos"]


class TextStreamLike(Protocol):
    """What the adapters need from ``corolla.engine.TextStream``."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None

    def __iter__(self) -> Iterator[str]: ...


class ResultLike(Protocol):
    """What the adapters need from ``corolla.engine.GenerationResult``."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class ClientLike(Protocol):
    """What the adapters need from ``corolla.engine.DistributedModelForCausalLM``."""

    model_name: str
    config: Any

    def generate_text(self, prompt: str, **kwargs: Any) -> ResultLike: ...

    def stream_text(self, prompt: str, **kwargs: Any) -> TextStreamLike: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


# --- one client per (model, swarm, token, config), shared by every adapter instance ----------------

_clients: dict[str, ClientLike] = {}
_clients_lock = threading.Lock()


def _client_key(model_name: str, initial_peers: Sequence[str], token: str | None, overrides: Mapping[str, Any]) -> str:
    # The token enters the key only as a digest, so the key can be logged or shown safely.
    token_digest = hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""
    return json.dumps([model_name, list(initial_peers), token_digest, dict(sorted(overrides.items()))], default=str)


def get_client(
    model_name: str,
    initial_peers: Sequence[str],
    token: SecretStr | str | None,
    overrides: Mapping[str, Any],
) -> ClientLike:
    """Return the shared client for this model and swarm, creating it on first use.

    The token is resolved (explicit → ``HF_TOKEN`` → ``hf auth login``) and the model's Hub access
    is checked before any connection to the swarm, so a missing access fails with a clear message.
    """
    from corolla.engine import DistributedModelForCausalLM
    from corolla.engine.hub import check_model_access, resolve_token

    resolved = resolve_token(token)
    key = _client_key(model_name, initial_peers, resolved, overrides)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            check_model_access(model_name, resolved)
            logger.info("Connecting to the swarm for %s", model_name)
            client = DistributedModelForCausalLM.from_pretrained(
                model_name, initial_peers=list(initial_peers), token=resolved, **dict(overrides)
            )
            _clients[key] = client
    return client


class AdapterFields(Protocol):
    """The fields of an adapter object (LangChain's or LlamaIndex's) that say which client it uses."""

    model_name: str
    initial_peers: list[str]
    token: SecretStr | None
    timeout: float | None
    max_retries: int | None
    client_config: dict[str, Any]
    swarm_key: str | None
    client: Any


def adapter_client(fields: AdapterFields, model: str | None = None) -> ClientLike:
    """The client an adapter object uses for ``model`` (default: its own model), connecting on first use.

    That is the ``client`` it was given, if any, for its own model; else the shared client of the
    model, swarm, token and client settings (:func:`get_client`).
    """
    if model is None or model == fields.model_name:
        if fields.client is not None:
            return fields.client  # type: ignore[no-any-return]
        model = fields.model_name
    overrides = client_overrides(
        fields.client_config, timeout=fields.timeout, max_retries=fields.max_retries, swarm_key=fields.swarm_key
    )
    return get_client(model, fields.initial_peers, fields.token, overrides)


def close_clients() -> None:
    """Close every shared client (for tests and for apps that want to leave the swarm)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        close = getattr(client, "close", None)
        if close is not None:
            close()


def client_overrides(
    client_config: Mapping[str, Any] | None,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
    swarm_key: str | None = None,
) -> dict[str, Any]:
    """``ClientConfig`` overrides from an adapter's fields (the standard ``timeout``/``max_retries``, a swarm key)."""
    overrides = dict(client_config or {})
    if swarm_key is not None:
        overrides.setdefault("swarm_key_file", str(swarm_key))
    if timeout is not None:
        overrides.setdefault("step_timeout", float(timeout))
    if max_retries is not None:
        overrides.setdefault("max_retries", int(max_retries))
    return overrides


# --- parameter mapping: the one place adapter parameters become engine keyword arguments ----------


#: The settings both adapters take as fields and as per-call keyword arguments (``.invoke(..., temperature=0.2)``,
#: ``.bind(...)``), in their OpenAI-style names; per-call values override fields.
SETTINGS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def engine_kwargs(settings: Mapping[str, Any], stop: Sequence[str] | None) -> dict[str, Any]:
    """Keyword arguments for ``generate_text``/``stream_text`` from an adapter's :data:`SETTINGS` and stops.

    The sampling settings become one ``corolla.engine.SamplingParams`` (its ``from_temperature`` holds the
    rule that temperature 0 means greedy); an adapter's unset temperature (``None``) means greedy too.
    ``top_k`` ``None``/``0`` and ``top_p`` ``None``/``1`` mean no truncation.
    """
    from corolla.engine import SamplingParams

    max_tokens = settings.get("max_tokens")
    temperature = settings.get("temperature")
    sampling = SamplingParams.from_temperature(
        0.0 if temperature is None else float(temperature),
        top_p=settings.get("top_p"),
        top_k=settings.get("top_k"),
        repetition_penalty=settings.get("repetition_penalty"),
        seed=settings.get("seed"),
    )
    return {
        "max_new_tokens": max_tokens if max_tokens is not None else DEFAULT_MAX_NEW_TOKENS,
        "stop": list(stop) if stop else None,
        "sampling": sampling,
    }


def merge_stops(*stops: Sequence[str] | None) -> list[str] | None:
    """Union of stop sequences in order of first appearance, or ``None`` when there are none."""
    merged: list[str] = []
    for group in stops:
        for stop in group or ():
            if stop and stop not in merged:
                merged.append(stop)
    return merged or None


# --- messages --------------------------------------------------------------------------------------


def merge_consecutive_roles(messages: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Role/content dicts for a chat template, joining consecutive messages of the same role.

    Many chat templates (Llama 2, Mistral, Gemma) reject two user or two assistant turns in a row.
    """
    merged: list[dict[str, str]] = []
    for role, content in messages:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] = f"{merged[-1]['content']}\n\n{content}"
        else:
            merged.append({"role": role, "content": content})
    return merged


# --- streaming helpers -----------------------------------------------------------------------------


def with_last(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, is_last)``, holding one piece back; an empty stream yields ``("", True)``.

    Knowing which piece is last lets adapters attach usage and finish reason to it.
    """
    iterator = iter(pieces)
    try:
        previous = next(iterator)
    except StopIteration:
        yield "", True
        return
    for piece in iterator:
        yield previous, False
        previous = piece
    yield previous, True


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI-style usage counts."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def aiter_in_executor(make_iterator: Callable[..., Iterable[T]], *args: Any, **kwargs: Any) -> AsyncIterator[T]:
    """Run a blocking iterator in the default executor, one item at a time (async reuses sync).

    Args:
        make_iterator: A callable returning an iterator; it is called in the executor too, because
            starting a stream may already block (connecting, sending the prompt).
        *args: Positional arguments for ``make_iterator``.
        **kwargs: Keyword arguments for ``make_iterator``.
    """
    loop = asyncio.get_running_loop()
    iterator: Iterator[T] = await loop.run_in_executor(None, lambda: iter(make_iterator(*args, **kwargs)))
    done = object()
    while True:
        item = await loop.run_in_executor(None, next, iterator, done)
        if item is done:
            return
        yield item  # type: ignore[misc]  # not `done`, so a T

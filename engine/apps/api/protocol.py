"""OpenAI request and response shapes, and the one mapping from request parameters to sampling options.

Pure: no sockets, no FastAPI. Unknown request fields are ignored (clients send many optional ones);
fields Corolla cannot honour get a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corolla.engine.apps.api.errors import APIError, bad_request
from corolla.engine.client.sampling import SamplingParams

MAX_STOPS = 4


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` means something here."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Parameters shared by chat and text completions (OpenAI's names and bounds)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # what torch.manual_seed takes
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    # Extensions other OpenAI-compatible servers accept too (pass them via the SDK's extra_body).
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)


class ContentPart(BaseModel):
    """One part of a message's content list; only text parts are understood."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for text completions
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class GenerationOptions:
    """What one request asks the model for, in the terms of ``DistributedModelForCausalLM.stream_text``."""

    max_tokens: int | None  # None: the rest of the context, capped by the server's default
    sampling: SamplingParams
    stop: tuple[str, ...]

    def stream_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """Keyword arguments of ``stream_text`` / ``stream_chat``."""
        return dict(max_new_tokens=max_new_tokens, sampling=self.sampling, stop=list(self.stop))


def invalid_request(errors: Sequence[Any]) -> APIError:
    """The 400 for a body FastAPI could not parse or validate (its ``RequestValidationError.errors()``).

    A body that is not JSON names what is wrong and where, with ``param`` null; a bad field names the field.
    """
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        error = (first.get("ctx") or {}).get("error") or "it cannot be parsed"
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return bad_request(f"The request body is not valid JSON: {error}{at}. Send a JSON object.", code="invalid_json")
    param = ".".join(str(p) for p in loc) or None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
    return bad_request(f"Invalid request: {message}", param=param)


def _refuse(request: _Sampling) -> None:
    """400 for parameters whose meaning Corolla cannot honour (rather than silently ignoring them)."""
    if request.n not in (None, 1):
        raise bad_request("n > 1 is not supported: send one request per completion.", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise bad_request(
                f"{name} is not supported by Corolla; leave it at 0, or pass repetition_penalty "
                "(e.g. 1.1, via extra_body) to discourage repeats.",
                param=name,
            )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}.", param="stop")
    return tuple(s for s in stops if s)


def _options(request: _Sampling, max_tokens: int | None) -> GenerationOptions:
    _refuse(request)
    sampling = SamplingParams.from_temperature(
        1.0 if request.temperature is None else request.temperature,  # OpenAI's default temperature
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
    )
    return GenerationOptions(max_tokens=max_tokens, sampling=sampling, stop=_stops(request.stop))


def chat_options(request: ChatCompletionRequest) -> GenerationOptions:
    """Sampling options of a chat request, or a 400 naming the parameter Corolla cannot honour."""
    if request.logprobs or request.top_logprobs:
        raise bad_request("logprobs are not supported by Corolla yet.", param="logprobs")
    if request.tools or request.functions:
        raise bad_request("tool calling is not supported by Corolla yet.", param="tools")
    if request.response_format and request.response_format.get("type") not in (None, "text"):
        raise bad_request("only response_format type 'text' is supported.", param="response_format")
    return _options(request, request.max_completion_tokens or request.max_tokens)


def completion_options(request: CompletionRequest) -> GenerationOptions:
    """Sampling options of a text completion request (400 for what Corolla cannot honour)."""
    if request.logprobs:
        raise bad_request("logprobs are not supported by Corolla yet.", param="logprobs")
    if request.echo:
        raise bad_request("echo is not supported.", param="echo")
    if request.suffix:
        raise bad_request("suffix (insertion) is not supported.", param="suffix")
    if request.best_of not in (None, 1):
        raise bad_request("best_of > 1 is not supported.", param="best_of")
    return _options(request, request.max_tokens)


def prompt_text(request: CompletionRequest) -> str:
    """The single prompt of a text completion request."""
    if isinstance(request.prompt, str):
        return request.prompt
    if len(request.prompt) != 1:
        raise bad_request("send exactly one prompt per request (a list of several is not supported).", param="prompt")
    return request.prompt[0]


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as role/content dicts for the chat template (text parts joined; other parts refused)."""
    out: list[dict[str, str]] = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            texts = []
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}] has a {part.type!r} part; only text parts are supported.",
                        param=f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = message.content or ""
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": content})
    return out


# ---- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id like OpenAI's (``chatcmpl-…``, ``cmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str:
    """Corolla's finish reasons in OpenAI's words (end of sequence is a natural ``stop``)."""
    return "length" if reason == "length" else "stop"


def chat_response(rid: str, model: str, text: str, reason: str | None, prompt: int, completion: int) -> dict[str, Any]:
    """A whole ``chat.completion`` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": usage(prompt, completion),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a delta (``reason`` set on the last one)."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason(reason) if reason else None,
            }
        ],
    }


def text_response(rid: str, model: str, text: str, reason: str | None, prompt: int, completion: int) -> dict[str, Any]:
    """A whole ``text_completion`` object."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}],
        "usage": usage(prompt, completion),
    }


def text_chunk(rid: str, model: str, text: str, reason: str | None = None) -> dict[str, Any]:
    """One streamed ``text_completion`` piece."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason) if reason else None}
        ],
    }


def usage_chunk(rid: str, model: str, kind: str, prompt: int, completion: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt, completion),
    }

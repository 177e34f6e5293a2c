"""The FastAPI app of ``corolla api``: OpenAI's endpoints over one shared swarm client.

Every request gets its own inference session (the client is thread-safe); generation runs in worker
threads, one step at a time, so the event loop keeps serving other requests and notices clients
that go away. A stream whose client disconnects is closed at once, which frees the servers' caches.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from corolla.engine.apps.api import protocol
from corolla.engine.apps.api.errors import APIError, bad_request, error_for
from corolla.engine.apps.api.limits import Admission, BodyLimit, Slot, check_prompt_chars
from corolla.engine.apps.api.metrics import ApiMetrics
from corolla.engine.config import check_limits
from corolla.engine.version import __version__

if TYPE_CHECKING:
    from corolla.engine.client.model import DistributedModelForCausalLM
    from corolla.engine.client.text import TextStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    """Settings of one ``corolla api`` app."""

    model_id: str  # the name clients pass as ``model`` (and /v1/models lists)
    aliases: tuple[str, ...] = ()  # other names a request may give (the path the server was started with)
    api_key: str | None = None  # clients must send ``Authorization: Bearer KEY`` (None: no key needed)
    request_timeout: float = 600.0  # seconds one request may take before it fails with 504
    default_max_tokens: int = 512  # tokens to generate when a chat request gives no max_tokens
    max_workers: int = 64  # worker threads that run generation steps (bounds concurrent steps)
    # Generations running at once; more requests wait their turn (within request_timeout). Servers
    # let one peer hold 8 sessions by default, and this app is one peer however many users it has.
    max_sessions: int = 8
    max_queue: int = 64  # requests that may wait for a generation slot, first come first served; beyond: 429
    max_body_bytes: int = 4 * 1024 * 1024  # bytes of a request body; larger ones get a 413 before being read

    def __post_init__(self) -> None:
        check_limits(self)


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that always closes its body generator, also when the client goes away.

    Starlette cancels the sending task on disconnect but leaves the generator for the garbage
    collector; closing it here runs its ``finally`` at once (which closes the inference session).
    """

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _next_piece(stream: TextStream, deadline: float) -> str | None:
    """The next text piece (None at the end); TimeoutError past the request's deadline."""
    if time.monotonic() > deadline:
        raise TimeoutError("the request took longer than the server's --request-timeout")
    try:
        return next(stream)
    except StopIteration:
        return None


def create_app(model: DistributedModelForCausalLM, settings: ApiSettings) -> FastAPI:
    """The OpenAI-compatible app serving ``model`` (a started, shared swarm client)."""
    app = FastAPI(title="Corolla OpenAI-compatible API", version=__version__, docs_url=None, redoc_url=None)
    metrics = ApiMetrics()
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    limiter = anyio.CapacityLimiter(settings.max_workers)
    admission = Admission(settings.max_sessions, settings.max_queue)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    # ---- errors in OpenAI's shape ----------------------------------------------------------
    def answer_error(error: APIError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(error.status)).inc()
        metrics.errors.labels(error.code or error.type).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer_error(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer_error(protocol.invalid_request(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer_error(APIError(exc.status_code, str(exc.detail), type=kind), request.url.path)

    # ---- checks shared by every /v1 endpoint ------------------------------------------------
    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided. Pass the key given to `corolla api --api-key` as the client's api_key.",
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name != settings.model_id and name not in settings.aliases:
            raise APIError(
                404,
                f"The model {name!r} does not exist here; this server serves {settings.model_id!r} (see /v1/models).",
                param="model",
                code="model_not_found",
                type="invalid_request_error",
            )

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "corolla-swarm"}

    # ---- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "version": __version__}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        check_key(request)
        check_model(name)
        return model_card()

    # ---- generation ------------------------------------------------------------------------
    def open_stream(
        make: Callable[..., TextStream], options: protocol.GenerationOptions, param: str
    ) -> tuple[TextStream, int]:
        """A text stream sized to the request, or a 400 when prompt + max_tokens exceed the context."""
        asked = options.max_tokens
        stream = make(**options.stream_kwargs(asked or 1))
        room = context - stream.prompt_tokens
        if asked is not None and asked <= room:
            return stream, asked
        stream.close()
        if room <= 0 or asked is not None:
            raise bad_request(
                f"This model's context is {context} tokens; the prompt takes {stream.prompt_tokens} and "
                f"{asked or 1} more were asked for. Shorten the prompt or lower {param}.",
                param=param if room > 0 else "messages",
                code="context_length_exceeded",
            )
        size = min(room, settings.default_max_tokens)
        return make(**options.stream_kwargs(size)), size

    async def generate(
        endpoint: str,
        kind: str,
        stream_requested: bool,
        include_usage: bool,
        make_stream: Callable[[], TextStream],
    ) -> Response:
        began = time.monotonic()
        deadline = began + settings.request_timeout
        rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        model_id = settings.model_id
        metrics.in_progress.inc()
        stream: TextStream | None = None
        slot = Slot(admission)
        release_slot = slot.release

        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):  # TimeoutError: a 504
                await slot.take()
            stream = await in_thread(make_stream)
            if not stream_requested:
                try:
                    while await in_thread(_next_piece, stream, deadline) is not None:
                        pass
                finally:
                    await in_thread(stream.close)
                    release_slot()
                text = stream.text  # the honest completion: an audit may have withdrawn pieces given out
                metrics.in_progress.dec()
                metrics.latency.labels(endpoint).observe(time.monotonic() - began)
                metrics.tokens.labels("prompt").inc(stream.prompt_tokens)
                metrics.tokens.labels("completion").inc(stream.completion_tokens)
                metrics.requests.labels(endpoint, "200").inc()
                build = protocol.chat_response if kind == "chat" else protocol.text_response
                return JSONResponse(
                    build(rid, model_id, text, stream.finish_reason, stream.prompt_tokens, stream.completion_tokens)
                )
            # Streaming: the first piece comes before the headers, so a swarm that cannot serve the
            # request (no cache room, missing blocks) still gets its proper status code.
            first = await in_thread(_next_piece, stream, deadline)
        except BaseException as e:
            metrics.in_progress.dec()
            metrics.latency.labels(endpoint).observe(time.monotonic() - began)
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await in_thread(stream.close)
            release_slot()
            if not isinstance(e, Exception):
                raise
            error = error_for(e)
            if error.status >= 500:
                logger.warning("%s failed: %s", endpoint, error.message)
            return answer_error(error, endpoint)
        metrics.first_token.observe(time.monotonic() - began)
        metrics.requests.labels(endpoint, "200").inc()
        live = stream

        def chunk(piece: str, reason: str | None = None) -> dict[str, Any]:
            if kind == "chat":
                return protocol.chat_chunk(rid, model_id, {"content": piece} if piece or not reason else {}, reason)
            return protocol.text_chunk(rid, model_id, piece, reason)

        def rewind_chunk(cut: int) -> dict[str, Any]:
            # Corolla's extension: the completion's text so far is cut back to ``cut`` characters, and the
            # content of the next chunks continues from there (a caught liar's tokens were withdrawn).
            body = chunk("")
            body["corolla_rewind"] = {"position": cut}
            return body

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                if kind == "chat":
                    yield _sse(protocol.chat_chunk(rid, model_id, {"role": "assistant", "content": ""}))
                piece = first
                told = 0  # rewinds sent
                while piece is not None:
                    for cut in live.rewinds[told:]:  # an audit withdrew text already sent: say where to cut
                        yield _sse(rewind_chunk(cut))
                    told = len(live.rewinds)
                    if piece:
                        yield _sse(chunk(piece))
                    piece = await in_thread(_next_piece, live, deadline)
                for cut in live.rewinds[told:]:
                    yield _sse(rewind_chunk(cut))
                yield _sse(chunk("", live.finish_reason or "stop"))
                if include_usage:
                    object_kind = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    yield _sse(
                        protocol.usage_chunk(rid, model_id, object_kind, live.prompt_tokens, live.completion_tokens)
                    )
                yield _sse("[DONE]")
                finished = True
            except Exception as e:  # mid-stream: the status is sent already, so the error is an event
                error = error_for(e)
                metrics.errors.labels(error.code or error.type).inc()
                logger.warning("%s failed mid-stream: %s", endpoint, error.message)
                yield _sse(error.body())
                finished = True
            finally:
                if not finished:
                    metrics.disconnects.inc()
                    logger.info("client left a stream after %d tokens; closing its session", live.completion_tokens)
                with anyio.CancelScope(shield=True):
                    await in_thread(live.close)
                release_slot()
                metrics.in_progress.dec()
                metrics.tokens.labels("prompt").inc(live.prompt_tokens)
                metrics.tokens.labels("completion").inc(live.completion_tokens)
                metrics.latency.labels(endpoint).observe(time.monotonic() - began)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _ClosingStreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Response:
        check_key(request)
        check_model(body.model)
        options = protocol.chat_options(body)
        messages = protocol.chat_messages(body)
        check_prompt_chars([m["content"] for m in messages], context, "messages")
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"

        def make() -> TextStream:
            return open_stream(lambda **kw: model.stream_chat(messages, **kw), options, param)[0]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await generate("/v1/chat/completions", "chat", bool(body.stream), include_usage, make)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        check_key(request)
        check_model(body.model)
        options = protocol.completion_options(body)
        prompt = protocol.prompt_text(body)
        check_prompt_chars([prompt], context, "prompt")

        def make() -> TextStream:
            return open_stream(lambda **kw: model.stream_text(prompt, **kw), options, "max_tokens")[0]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await generate("/v1/completions", "text", bool(body.stream), include_usage, make)

    return app

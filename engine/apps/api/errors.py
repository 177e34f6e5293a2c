"""OpenAI-shaped errors, and the one place that maps Corolla's errors to HTTP status codes."""

from __future__ import annotations

from typing import Any

from corolla.engine.errors import (
    CacheFullError,
    CorollaError,
    MissingBlocksError,
    NoRouteError,
    PeerUnavailableError,
    ProtocolError,
    format_blocks,
)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}  # sent with the answer (e.g. Retry-After)

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server will not run as asked."""
    return APIError(400, message, param=param, code=code)


def error_for(exc: BaseException) -> APIError:
    """The HTTP answer for an exception raised while serving a request (every mapping lives here)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CacheFullError):
        return APIError(
            429,
            f"The swarm has no attention-cache room for this request right now: {exc} "
            "Retry later, or ask for fewer tokens (max_tokens).",
            type="rate_limit_error",
            code="swarm_cache_full",
        )
    if isinstance(exc, NoRouteError):
        # Servers hold the blocks but every one failed: a timeout if they did not answer in time.
        if _timed_out(exc):
            return _timeout(exc)
        return APIError(503, str(exc), type="service_unavailable", code="no_route")
    if isinstance(exc, MissingBlocksError):
        return APIError(
            503,
            f"Block(s) {format_blocks(exc.blocks)} of the model have no server in the swarm. {exc}",
            type="service_unavailable",
            param=None,
            code="missing_blocks",
        )
    if isinstance(exc, TimeoutError | PeerUnavailableError):
        return _timeout(exc)
    if isinstance(exc, ProtocolError):
        return APIError(502, f"A server of the swarm answered badly: {exc}", type="server_error", code="bad_gateway")
    if isinstance(exc, CorollaError):
        return APIError(500, str(exc), type="server_error", code="corolla_error")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def _timeout(exc: BaseException) -> APIError:
    return APIError(
        504,
        f"The swarm did not answer in time: {exc or 'request deadline passed'}. Retry; if it keeps "
        "happening, check the swarm with `corolla health`.",
        type="timeout",
        code="swarm_timeout",
    )


def _timed_out(exc: BaseException) -> bool:
    """True if a timeout or an unresponsive peer is among the causes of ``exc``."""
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError | PeerUnavailableError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False

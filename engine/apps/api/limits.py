"""What bounds ``corolla api`` under load: a body limit enforced before the body is read, a prompt bound
checked before tokenizing, and a fair (first come, first served) queue in front of the generations.

A body, however it is sent, is never held past the limit: a declared ``Content-Length`` over it is refused
before a byte is read, and a chunked body is counted as it arrives and cut at the limit. Requests beyond the
running generations wait in order in a queue of bounded length; one that finds the queue full gets a 429
with ``Retry-After`` at once instead of slowing everyone down.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Sequence

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corolla.engine.apps.api.errors import APIError, bad_request
from corolla.engine.config import format_size

CHARS_PER_TOKEN = 16  # generous: text runs 3-5 characters a token, and no tokenizer makes a token of more than ~16
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def body_too_large(limit: int) -> APIError:
    """The 413 for a body over ``limit`` bytes."""
    return APIError(
        413,
        f"The request body is larger than this server's limit of {format_size(limit)} ({limit} bytes). "
        "Send a shorter prompt, or ask the operator to raise `corolla api --max-body-bytes`.",
        code="request_too_large",
    )


class BodyLimit:
    """ASGI middleware: bodies of at most ``limit`` bytes reach the app; larger ones get a 413, unread."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)  # not a byte of the body read
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)  # the rest is never read; the server closes the connection
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect is left to wait for

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        error = body_too_large(self.limit)
        payload = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def check_prompt_chars(texts: Sequence[str], context: int, param: str) -> None:
    """A 400 when the prompt cannot fit the model's context, judged by its length before it is tokenized.

    ``context`` tokens of at most :data:`CHARS_PER_TOKEN` characters each bound the characters any prompt
    that fits may have; a longer one is refused without tokenizing it (the exact count comes after).
    """
    bound = context * CHARS_PER_TOKEN
    chars = sum(len(t) for t in texts)
    if chars > bound:
        raise bad_request(
            f"The prompt has {chars} characters; this model's context of {context} tokens takes at most about "
            f"{bound}. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


class Admission:
    """At most ``running`` generations at once; up to ``queue`` more wait in arrival order; the rest get a 429.

    Used from the app's event loop only (no locks needed). A waiter that gives up (deadline, disconnect)
    leaves the queue; a released slot goes to the longest waiting request.
    """

    def __init__(self, running: int, queue: int) -> None:
        self.limit, self.queue_limit = running, queue
        self.running = 0
        self._waiting: deque[anyio.Event] = deque()
        self._handed: set[anyio.Event] = set()  # woken waiters that own a slot they have not taken yet
        self._seconds = 0.0  # smoothed seconds one generation holds its slot

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot right now."""
        return len(self._waiting)

    def retry_after(self) -> int:
        """Seconds after which a refused request may find room: the queue's expected drain time, at least 1."""
        per_slot = self._seconds or 1.0
        return max(1, math.ceil(per_slot * (self.waiting + 1) / self.limit))

    async def acquire(self) -> None:
        """Take a slot, waiting in line; APIError 429 when the line is full (cancel-safe)."""
        if self.running < self.limit and not self._waiting:
            self.running += 1
            return
        if len(self._waiting) >= self.queue_limit:
            raise APIError(
                429,
                f"This server is busy: {self.running} generations are running and {self.waiting} more are "
                f"waiting (its limits: --max-sessions {self.limit}, --max-queue {self.queue_limit}). Retry after "
                f"{self.retry_after()} s.",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(self.retry_after())},
            )
        event = anyio.Event()
        self._waiting.append(event)
        try:
            await event.wait()
        except BaseException:
            if event in self._handed:  # woken as it gave up: pass the slot on
                self._handed.discard(event)
                self.release(0.0)
            else:
                self._waiting.remove(event)
            raise
        self._handed.discard(event)

    def release(self, held_s: float) -> None:
        """Give a slot back (``held_s``: how long it was held, for Retry-After); the next in line gets it."""
        if held_s > 0:
            self._seconds = held_s if not self._seconds else 0.8 * self._seconds + 0.2 * held_s
        if self._waiting:
            event = self._waiting.popleft()
            self._handed.add(event)
            event.set()  # the slot passes on: ``running`` stays the same
        else:
            self.running -= 1


class Slot:
    """One request's hold on an :class:`Admission` slot: released once, however the request ends."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = False
        self.since = 0.0

    async def take(self) -> None:
        """Wait for a slot (APIError 429 if the queue is full)."""
        await self.admission.acquire()
        self.held, self.since = True, time.monotonic()

    def release(self) -> None:
        """Give the slot back (no-op if not held)."""
        if self.held:
            self.held = False
            self.admission.release(time.monotonic() - self.since)

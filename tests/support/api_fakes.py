"""A fake swarm client for ``corolla api`` tests that need real HTTP but no swarm, and a uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from corolla.engine.apps.api.app import ApiSettings, create_app


class FakeStream:
    """What ``stream_text`` returns: ``pieces`` text pieces, each after ``delay`` seconds."""

    def __init__(self, prompt: str, max_new_tokens: int, delay: float) -> None:
        self.prompt_tokens = max(1, len(prompt) // 4)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""  # what was generated so far (the honest text, as TextStream keeps it)
        self.rewinds: list[int] = []  # a fake server never lies: nothing is withdrawn
        self._left = max_new_tokens
        self._delay = delay

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> str:
        if self._left == 0:
            self.finish_reason = "length"
            raise StopIteration
        time.sleep(self._delay)
        self._left -= 1
        self.completion_tokens += 1
        self.text += "x"
        return "x"

    def close(self) -> None:
        self._left = 0


@dataclass
class FakeModel:
    """A stand-in for ``DistributedModelForCausalLM``: a context size, and the prompt lengths it was asked to tokenize."""

    context: int = 4096
    delay: float = 0.0  # seconds per generated piece
    tokenized: list[int] = field(default_factory=list)  # characters of each prompt handed to the "tokenizer"
    config: Any = None

    def __post_init__(self) -> None:
        self.config = type("Config", (), {"max_position_embeddings": self.context})()

    def stream_text(self, prompt: str, **kwargs: Any) -> FakeStream:
        self.tokenized.append(len(prompt))
        return FakeStream(prompt, kwargs["max_new_tokens"], self.delay)

    def stream_chat(self, messages: list[dict[str, str]], **kwargs: Any) -> FakeStream:
        return self.stream_text("".join(m["content"] for m in messages), **kwargs)


@contextlib.contextmanager
def serving(model: FakeModel, **settings: Any) -> Iterator[str]:
    """Serve ``create_app(model, ApiSettings(model_id="fake", **settings))`` on a free port; yields its base URL."""
    app = create_app(model, ApiSettings(model_id="fake", **settings))  # type: ignore[arg-type]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)

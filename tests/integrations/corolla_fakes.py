"""A stand-in for ``corolla.engine.DistributedModelForCausalLM`` that follows its documented contract.

Used by the adapters' unit tests (no sockets); the swarm tests use the real client.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

REPLY = "Paris is the capital of France. It sits on the Seine."


def _pieces(text: str) -> list[str]:
    """Split like a tokenizer would stream: words with their leading space."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


@dataclass
class FakeResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class FakeStream:
    """Iterates pieces of the reply; stops are applied while streaming, as the engine does."""

    def __init__(self, result: FakeResult, pieces: list[str]) -> None:
        self._pieces = pieces
        self._result = result
        self.prompt_tokens = result.prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        emitted = ""
        for piece in self._pieces:
            remaining = self._result.text[len(emitted) :]
            piece = piece[: len(remaining)]
            if not piece:
                break
            emitted += piece
            self.completion_tokens += 1
            yield piece
        self.completion_tokens = self._result.completion_tokens
        self.finish_reason = self._result.finish_reason


@dataclass
class FakeModel:
    """Answers every prompt with ``reply``, one word a token; records each call."""

    model_name: str = "acme/fake-model"
    reply: str = REPLY
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    config: Any = field(default_factory=lambda: SimpleNamespace(max_position_embeddings=2048))
    closed: bool = False

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        turns = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return turns + "<|assistant|>"

    def _run(
        self, prompt: str, max_new_tokens: int = 64, stop: Sequence[str] | None = None, **kwargs: Any
    ) -> tuple[FakeResult, list[str]]:
        self.calls.append((prompt, {"max_new_tokens": max_new_tokens, "stop": stop, **kwargs}))
        pieces = _pieces(self.reply)[:max_new_tokens]
        text = "".join(pieces)
        finish = "length" if len(pieces) < len(_pieces(self.reply)) else "eos"
        for s in stop or ():
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        completion = len(pieces) if finish != "stop" else len(text.split())
        return FakeResult(text, len(prompt.split()), completion, finish), pieces

    def generate_text(self, prompt: str, **kwargs: Any) -> FakeResult:
        return self._run(prompt, **kwargs)[0]

    def stream_text(self, prompt: str, **kwargs: Any) -> FakeStream:
        return FakeStream(*self._run(prompt, **kwargs))

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> FakeResult:
        return self.generate_text(self.apply_chat_template(messages), **kwargs)

    def stream_chat(self, messages: list[dict[str, str]], **kwargs: Any) -> FakeStream:
        return self.stream_text(self.apply_chat_template(messages), **kwargs)

    def close(self) -> None:
        self.closed = True

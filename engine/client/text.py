"""Turning generated token ids into text pieces, with stop strings applied while streaming."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class GenerationResult:
    """A finished completion: text without the prompt (stop string excluded) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    unverified: tuple[str, ...] = ()  # why parts of the route could not be checked on an independent replica


@dataclass(frozen=True)
class Rewind:
    """Yielded by the token loop when an audit caught a server lying: tokens yielded from ``kept`` on are
    withdrawn (they came from its untrue outputs); the tokens that follow replace them."""

    kept: int  # tokens of this generation still valid


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into one of ``stops``."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best


class TextStream(Iterator[str]):
    """An iterator of text pieces; ``prompt_tokens``, ``completion_tokens`` and ``finish_reason`` fill in
    as it goes. Text that could be the start of a stop string is held back until it is decided.

    Rewinds: when an audit catches a server lying, text already given out may be withdrawn. ``text`` is
    then cut back to the honest part, the cut (a character offset into the completion) is appended to
    ``rewinds`` and passed to ``on_rewind``, and the pieces that follow continue from that offset. Who
    joins pieces must honour it (``result()`` and ``text`` always hold the honest completion).
    """

    def __init__(
        self,
        tokens: Iterator[int | Rewind],
        decode: Callable[[list[int]], str],
        prompt_tokens: int,
        stop: Sequence[str] = (),
        on_close: Callable[[], Any] | None = None,
        unverified: Callable[[], Sequence[str]] | None = None,
        on_rewind: Callable[[int], Any] | None = None,
    ) -> None:
        self._unverified = unverified
        self._on_rewind = on_rewind
        self.rewinds: list[int] = []
        self._tokens = tokens
        self._decode = decode
        self._stops = [s for s in stop if s]
        self._on_close = on_close
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            try:
                token = next(self._tokens)
            except StopIteration as stop:
                self.finish_reason = stop.value or "length"
                piece = self._flush(final=True)
                self.close()
                if piece:
                    return piece
                break
            if isinstance(token, Rewind):
                self._rewind(token.kept)
                continue
            self._ids.append(token)
            self.completion_tokens += 1
            piece = self._flush(final=False)
            if piece:
                return piece
        self.close()
        raise StopIteration

    def _flush(self, final: bool) -> str:
        decoded = self._decode(self._ids)
        for stop in self._stops:
            at = decoded.find(stop, max(0, self._emitted - len(stop)))
            if at != -1:
                decoded = decoded[:at]
                self.finish_reason = "stop"
                final = True
        if not final:
            if decoded.endswith("\ufffd"):  # a multi-byte character is still incomplete
                return ""
            decoded = decoded[: len(decoded) - held_back(decoded[self._emitted :], self._stops)]
        piece = decoded[self._emitted :]
        self._emitted = max(self._emitted, len(decoded))
        self.text += piece
        return piece

    def _rewind(self, kept: int) -> None:
        self._ids = self._ids[:kept]
        self.completion_tokens = len(self._ids)
        honest = self._decode(self._ids)
        cut = 0
        for a, b in zip(self.text, honest, strict=False):  # what was given out and is still true
            if a != b:
                break
            cut += 1
        if cut < len(self.text):
            self.text = self.text[:cut]
            self.rewinds.append(cut)
            if self._on_rewind is not None:
                self._on_rewind(cut)
        self._emitted = min(self._emitted, cut)

    def close(self) -> None:
        """Stop generating and release the session (idempotent)."""
        if self.finish_reason is None:
            self.finish_reason = "stop"
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback()

    def result(self) -> GenerationResult:
        """Consume the rest of the stream and return the whole completion."""
        for _ in self:
            pass
        unverified = tuple(self._unverified()) if self._unverified is not None else ()
        return GenerationResult(
            self.text, self.prompt_tokens, self.completion_tokens, self.finish_reason or "length", unverified
        )

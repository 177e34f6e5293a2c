"""TextStream: stop strings applied while streaming, held-back text, finish reasons, closing."""

from __future__ import annotations

from collections.abc import Generator, Sequence

import pytest

from corolla.engine.client.text import GenerationResult, TextStream, held_back


class FakeTokens:
    """A token generator over text pieces (one token per piece) that records how far it was consumed."""

    def __init__(self, pieces: Sequence[str], reason: str | None = None) -> None:
        self.pieces = list(pieces)
        self.reason = reason
        self.consumed = 0
        self.closed = False

    def tokens(self) -> Generator[int, None, str | None]:
        try:
            for i in range(len(self.pieces)):
                self.consumed += 1
                yield i
        finally:
            self.closed = True
        return self.reason

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def stream_of(
    pieces: Sequence[str], stop: Sequence[str] = (), reason: str | None = None
) -> tuple[TextStream, FakeTokens, list[int]]:
    fake = FakeTokens(pieces, reason)
    closes: list[int] = []
    stream = TextStream(fake.tokens(), fake.decode, prompt_tokens=5, stop=stop, on_close=lambda: closes.append(1))
    return stream, fake, closes


def test_no_stops_streams_every_piece_and_finishes_by_length() -> None:
    stream, fake, closes = stream_of(["Hel", "lo", ", ", "world"])
    assert list(stream) == ["Hel", "lo", ", ", "world"]
    assert stream.text == "Hello, world"
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == 4
    assert closes == [1]
    assert fake.closed


def test_eos_reason_comes_from_the_token_generator() -> None:
    stream, _, _ = stream_of(["a", "b"], reason="eos")
    result = stream.result()
    assert result == GenerationResult("ab", 5, 2, "eos")


def test_plain_iterator_without_a_reason_means_length() -> None:
    stream = TextStream(iter([0, 1]), lambda ids: "x" * len(ids), prompt_tokens=0)
    assert stream.result().finish_reason == "length"
    assert stream.text == "xx"


def test_stop_inside_one_piece_cuts_text_and_stops_generating() -> None:
    stream, fake, closes = stream_of(["Hi", " there STOP and", " more", " text"], stop=["STOP"])
    pieces = list(stream)
    assert "".join(pieces) == "Hi there "
    assert stream.text == "Hi there "
    assert stream.finish_reason == "stop"
    assert fake.consumed == 2  # nothing generated after the stop string appeared
    assert fake.closed
    assert closes == [1]


def test_stop_split_across_pieces_is_never_emitted() -> None:
    stream, fake, _ = stream_of(["Hel", "lo S", "T", "O", "P more", "never"], stop=["STOP"])
    emitted = []
    for piece in stream:
        emitted.append(piece)
        assert "S" not in "".join(emitted), "a prefix of the stop string leaked out"
    assert "".join(emitted) == "Hello "
    assert stream.text == "Hello "
    assert stream.finish_reason == "stop"
    assert fake.consumed == 5


def test_partial_stop_is_held_back_then_released() -> None:
    stream, fake, _ = stream_of(["ab", "ST", "x", "yz"], stop=["STOP"])
    assert next(stream) == "ab"
    assert fake.consumed == 1
    # "ST" could start "STOP": it is held back and the stream reads on until it is decided.
    assert next(stream) == "STx"
    assert fake.consumed == 3
    assert next(stream) == "yz"
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.text == "abSTxyz"
    assert stream.finish_reason == "length"


def test_partial_stop_at_the_end_is_released() -> None:
    stream, _, _ = stream_of(["ab", "STO"], stop=["STOP"])
    assert list(stream) == ["ab", "STO"]
    assert stream.finish_reason == "length"


def test_earliest_of_several_stops_wins() -> None:
    stream, _, _ = stream_of(["x", "AyB", "z"], stop=["B", "A"])
    assert "".join(stream) == "x"
    assert stream.text == "x"
    assert stream.finish_reason == "stop"


def test_stop_overlapping_text_already_emitted() -> None:
    # "aa" is emitted before "aab" becomes possible; the stop still cuts exactly at its start.
    stream, _, _ = stream_of(["a", "a", "a", "b", "c"], stop=["aab"])
    text = "".join(stream)
    assert text == "a"
    assert stream.finish_reason == "stop"


def test_empty_stop_strings_are_ignored() -> None:
    stream, _, _ = stream_of(["a", "b"], stop=[""])
    assert stream.result().text == "ab"


def test_incomplete_multibyte_character_is_held_back() -> None:
    raw = "aé€b".encode()  # 1 + 2 + 3 + 1 bytes; one byte per token

    def decode(ids: list[int]) -> str:
        return bytes(raw[i] for i in ids).decode("utf-8", errors="replace")

    stream = TextStream(iter(range(len(raw))), decode, prompt_tokens=0)
    pieces = list(stream)
    assert pieces == ["a", "é", "€", "b"]
    assert not any("\ufffd" in p for p in pieces)
    assert stream.completion_tokens == len(raw)


def test_close_early_is_idempotent_and_calls_on_close_once() -> None:
    stream, fake, closes = stream_of(["a", "b", "c"])
    assert next(stream) == "a"
    stream.close()
    stream.close()
    assert closes == [1]
    assert fake.closed
    assert stream.finish_reason == "stop"
    assert list(stream) == []
    assert closes == [1]


def test_on_close_called_once_after_exhaustion_and_result() -> None:
    stream, _, closes = stream_of(["a"])
    result = stream.result()
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert result.text == "a"
    assert closes == [1]


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello wor", ["world"], 3),
        ("hello", ["world"], 0),
        ("hello", [], 0),
        ("", ["a"], 0),
        ("a", ["a"], 0),  # a whole stop is found, not held
        ("ab", ["abc", "b!"], 2),  # the longest candidate wins
        ("xab", ["b!", "abc"], 2),
        ("xSTOP", ["STOP"], 0),
        ("aa", ["aab"], 2),
        ("aaa", ["aab"], 2),
    ],
)
def test_held_back(text: str, stops: list[str], expected: int) -> None:
    assert held_back(text, stops) == expected

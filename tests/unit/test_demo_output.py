"""What ends an answer the demo prints: a newline, or a visible mark when the token limit cut it."""

from __future__ import annotations

from corolla.engine.apps.demo import cut_note


def test_an_answer_cut_at_the_limit_is_marked_on_its_own_line() -> None:
    assert cut_note("length", 64) == "…\n[cut at 64 tokens: --max-new-tokens]\n"
    assert cut_note("length", 8, dim=True) == "…\n\x1b[2m[cut at 8 tokens: --max-new-tokens]\x1b[0m\n"


def test_a_finished_answer_ends_with_a_newline_only() -> None:
    assert cut_note("eos", 64) == "\n"
    assert cut_note("stop", 64, dim=True) == "\n"

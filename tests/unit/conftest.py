"""Shared fixtures of the offline unit tests: tiny random checkpoints saved once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corolla.engine.apps.tiny_models import make_tiny_checkpoint


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, **overrides)`` → a saved tiny random checkpoint (cached per arguments)."""
    made: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def make(family: str = "llama", **overrides: Any) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = make_tiny_checkpoint(path, family, seed=len(made), **overrides)
        return made[key]

    return make

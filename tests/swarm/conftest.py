"""Fixtures of the loopback swarm tests (helpers live in swarm_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from swarm_helpers import leftover_processes

from corolla.engine.apps.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The reference models here use one thread: idle OpenMP workers spinning in this process would
    take the two cores from the server processes and make every step slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
            path = tmp_path_factory.mktemp("ckpt") / f"tiny-{family}"
            made[key] = make_tiny_checkpoint(path, family, seed=0, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="module", autouse=True)
def _no_server_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After each module (its swarms are stopped by then): no server, DHT child or p2p daemon of ours is left."""
    base = tmp_path_factory.getbasetemp()
    yield
    _, alive = psutil.wait_procs(leftover_processes(base), timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {[(p.pid, p.cmdline()) for p in alive]}"
